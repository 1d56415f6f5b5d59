"""One stage rank's serving loop: control messages in order, then receive, forward, send on.

The front end tells every rank that takes part in a batch about it (a ``batch`` control
message), so a rank always knows what comes next without polling several peers: it takes the
control stream in order — a batch, a ping (answered with a pong carrying its counters), a
switch to a new plan, stop — and for a batch receives from exactly the peers the routing names
(raw inputs from the front end, activations from the replica of each upstream stage that runs
this batch), runs its modules under ``torch.inference_mode``, and sends on. A batch the model
rejects (or that arrived as a skip) travels on as a skip with the reason, so every downstream
rank and the front end stay in step and every request gets its answer.

A tensor-parallel stage (:mod:`pipeshift.serve.tp`) runs sharded on its TP group: the group's
leader receives and sends as a plain stage rank does, and shares each batch's inputs with the
rest of the group, which computes with it and sends nothing.

A switch reuses training's mechanism (:class:`~pipeshift.runtime.repartition.Repartitioner`):
this object offers the executor interface it needs (``comm``, ``stage``, ``optimizer``,
``rebuild``); a forward-only stage has no optimizer state, so only weights move.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeshift.errors import PipeshiftError
from pipeshift.plan import parse_plan
from pipeshift.runtime.comm import Communicator, PeerError
from pipeshift.runtime.stage import Stage, StageEntry
from pipeshift.runtime.tp import TensorParallel
from pipeshift.serve import wire
from pipeshift.serve.routing import FRONTEND, Routing, build_routing
from pipeshift.serve.tp import GroupInputs, tp_group


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class StageWorker:
    """This rank's stage and the loop that serves it (a thread on the front end's rank)."""

    def __init__(self, rank: int, entries: Sequence[StageEntry], module_to_stage: Sequence[int], stage_ranks,
                 *, frontend: int, link: wire.Link, device: torch.device, timeout_s: float,
                 repartitioner: Any = None, slowdowns: Sequence[tuple[int, float, int]] = (),
                 source: str = "conf.json", tp_degrees: Mapping[int, int] | None = None,
                 tp_plan: Mapping[str, str] | None = None):
        self.rank = rank
        self.frontend = frontend
        self.link = link
        self.device = device
        self.timeout_s = timeout_s
        self.repartitioner = repartitioner
        self.slowdowns = list(slowdowns)  # (rank, factor, from batch)
        self.compute_s = 0.0
        self.batches = 0
        self.switches: list[dict[str, Any]] = []
        self.prepared: tuple[str, Any] | None = None  # (plan text, Repartitioner.prepare's result)
        self.comm = Communicator(rank, stage_of=lambda r: self.routing.stage_of(r), tags={}, device=device,
                                 timeout_s=timeout_s)
        # tensor-parallel stages (serve/tp.py): the groups exist before any stage is sharded
        self.tp_degrees = {s: t for s, t in (tp_degrees or {}).items() if t > 1}
        self.tp_plan = dict(tp_plan or {})
        self.tp: TensorParallel | None = None
        self.group_inputs: GroupInputs | None = None
        self.tp_applied: list[tuple[str, str]] = []
        if self.tp_degrees:
            if repartitioner is not None:
                raise PipeshiftError("tensor-parallel stages cannot repartition while serving (a switch would "
                                     "move shards); serve a package for the new plan instead")
            stages = build_routing([(i, o) for _, i, o in entries], module_to_stage, stage_ranks,
                                   source=source).stage_ranks
            self.tp = tp_group(stages, self.tp_degrees, rank, device, timeout_s)
            if self.tp is not None:
                self.group_inputs = GroupInputs(self.tp, timeout_s, link.who)
        self._build(entries, module_to_stage, stage_ranks, source)

    # -- the executor interface a Repartitioner uses ----------------------------------------

    def _build(self, entries, module_to_stage, stage_ranks, source: str) -> None:
        io = [(ins, outs) for _, ins, outs in entries]
        self.routing: Routing = build_routing(io, module_to_stage, stage_ranks, source=source,
                                              tp_degrees=self.tp_degrees or None)
        self.stage_id = self.routing.stage_of(self.rank)
        self.replica = self.routing.topology.replica_of(self.rank)
        mine = [entries[i] for i in self.routing.modules[self.stage_id]]
        if self.tp is not None:
            self.tp_applied = self.tp.shard([m for m, _, _ in mine], self.tp_plan,
                                            f"stage {self.stage_id} (tensor-parallel degree {self.tp.degree})")
        self.stage = Stage(self.stage_id, mine, self.device, tp=self.tp)
        s = self.stage_id
        self._inputs = [n for names in self.routing.inbound[s].values() for n in names]
        self.stage.train(False)
        params = list(self.stage.params.values()) or [torch.nn.Parameter(torch.empty(0))]
        self.optimizer = torch.optim.SGD(params, lr=0.0)  # holds no state: nothing of it moves

    def rebuild(self, entries, module_to_stage, stage_ranks, *, optimizer_state=None, source: str = "switch",
                ties=()) -> None:
        # Forward-only: no optimizer state exists, and tied copies never diverge because no
        # step updates them, so there is nothing to keep in sync across a tie's holders.
        del optimizer_state, ties
        self._build(entries, module_to_stage, stage_ranks, source)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the front end says stop; a dead peer raises :class:`PeerError`."""
        while True:
            msg = self.link.recv(self.frontend, wire.CTRL)
            if msg.kind == wire.BATCH:
                self.run_batch(msg.batch)
            elif msg.kind == wire.PING:
                self.link.send(wire.Message(wire.PONG, msg.batch, text=json.dumps(self.counters())),
                               self.frontend, wire.PONGS)
            elif msg.kind == wire.SWITCH:
                self.switch(msg.text)
            elif msg.kind == wire.STOP:
                self.link.flush()
                return
            else:
                raise PeerError(f"rank {self.rank}: unexpected control message kind {msg.kind} from the front end")

    def counters(self) -> dict[str, Any]:
        return {"rank": self.rank, "stage": self.stage_id, "pid": os.getpid(), "compute_s": self.compute_s,
                "wait_s": self.link.wait_s, "batches": self.batches, "switches": len(self.switches)}

    def run_batch(self, b: int) -> None:
        r, s = self.routing, self.stage_id
        env: dict[str, torch.Tensor] = {}
        skip: str | None = None
        talks = self.tp is None or self.tp.is_leader  # the rest of a TP group hears from its leader
        for src, names in (r.inbound[s] if talks else {}).items():
            if src == FRONTEND:
                msg = self.link.recv(self.frontend, wire.RAW)
            else:
                msg = self.link.recv(r.rank_for(src, b), wire.ACT)
            if msg.batch != b:
                raise PeerError(f"rank {self.rank} (stage {s}): expected batch {b} from "
                                f"{'the front end' if src == FRONTEND else f'stage {src}'}, got batch {msg.batch}")
            if msg.kind == wire.SKIP:
                skip = skip or msg.text
            elif len(msg.tensors) != len(names):
                raise PeerError(f"rank {self.rank} (stage {s}): batch {b} brought {len(msg.tensors)} tensors, "
                                f"expected {list(names)}")
            else:
                env.update((n, t.to(self.device, non_blocking=True)) for n, t in zip(names, msg.tensors))
        if self.group_inputs is not None:
            skip = self.group_inputs.share(b, self._inputs, env, skip)
            if not talks:
                env = {n: t.to(self.device, non_blocking=True) for n, t in env.items()}
        t0 = time.perf_counter()
        if skip is None:
            try:
                with torch.inference_mode():
                    self.stage.forward(env)
            except Exception as e:  # the model rejected these inputs: the batch's requests get the reason
                skip = f"stage {s}: {first_line(e)}"
        elapsed = time.perf_counter() - t0
        factor = self.slowdown(b)
        if factor > 1.0:  # an emulated slower worker: sleeping leaves the shared cores to the others
            time.sleep((factor - 1.0) * elapsed)
        self.compute_s += time.perf_counter() - t0
        self.batches += 1

        if not talks:
            return  # the leader sends the group's (identical) outputs

        def message(names: Sequence[str]) -> wire.Message:
            if skip is not None:
                return wire.Message(wire.SKIP, b, text=skip)
            return wire.Message(wire.DATA, b, [env[n] for n in names])

        for dst, names in r.outbound[s].items():
            self.link.send(message(names), r.rank_for(dst, b), wire.ACT)
        if r.returns[s]:
            self.link.send(message(r.returns[s]), self.frontend, wire.OUT)

    def slowdown(self, batch: int) -> float:
        factor = 1.0
        for rank, f, start in self.slowdowns:
            if rank == self.rank and batch >= start:
                factor = f
        return factor

    def switch(self, text: str) -> dict[str, Any]:
        """Move onto the plan ``text`` together with every other rank (called between batches).

        The front end's rank finds the plan already rendered (``prepared``, by the dispatcher
        while nothing ran); the others render it here.
        """
        if self.repartitioner is None:
            raise PipeshiftError(f"rank {self.rank}: asked to repartition but this rank has no repartitioner")
        self.link.flush()
        where = f"repartition after {self.batches} batches on this rank"
        self.comm.where = where
        ready, self.prepared = self.prepared, None
        plan = ready[1] if ready is not None and ready[0] == text else parse_plan(json.loads(text), where)
        report = self.repartitioner.switch(self, plan, where=where)
        self.switches.append(report)
        return report


class FrontendOnly:
    """The loop of a rank that runs no stage: a front end of its own.

    A stage sharing a process with the HTTP server waits for the interpreter lock after every
    operator whenever the HTTP thread is busy, so under load its forward runs several times
    slower than alone. ``--frontend-rank`` one past the package's last rank gives the front end
    a process of its own; this loop is that rank's side of the control stream, so pings, readiness
    and stopping work exactly as on a stage rank. It never receives a batch.
    """

    repartitioner = None
    stage_id = None

    def __init__(self, rank: int, routing: Routing, *, frontend: int, link: wire.Link):
        self.rank = rank
        self.routing = routing
        self.frontend = frontend
        self.link = link

    def counters(self) -> dict[str, Any]:
        return {"rank": self.rank, "stage": None, "pid": os.getpid(), "compute_s": 0.0, "wait_s": 0.0,
                "batches": 0, "switches": 0}

    def run(self) -> None:
        while True:
            msg = self.link.recv(self.frontend, wire.CTRL)
            if msg.kind == wire.PING:
                self.link.send(wire.Message(wire.PONG, msg.batch, text=json.dumps(self.counters())),
                               self.frontend, wire.PONGS)
            elif msg.kind == wire.STOP:
                return
            else:
                raise PeerError(f"rank {self.rank} runs no stage but got a {wire.KIND_NAMES.get(msg.kind, msg.kind)} "
                                f"control message")
