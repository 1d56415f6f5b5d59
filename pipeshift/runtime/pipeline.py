"""The executor: runs one rank's action list (see :mod:`pipeshift.schedule.actions`) for one partition.

A :class:`Pipeline` owns everything that depends on the partition — the routing
(:class:`~pipeshift.runtime.topology.Topology`), this rank's :class:`~pipeshift.runtime.stage.Stage`,
its optimizer and LR scheduler, the replica process groups and the communicator's shape cache —
and nothing that does not (data position, step count, metrics: those live in the trainer). So a
repartitioning at a synchronisation point (no microbatch in flight) is one call,
:meth:`Pipeline.rebuild`, with the new module list and rank map, and the optimizer state keyed by
parameter FQN so it can follow a layer to its new stage.

Gradients are summed over a step's microbatches (and replicas) and divided by their number
(``Action.grads``) just before the step, so the update equals single-process training on the
concatenated minibatch with a mean-reduced loss.

A stage with a tensor-parallel degree above 1 (:mod:`pipeshift.runtime.tp`) runs on a TP group:
every rank of the group runs the same actions, but only the group's first rank loads data and
talks to other stages; it broadcasts the stage's inputs before each forward and the outputs'
gradients before each backward, so the group computes in lockstep.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeshift.errors import PipeshiftError
from pipeshift.runtime.hooks import Hooks
from pipeshift.schedule import actions as S
from pipeshift.schedule.check import validate_schedule
from pipeshift.schedule.registry import schedule_kind
from pipeshift.runtime.comm import _META_LEN as _META_ROW
from pipeshift.runtime.comm import ACT, GRAD, Communicator, PendingRecv, TensorMeta
from pipeshift.runtime.metrics import COMM, COMPUTE, Tracer
from pipeshift.runtime.stage import Stage, StageEntry
from pipeshift.runtime.tp import TensorParallel, dp_groups, local, make_tp_groups
from pipeshift.runtime.ties import Tie, TieSync
from pipeshift.runtime.topology import LOSS, TARGET, Topology, build_topology

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclasses.dataclass
class _Microbatch:
    """What one in-flight microbatch holds on this rank between its actions."""

    env: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    recvs: list[tuple[str, PendingRecv]] = dataclasses.field(default_factory=list)
    received: list[tuple[str, int, torch.Tensor]] = dataclasses.field(default_factory=list)  # name, src, leaf
    outputs: list[tuple[str, int, torch.Tensor]] = dataclasses.field(default_factory=list)  # name, dst, tensor
    grad_recvs: list[tuple[torch.Tensor, PendingRecv]] = dataclasses.field(default_factory=list)
    loss: torch.Tensor | None = None


@dataclasses.dataclass
class Counters:
    """Time and work since the last :meth:`Pipeline.take_counters`."""

    compute_s: float = 0.0
    wait_s: float = 0.0
    comm_s: float = 0.0
    losses: list[torch.Tensor] = dataclasses.field(default_factory=list)


def stage_role(topo: Topology, stage: int, talks: bool = True) -> S.Role:
    """What ``stage`` exchanges in this partition, so its action list holds only transfers that happen.

    ``talks``: False for the ranks of a TP group after its first (they get everything by broadcast).
    """
    inbound, outbound = topo.inbound(stage), topo.outbound(stage)
    return S.Role(loads_data=stage == 0 and talks, receives_inputs=bool(inbound) and talks,
                  sends_outputs=bool(outbound) and talks, receives_grads=any(not e.raw for e in outbound) and talks,
                  sends_grads=any(not e.raw for e in inbound) and talks, replicated=topo.replicas(stage) > 1)


def rank_schedule(topo: Topology, rank: int, schedule: str, microbatches: int, minibatches: int = 1) -> list[S.Action]:
    """The action list ``rank`` runs for a segment of ``minibatches`` minibatches of this partition."""
    stage = topo.stage_of(rank)
    return S.rank_actions(schedule, topo.num_stages, stage, microbatches, replicas=topo.replicas(stage),
                          replica=topo.replica_of(rank), role=stage_role(topo, stage, topo.tp_index_of(rank) == 0),
                          minibatches=minibatches, stage_replicas=[topo.replicas(s) for s in range(topo.num_stages)])


class Pipeline:
    """One rank's share of a partitioned model and the machinery to run its schedule."""

    def __init__(self, rank: int, entries: Sequence[StageEntry], module_to_stage: Sequence[int],
                 stage_ranks: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], *,
                 schedule: str, microbatches: int, optimizer: OptimizerFactory,
                 lr_scheduler: SchedulerFactory | None = None, device: torch.device | str = "cpu",
                 timeout_s: float = 60.0, tracer: Tracer | None = None, source: str = "conf.json",
                 hooks: Hooks | None = None, tp_degrees: Mapping[int, int] | None = None,
                 tp_plan: Mapping[str, str] | None = None, ties: Sequence[Tie] = ()):
        self.rank = rank
        self.schedule = schedule_kind(schedule, training=True).name
        self.microbatches = microbatches
        self.device = torch.device(device)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.tracer = tracer or Tracer(rank, enabled=False)
        self.counters = Counters()
        self.hooks = hooks or Hooks()
        self.comm = Communicator(rank, stage_of=lambda r: -1, tags={}, device=self.device, timeout_s=timeout_s)
        self.where_prefix = ""
        self.tp_plan = dict(tp_plan or {})
        self.tp_applied: list[tuple[str, str]] = []  # (module FQN, style) sharded on this rank
        self._build(entries, module_to_stage, stage_ranks, source, tp_degrees, ties)

    # -- building and rebuilding -------------------------------------------------------------

    def _build(self, entries: Sequence[StageEntry], module_to_stage: Sequence[int],
               stage_ranks: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], source: str,
               tp_degrees: Mapping[int, int] | Sequence[int] | None = None, ties: Sequence[Tie] = ()) -> None:
        io = [(ins, outs) for _, ins, outs in entries]
        topo = build_topology(io, module_to_stage, stage_ranks, source=source, tp_degrees=tp_degrees)
        if dist.is_initialized() and topo.world_size != dist.get_world_size():
            raise PipeshiftError(
                f"{source}: stage_to_rank_map uses {topo.world_size} ranks but {dist.get_world_size()} were started"
            )
        # every rank's list, replayed against the others before any process group exists
        # (the TP groups' leaders do the talking; the other ranks of a group mirror their leader)
        validate_schedule(self.schedule, tuple(tuple(r[::topo.tp_degree(s)]) for s, r in enumerate(topo.stage_ranks)),
                          self.microbatches)
        self.topology: Topology = topo
        self.stage_id = topo.stage_of(self.rank)
        self.replica = topo.replica_of(self.rank)
        self.replicas = topo.replicas(self.stage_id)
        self.tp_index = topo.tp_index_of(self.rank)
        self.is_first = self.stage_id == 0
        self.is_last = self.stage_id == topo.num_stages - 1
        mine = [entries[i] for i in topo.modules_of(self.stage_id)]
        self.tp, self.group = self._groups(topo)
        if self.tp is not None:
            self.tp_applied = self.tp.shard([m for m, _, _ in mine], self.tp_plan,
                                            f"stage {self.stage_id} (tensor-parallel degree {self.tp.degree})")
        self.stage = Stage(self.stage_id, mine, self.device, tp=self.tp)
        params = list(self.stage.params.values())
        if not params:  # a parameterless stage (pooling, say) still keeps its LR schedule in step
            params = [torch.nn.Parameter(torch.empty(0, device=self.device))]
        self.optimizer = self.optimizer_factory(params)
        self.lr_scheduler = self.scheduler_factory(self.optimizer) if self.scheduler_factory else None
        self._check_ties(ties, topo)
        self.ties = TieSync(ties, topo.stage_ranks, self.stage_id, self.stage.params, self.comm, self.comm.timeout_s)
        self._tied = self.ties.tied
        self.ties.broadcast_values()
        self.role = stage_role(topo, self.stage_id, self.tp_index == 0)
        # what a TP group's leader broadcasts before each forward: the stage's inputs from outside
        made = {n for _, _, outs in mine for n in outs}
        self._tp_inputs = sorted({n for _, ins, _ in mine for n in ins if n not in made})
        self._tp_meta: dict[tuple[str, str], TensorMeta] = {}
        self.comm.reset(topo.stage_of, dict(topo.tags))
        self._inflight: dict[int, _Microbatch] = {}
        self._actions: dict[tuple[str, int], list[S.Action]] = {}

    def _groups(self, topo: Topology) -> tuple[TensorParallel | None, Any]:
        """This rank's TP group and replica (gradient all-reduce) group.

        Every rank creates every group, in one order: per stage, its TP groups, then its replica
        groups (one per TP index: shards are all-reduced with the same shards of the other replicas).
        """
        if not dist.is_initialized():
            if any(len(r) > 1 for r in topo.stage_ranks):
                raise PipeshiftError("replicated or tensor-parallel stages need torch.distributed to be initialised")
            return None, None
        timeout = _timedelta(self.comm.timeout_s)
        tp = make_tp_groups(topo.stage_ranks, [topo.tp_degree(s) for s in range(topo.num_stages)], self.rank,
                            self.device, timeout)
        replica_group = None
        for s, ranks in enumerate(topo.stage_ranks):
            t = topo.tp_degree(s)
            if len(ranks) > t:
                for group_ranks in dp_groups(ranks, t):
                    group = dist.new_group(group_ranks, timeout=timeout)
                    if self.rank in group_ranks:
                        replica_group = group
        return tp, replica_group

    def _check_ties(self, ties: Sequence[Tie], topo: Topology) -> None:
        """1f1b steps once per replica group of backwards, so holders with different replica counts
        would step — and sum a tie's gradients — a different number of times."""
        if self.schedule != "1f1b":
            return
        for tie in ties:
            counts = {len(topo.stage_ranks[s]) for held in tie.values() for s in held if s < topo.num_stages}
            if len(counts) > 1:
                raise PipeshiftError(
                    f"1f1b with the tied parameter {next(iter(tie))!r} on stages with different replica counts: "
                    "their steps would not line up; use flush, gpipe or 2bw, or replicate those stages alike")

    def rebuild(self, entries: Sequence[StageEntry], module_to_stage: Sequence[int],
                stage_ranks: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], *,
                optimizer_state: Mapping[str, Any] | None = None, source: str = "repartition",
                ties: Sequence[Tie] = ()) -> None:
        """Switch to a new partition at a synchronisation point (no microbatch in flight).

        ``entries`` are the new stage modules (all stages, or at least this rank's, with this
        rank's weights already in place); ``optimizer_state`` is FQN-keyed
        (:func:`optimizer_state_by_fqn`) and may hold other stages' entries too. The LR
        scheduler keeps its position. Every rank must call this together (it creates groups).
        """
        if self._inflight:
            raise RuntimeError(f"rebuild with microbatches in flight: {sorted(self._inflight)}")
        if self.tp is not None or self.topology.tp_degrees:
            raise PipeshiftError("a job with tensor-parallel stages cannot repartition while it runs: checkpoint, "
                                 "then restart (--resume) on a package for the new plan")
        self.comm.flush()
        sched_state = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.stage.versions.clear()
        self._build(entries, module_to_stage, stage_ranks, source, ties=ties)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        if optimizer_state is not None:
            load_optimizer_state_by_fqn(self.optimizer, self.stage.params, optimizer_state)
        if sched_state is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(sched_state)

    # -- schedules ------------------------------------------------------------------------------

    def actions(self, minibatches: int = 1) -> list[S.Action]:
        """This rank's action list for a segment of ``minibatches`` minibatches (cached)."""
        key = ("train", minibatches)
        if key not in self._actions:
            self._actions[key] = rank_schedule(self.topology, self.rank, self.schedule, self.microbatches, minibatches)
        return self._actions[key]

    def eval_actions(self) -> list[S.Action]:
        key = ("eval", 1)
        if key not in self._actions:
            self._actions[key] = S.forward_only(self.microbatches, self.replicas, self.replica, self.role)
        return self._actions[key]

    # -- running --------------------------------------------------------------------------------

    def run(self, actions: Sequence[S.Action], fetch: Callable[[int], Batch] | None, *, train: bool = True,
            on_minibatch_end: Callable[[], None] | None = None, label: str = "") -> None:
        """Execute ``actions``; ``fetch(mb)`` gives the first stage its microbatches."""
        mode = "train" if train else "eval"
        self.stage.train(train)
        handlers = {
            S.LOAD: lambda a: self._load(a, fetch),
            S.RECV_FWD: lambda a: self._recv_fwd(a, mode),
            S.FWD: lambda a: self._fwd(a, train),
            S.SEND_FWD: lambda a: self._send_fwd(a, mode, train),
            S.RECV_BWD: self._recv_bwd,
            S.BWD: self._bwd,
            S.SEND_BWD: self._send_bwd,
            S.ALLREDUCE: self._allreduce,
            S.STEP: lambda a: self._step(a, on_minibatch_end),
            S.FLUSH: self._flush,
        }
        self.where_prefix = label
        for index, action in enumerate(actions):
            self.comm.where = f"{self.where_prefix}action #{index} '{action}'"
            handlers[action.kind](action)

    def take_counters(self) -> Counters:
        c = self.counters
        c.wait_s, c.comm_s = self.comm.wait_s, self.comm.comm_s
        self.comm.wait_s = self.comm.comm_s = 0.0
        self.counters = Counters()
        return c

    def _mb(self, mb: int) -> _Microbatch:
        state = self._inflight.get(mb)
        if state is None:
            state = self._inflight[mb] = _Microbatch()
        return state

    def _compute(self, name: str, start: float, slow: bool = False, **args: Any) -> None:
        end = time.perf_counter()
        if slow and self.hooks.after_compute:  # an experiment's emulated slower worker, say
            self.hooks.computed(end - start)
            end = time.perf_counter()
        self.counters.compute_s += end - start
        self.tracer.add(name, COMPUTE, start, end, **args)

    def _load(self, a: S.Action, fetch: Callable[[int], Batch] | None) -> None:
        if fetch is None:
            raise RuntimeError("the first stage needs a data source")
        t0 = time.perf_counter()
        inputs, target = fetch(a.mb)
        env = self._mb(a.mb).env
        for i, t in enumerate(inputs):
            env[f"input{i}"] = t.to(self.device, non_blocking=True)
        env[TARGET] = target.to(self.device, non_blocking=True)
        missing = [n for n in self.topology.raw_inputs if n not in env]
        if missing:
            raise PipeshiftError(f"the data gives {len(inputs)} inputs but the model reads {missing}")
        self._compute(f"load {a.mb}", t0)

    def _recv_fwd(self, a: S.Action, mode: str) -> None:
        state = self._mb(a.mb)
        for e in self.topology.inbound(self.stage_id):
            src = self.topology.rank_for(e.src, a.mb)
            state.recvs.append((e.name, self.comm.recv(e.name, src, ACT, a.mb, mode=mode)))

    def _fwd(self, a: S.Action, train: bool) -> None:
        state = self._mb(a.mb)
        t0 = time.perf_counter()
        for name, pending in state.recvs:
            t = self.comm.wait(pending)
            state.env[name] = t
            if train and t.requires_grad:
                state.received.append((name, pending.src, t))
        state.recvs = []
        if self.tp is not None:
            self._tp_share_inputs(a.mb, state, "train" if train else "eval")
        t1 = time.perf_counter()
        if t1 - t0 > 1e-5:
            self.tracer.add(f"wait F{a.mb}", COMM, t0, t1)
        weights = None
        if train and a.stashed:
            if a.snapshot:
                self.stage.versions.snapshot(a.version)
            weights = self.stage.versions.get(a.version)
        with torch.set_grad_enabled(train):
            self.stage.forward(state.env, weights)
        if self.is_last:
            state.loss = state.env[LOSS]
            self.counters.losses.append(state.loss.detach())
        self._compute(f"F{a.mb}", t1, slow=True, version=a.version)
        if not self.role.sends_outputs:
            if train and self.tp is not None and not self.tp.is_leader:  # the leader records them as it sends
                for e in self.topology.outbound(self.stage_id):
                    if not e.raw and state.env[e.name].requires_grad:
                        state.outputs.append((e.name, -1, state.env[e.name]))
            self._finish_forward(a.mb, state, train)

    def _tp_share_inputs(self, mb: int, state: _Microbatch, mode: str) -> None:
        """The TP leader's view of the stage's inputs, on every rank of the group (shapes sent once)."""
        tp = self.tp
        assert tp is not None
        for name in self._tp_inputs:
            key = (name, mode)
            meta = self._tp_meta.get(key)
            if meta is None:
                mine = state.env.get(name) if tp.is_leader else None
                row = (TensorMeta.of(mine).encode(self.device) if mine is not None
                       else torch.zeros(_META_ROW, dtype=torch.int64, device=self.device))
                self.comm.broadcast(row, tp.leader, tp.group, f"sharing the shape of {name!r} in the TP group")
                meta = self._tp_meta[key] = TensorMeta.decode(row)
            if tp.is_leader:
                t = state.env[name]
                self.comm.broadcast(t.detach().contiguous(), tp.leader, tp.group, f"sharing {name!r} of microbatch {mb} in the "
                                                                     "TP group")
            else:
                t = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
                self.comm.broadcast(t, tp.leader, tp.group, f"receiving {name!r} of microbatch {mb} from the TP "
                                                            f"group's leader (rank {tp.leader})")
                if mode == "train" and meta.requires_grad:
                    t.requires_grad_(True)
                state.env[name] = t


    def _send_fwd(self, a: S.Action, mode: str, train: bool) -> None:
        state = self._mb(a.mb)
        for e in self.topology.outbound(self.stage_id):
            t = state.env[e.name]
            dst = self.topology.rank_for(e.dst, a.mb)
            self.comm.send(t, e.name, dst, ACT, a.mb, mode=mode)
            if train and not e.raw and t.requires_grad:
                state.outputs.append((e.name, dst, t))
        self._finish_forward(a.mb, state, train)

    def _finish_forward(self, mb: int, state: _Microbatch, train: bool) -> None:
        state.env = {}  # what backward needs is held by the autograd graph
        if not train:
            del self._inflight[mb]

    def _recv_bwd(self, a: S.Action) -> None:
        state = self._inflight[a.mb]
        for name, dst, t in state.outputs:
            pending = self.comm.recv(name, dst, GRAD, a.mb, like=TensorMeta.of(t))
            state.grad_recvs.append((t, pending))

    def _bwd(self, a: S.Action) -> None:
        state = self._inflight[a.mb]
        t0 = time.perf_counter()
        grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for t, pending in state.grad_recvs:
            g = self.comm.wait(pending)
            if id(t) in grads:  # one output read by several stages: sum their gradients
                grads[id(t)] = (t, grads[id(t)][1] + g)
            else:
                grads[id(t)] = (t, g)
        if self.tp is not None:
            grads = self._tp_share_grads(a.mb, state, grads)
        t1 = time.perf_counter()
        if t1 - t0 > 1e-5:
            self.tracer.add(f"wait B{a.mb}", COMM, t0, t1)
        tensors = [t for t, _ in grads.values()]
        grad_tensors = [g for _, g in grads.values()]
        if state.loss is not None and state.loss.requires_grad:
            tensors.append(state.loss)
            grad_tensors.append(torch.ones_like(state.loss))
        if tensors:
            torch.autograd.backward(tensors, grad_tensors)
        if a.stashed:
            self.stage.versions.harvest_grads(a.version)
        if a.release:
            self.stage.versions.release(a.version)
        state.outputs, state.grad_recvs, state.loss = [], [], None
        self._compute(f"B{a.mb}", t1, slow=True, version=a.version)
        if not self.role.sends_grads:
            del self._inflight[a.mb]

    def _tp_share_grads(self, mb: int, state: _Microbatch,
                        grads: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The leader's received output gradients, on every rank of the TP group (in output order)."""
        tp = self.tp
        assert tp is not None
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, _dst, t in state.outputs:
            if id(t) in out:
                continue
            g = grads[id(t)][1] if tp.is_leader else torch.empty_like(t, memory_format=torch.contiguous_format)
            g = g.contiguous()
            self.comm.broadcast(g, tp.leader, tp.group, f"sharing the gradient of {name!r} of microbatch {mb} "
                                                        "in the TP group")
            out[id(t)] = (t, g)
        return out

    def _send_bwd(self, a: S.Action) -> None:
        state = self._inflight.pop(a.mb)
        for name, src, leaf in state.received:
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            self.comm.send(g, name, src, GRAD, a.mb)

    def _allreduce(self, a: S.Action) -> None:
        grads = []
        for p in self.stage.params.values():
            if p.requires_grad and id(p) not in self._tied:  # a tie sums over all its holders at the step
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(local(p.grad))  # a sharded parameter's shard, summed with the same shard elsewhere
        t0 = time.perf_counter()
        ranks = list(self.topology.stage_ranks[self.stage_id])
        self.comm.all_reduce(grads, self.group, f"summing gradients over the replicas of stage {self.stage_id} "
                                                f"(ranks {ranks})")
        self.tracer.add("allreduce", COMM, t0, time.perf_counter())

    def _step(self, a: S.Action, on_minibatch_end: Callable[[], None] | None) -> None:
        if self.ties.mine:
            t1 = time.perf_counter()
            self.ties.all_reduce_grads()
            self.tracer.add("tie allreduce", COMM, t1, time.perf_counter())
        t0 = time.perf_counter()
        if a.snapshot:
            self.stage.versions.snapshot(a.version)
        if a.grads > 1:
            for p in self.stage.params.values():
                if p.grad is not None:
                    p.grad.div_(a.grads)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if a.minibatch_end and self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self._compute("step", t0)
        if a.minibatch_end and on_minibatch_end is not None:
            on_minibatch_end()

    def _flush(self, a: S.Action) -> None:
        t0 = time.perf_counter()
        self.comm.flush()
        self.tracer.add("flush", COMM, t0, time.perf_counter())
        if self._inflight:
            raise RuntimeError(f"schedule ended with microbatches in flight: {sorted(self._inflight)}")


# -- optimizer state by FQN --------------------------------------------------------------------


def optimizer_state_by_fqn(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters named by FQN instead of position.

    A layer that moves to another stage takes its entry with it; the receiving stage's
    optimizer loads it with :func:`load_optimizer_state_by_fqn`.
    """
    name_of = {id(p): n for n, p in params.items()}
    sd = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    groups = []
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        names = [name_of.get(id(p)) for p in group["params"]]  # None: a parameterless stage's placeholder
        index_to_name.update((i, n) for i, n in zip(saved["params"], names) if n is not None)
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": [n for n in names if n]})
    state = {index_to_name[i]: s for i, s in sd["state"].items() if i in index_to_name}
    return {"state": state, "param_groups": groups}


def load_optimizer_state_by_fqn(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter],
                                saved: Mapping[str, Any]) -> None:
    """Load the entries of ``saved`` (FQN-keyed) that name this optimizer's parameters.

    Hyper-parameters (``lr`` …) come from the saved group holding the first such parameter, so a
    scheduler-modified learning rate survives.
    """
    name_of = {id(p): n for n, p in params.items()}
    saved_state = saved.get("state", {})
    saved_groups = saved.get("param_groups", [])
    group_of_name = {n: g for g in saved_groups for n in g.get("params", [])}
    current = optimizer.state_dict()
    state: dict[int, Any] = {}
    groups = []
    for group, cur in zip(optimizer.param_groups, current["param_groups"]):
        names = [name_of.get(id(p)) for p in group["params"]]
        for index, name in zip(cur["params"], names):
            if name is not None and name in saved_state:
                state[index] = saved_state[name]
        hyper = next((group_of_name[n] for n in names if n in group_of_name), cur)
        groups.append({**{k: v for k, v in hyper.items() if k != "params"}, "params": cur["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _timedelta(seconds: float) -> timedelta:

    return timedelta(seconds=seconds)
