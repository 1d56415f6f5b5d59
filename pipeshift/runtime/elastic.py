"""When and to what a running job repartitions, and how every rank comes to agree on it.

The :class:`Controller` runs at the trainer's synchronisation points. Every ``--report-every K``
minibatches (the *control tick*, a synchronisation point for every schedule: for ``1f1b``/``2bw``
the pipeline is drained there) it

1. measures this rank's compute, wait and communication time per minibatch over the window and
   reports them to the master (``--master``), if any;
2. on rank 0 only, decides: an operator's command polled from the master (``pipeshift ctl
   repartition`` / ``resize``), or the in-process policy (``--policy auto``: the hysteresis and
   gain-versus-cost rules of :mod:`pipeshift.runtime.policy`, fed with every rank's measured
   times gathered over torch.distributed);
3. broadcasts the decision from rank 0 (a few bytes of JSON, or the new plan), so every rank
   switches at the same step or none does.

Forced switches (``--repartition-at STEP:PLAN``) need no agreement: every rank knows them. A
switch is :meth:`Repartitioner.switch <pipeshift.runtime.repartition.Repartitioner.switch>`,
preceded by a checkpoint when ``--checkpoint-dir`` is set, so a rank dying mid-migration costs
nothing: the restart resumes from the step the migration started at. A *resize* (planned
removal or addition of workers) writes a checkpoint and ``elastic.json`` and ends every rank
with :data:`EXIT_REGROUP`; the elastic supervisor (``pipeshift launch --local N --elastic``) or
torchrun restarts the job with the new number of ranks, and :func:`resume_plan` re-plans for it.

Decisions and migrations are logged as JSON lines in the output directory (rank 0):
``decisions.jsonl`` (every policy verdict with its numbers) and ``repartitions.jsonl`` (every
switch: step, source, new stages, bytes moved, pause per rank).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.plan import read_plan
from pipeshift.runtime import checkpoint as ckpt
from pipeshift.runtime.control import Connect, ControlPlane
from pipeshift.runtime.local import LocalBuild, local_entries
from pipeshift.runtime.repartition import Repartitioner, check_plan

MAX_WORLD_SIZE = 1 << 16  # a resize beyond this is refused by rank 0 whatever the master let through
EXIT_REGROUP = 75  # every rank exits with this after a resize: restart me with elastic.json's world size
ELASTIC_FILE = "elastic.json"


# -- flags --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForcedSwitch:
    """``--repartition-at STEP:PLAN``: switch to ``plan`` at the synchronisation point after step ``step``."""

    index: int
    step: int
    path: str
    plan: dict[str, Any]


def read_plan_file(path: str) -> dict[str, Any]:
    return read_plan(path).to_json()


def parse_repartition_at(values: Sequence[str]) -> list[ForcedSwitch]:
    out = []
    for index, text in enumerate(values or []):
        step, sep, path = text.partition(":")
        if not sep or not step.strip().isdigit() or not path:
            raise PipeshiftError(f"--repartition-at {text!r}: expected STEP:PLAN_JSON, e.g. 20:plan3/plan.json")
        out.append(ForcedSwitch(index, int(step), path, read_plan_file(path)))
    return sorted(out, key=lambda f: (f.step, f.index))


def file_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(json.dumps(read_plan_file(path), sort_keys=True).encode())
    return h.hexdigest()


# -- plans after a restart ----------------------------------------------------------------------


def plan_world_size(plan: Mapping[str, Any]) -> int:
    from pipeshift.runtime.repartition import plan_stage_ranks

    return sum(len(r) for r in plan_stage_ranks(plan))


def find_graph(plan: Mapping[str, Any], package_dir: Path | None, explicit: str | None) -> Path | None:
    """The profiled graph.txt behind ``plan``: ``--graph``, else the plan's ``graph`` where it resolves."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise PipeshiftError(f"--graph {explicit}: no such file")
        return p
    named = plan.get("graph")
    if not isinstance(named, str) or not named or "\x00" in named:
        return None
    g = Path(named)
    candidates = [g]
    if package_dir is not None and not g.is_absolute():  # plan.json's graph is relative to the plan's directory
        candidates = [package_dir / g, g, package_dir.parent / g, package_dir / g.name, package_dir.parent / g.name]
    return next((c for c in candidates if c.is_file()), None)


def load_chain(plan: Mapping[str, Any], graph: Path | None, optimizer: str):
    """The policy's view of the model (per-node times); ``None`` without a graph."""
    if graph is None:
        return None
    from pipeshift.graph.graphtxt import read_graph_txt
    from pipeshift.runtime.policy import chain_from_graph

    return chain_from_graph(read_graph_txt(graph), optimizer=optimizer)


def replan_for_workers(plan: Mapping[str, Any], workers: int, chain=None) -> dict[str, Any]:
    """``plan`` re-split into ``workers`` single-rank stages (after a shrink or a grow).

    With the profiled graph (``chain``) this is the policy's exact straight-pipeline DP on the
    profiled times; without it, the nodes in plan order are split into equal counts.
    """
    from pipeshift.runtime.policy import ReplanRequest, builtin_replan, stages_of

    order = [n for stage in stages_of(plan) for n in stage]
    if chain is not None and sorted(chain.node_ids) == sorted(order):
        cut = np.zeros(len(chain) + 1)
        request = ReplanRequest(node_ids=list(chain.node_ids), node_times_s=np.tile(chain.node_times_s, (workers, 1)),
                                speed_factors=np.ones(workers), cut_comm_s=cut, current_stages=stages_of(plan),
                                glued=chain.glued)
        stages = builtin_replan(request)
        fqn_of = chain.node_fqns
        how = "profiled times"
    else:
        # without times: equal node counts, inputs kept with the next node
        bounds = np.linspace(0, len(order), workers + 1).round().astype(int)
        stages = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        fqn_of = {}
        how = "equal node counts"
    if len(stages) != workers or any(not s for s in stages):
        raise PipeshiftError(f"cannot split {len(order)} nodes over {workers} workers")
    out = {k: v for k, v in plan.items() if k not in ("stages", "predicted", "memory_per_worker_bytes")}
    out["num_workers"] = workers
    out["stages"] = [{"stage_id": k, "nodes": list(nodes), "fqns": list(dict.fromkeys(fqn_of[n] for n in nodes
                                                                                     if n in fqn_of)),
                      "replicas": 1, "ranks": [k]} for k, nodes in enumerate(stages)]
    out["replanned"] = {"workers": workers, "from": how}
    return out


def resume_plan(checkpoint_dir: str | None, world_size: int, package_plan: dict[str, Any] | None,
                chain=None) -> tuple[dict[str, Any] | None, str]:
    """The plan a (re)started job runs: the checkpoint's, re-planned if the worker count changed.

    ``None`` means "the stage package as it is". The checkpoint records the plan in force when it
    was written (``plan.json`` in its step directory), so a restart after any number of switches
    resumes on the same partition — every FQN loads onto any partition anyway.
    """
    if not checkpoint_dir:
        return None, ""
    root = Path(checkpoint_dir)
    if not (root / ckpt.LATEST).exists() and not (root / "meta.json").exists():
        return None, ""
    where = ckpt.choose(root)[0]
    saved = where / "plan.json"
    plan = read_plan_file(str(saved)) if saved.is_file() else None
    base = plan or package_plan
    if base is None:
        return None, ""
    if plan_world_size(base) == world_size:
        return plan, (f"the partition of checkpoint {where.name}" if plan else "")
    new = replan_for_workers(base, world_size, chain)
    return new, (f"checkpoint {where.name} ran on {plan_world_size(base)} workers; re-planned for {world_size} "
                 f"({new['replanned']['from']})")


# -- the controller -----------------------------------------------------------------------------


@dataclasses.dataclass
class ControlConfig:
    report_every: int = 10
    policy: str = "off"  # "off" or "auto" (in-process, decided on rank 0)
    master: bool = False  # --master given (the same on every rank, whether or not it answers)
    total_steps: int = 0
    output_dir: Path = Path(".")


@dataclasses.dataclass
class _Scheduled:
    """A switch every rank has agreed on, to happen at the synchronisation point after ``step``."""

    step: int
    plan: dict[str, Any]
    source: str
    strict: bool  # a forced switch: a plan that does not fit is an error, not a logged refusal
    prepared: Any
    forced_index: int | None = None
    command_id: int | None = None


class Controller:
    """What runs at the trainer's synchronisation points; see the module docstring.

    A switch agreed at one synchronisation point happens at the next one (the following step):
    in between, every rank renders the new stages and — in a background thread, while training
    goes on — allocates and touches the buffers the migration will land in, so the pause holds
    little more than the transfer itself.
    """

    def __init__(self, rank: int, world_size: int, repartitioner: Repartitioner | None, config: ControlConfig, *,
                 forced: Sequence[ForcedSwitch] = (), master=None, policy=None, chain=None):
        self.rank = rank
        self.world_size = world_size
        self.repartitioner = repartitioner
        self.config = config
        self.forced = list(forced)
        self.master = master
        self.policy = policy
        self.chain = chain
        self.applied: list[int] = []  # indices of forced switches already applied
        self.scheduled: list[_Scheduled] = []
        self.pending: list[dict[str, Any]] = []  # rank 0: operator commands waiting for their at_step
        self._window = np.zeros(3)
        self._window_steps = 0
        self._ticks_since_switch = 0
        self.switches = 0
        self.last_rejection = ""
        self.log_dir = Path(config.output_dir)

    # -- what the trainer asks ----------------------------------------------------------------

    @property
    def ticking(self) -> bool:
        return self.config.report_every > 0 and (self.config.master or self.config.policy == "auto")

    @property
    def plan(self) -> dict[str, Any] | None:
        return None if self.repartitioner is None else self.repartitioner.plan

    def next_sync(self, step: int) -> int | None:
        """The next step after ``step`` that must end a segment (asynchronous schedules)."""
        candidates = [f.step for f in self.forced if f.step > step and f.index not in self.applied]
        candidates += [x.step for x in self.scheduled if x.step > step]
        if self.ticking:
            k = self.config.report_every
            candidates.append((step // k + 1) * k)
        return min(candidates) if candidates else None

    def on_minibatch(self, trainer, counters) -> None:
        self._window += (counters.compute_s, counters.wait_s, counters.comm_s)
        self._window_steps += 1

    def at_start(self, trainer) -> None:
        """After a resume: apply the forced switches of the resumed step not applied before it."""
        self.applied = list(trainer.resumed_switches)
        if self.rank == 0 and self.plan is not None:
            self._master("announce_plan", self.plan, trainer.step)
        self._forced(trainer)
        self._prefetch_forced(trainer)

    def at_boundary(self, trainer) -> str | None:
        """Called at every synchronisation point; returns ``"regroup"`` when the job must restart."""
        if trainer.step >= self.config.total_steps:
            return None
        for item in [x for x in self.scheduled if x.step == trainer.step]:
            self.scheduled.remove(item)
            self._execute(trainer, item)
        self._forced(trainer)
        k = self.config.report_every
        if self.ticking and trainer.step % k == 0:
            if self._tick(trainer) == "regroup":
                return "regroup"
        self._prefetch_forced(trainer)
        return None

    # -- forced switches ------------------------------------------------------------------------

    def _forced(self, trainer) -> None:
        """Forced switches due now that were not prepared a step ahead (e.g. right after a resume)."""
        for f in self.forced:
            if f.step == trainer.step and f.index not in self.applied:
                item = self._schedule(trainer, f.plan, f"--repartition-at {f.step}:{f.path}", strict=True,
                                      forced_index=f.index, at=trainer.step, reserve=False)
                self.scheduled.remove(item)
                self._execute(trainer, item)

    def _prefetch_forced(self, trainer) -> None:
        for f in self.forced:
            due = f.step == trainer.step + 1 and f.index not in self.applied
            if due and not any(x.forced_index == f.index for x in self.scheduled):
                self._schedule(trainer, f.plan, f"--repartition-at {f.step}:{f.path}", strict=True,
                               forced_index=f.index, at=f.step)

    # -- the tick -------------------------------------------------------------------------------

    def _tick(self, trainer) -> str | None:
        p = trainer.pipeline
        steps = max(self._window_steps, 1)
        mine = {"stage": p.stage_id, "compute_s": self._window[0] / steps, "wait_s": self._window[1] / steps,
                "comm_s": self._window[2] / steps}
        self._window[:] = 0.0
        self._window_steps = 0
        self._master("report", trainer.step, {p.stage_id: {k: v for k, v in mine.items() if k != "stage"}},
                     window_steps=steps, total_steps=self.config.total_steps)
        measured = None
        self._ticks_since_switch += 1
        if self.config.policy == "auto":
            text = json.dumps(mine).encode()
            everyone = [json.loads(b) for b in p.comm.all_gather_bytes(text, f"gathering stage times at step "
                                                                             f"{trainer.step}")]
            measured = _per_stage(everyone, p.topology.num_stages)
        message = self._decide(trainer, measured) if self.rank == 0 else None
        data = p.comm.broadcast_bytes(json.dumps(message).encode() if message else None,
                                      f"agreeing on the control decision at step {trainer.step}")
        decided = json.loads(data) if data else None
        if not decided:
            return None
        if decided["action"] == "switch":
            if trainer.step + 1 >= self.config.total_steps:
                self._reject(trainer, decided["source"], "the run ends at the next step")
                ok = False
            else:
                ok = self._schedule(trainer, decided["plan"], decided["source"], strict=False,
                                    command_id=decided.get("id"), at=trainer.step + 1) is not None
            if not ok and decided.get("id") is not None:
                self._master("ack", decided["id"], f"rejected: {self.last_rejection}")
            return None
        if decided["action"] == "resize":
            return self._resize(trainer, int(decided["world_size"]), decided)
        return None

    def _decide(self, trainer, measured: list[float] | None) -> dict[str, Any] | None:
        """Rank 0: an operator's command whose step has come, else the policy's verdict."""
        if self.master is not None:
            command = self._master("poll")
            while command is not None:
                self.pending.append(command)
                command = self._master("poll")
        for command in list(self.pending):
            at = command.get("at_step")
            if not isinstance(at, int) or isinstance(at, bool) or at < 0:
                at = 0 if at is None else self.config.total_steps + 1  # malformed: never due
            # a repartition's at_step is the step it switches after (the one agreed here, plus one);
            # a resize's is the tick it stops at
            ahead = 1 if command.get("type") == "repartition" else 0
            if at <= trainer.step + ahead:
                self.pending.remove(command)
                if command.get("type") == "repartition" and isinstance(command.get("plan"), dict):
                    return {"action": "switch", "plan": command["plan"], "id": command.get("id"),
                            "source": f"{command.get('source', 'operator')} command #{command.get('id')}"}
                size = command.get("world_size")
                if (command.get("type") == "resize" and isinstance(size, int) and not isinstance(size, bool)
                        and 1 <= size <= MAX_WORLD_SIZE):
                    return {"action": "resize", "world_size": command["world_size"], "id": command.get("id"),
                            "source": f"{command.get('source', 'operator')} command #{command.get('id')}"}
                self._log("repartitions.jsonl", {"event": "command_ignored", "step": trainer.step, "command":
                                                 {k: v for k, v in command.items() if k != "plan"}})
        if self.policy is None or measured is None or self.plan is None:
            return None
        self.policy.plan = self.plan
        remaining = max(self.config.total_steps - trainer.step, 0)
        decision, plan = self.policy.observe(measured, step=trainer.step, remaining_steps=remaining)
        self._log("decisions.jsonl", decision.to_json())
        if plan is None:
            return None
        return {"action": "switch", "plan": plan, "id": None, "source": f"policy (window {decision.window})"}

    # -- carrying it out ------------------------------------------------------------------------

    def _schedule(self, trainer, plan: dict[str, Any], source: str, strict: bool, at: int, reserve: bool = True,
                  forced_index: int | None = None, command_id: int | None = None) -> _Scheduled | None:
        """Check and render ``plan`` now (every rank alike) and reserve its landing buffers; None if refused."""
        rp = self.repartitioner
        if rp is None:
            raise PipeshiftError("repartitioning needs a stage package written by `pipeshift codegen`")
        try:
            check_plan(plan, self.world_size, trainer.config.microbatches,
                       (rp.plan or {}).get("model"), source=source, running=rp.plan)
            prepared, error = rp.prepare(plan), None
        except PipeshiftError as e:
            prepared, error = None, str(e)
        if not strict:
            # A plan refused by any rank (rendering ran out of memory there, say) is refused by all:
            # nobody may start a switch the others will not join.
            errors = [json.loads(b) for b in trainer.pipeline.comm.all_gather_bytes(
                json.dumps(error).encode(), f"agreeing on {source}")]
            error = next((f"rank {r}: {e}" if e != error else e for r, e in enumerate(errors) if e), None)
        if error is not None:
            if strict:
                raise PipeshiftError(error)
            self._reject(trainer, source, error)
            return None
        if reserve:
            rp.reserve(prepared, trainer.pipeline.optimizer, trainer.pipeline.device,
                       ahead=trainer.pipeline.hooks.reserve_landing_buffers)
        item = _Scheduled(at, plan, source, strict, prepared, forced_index, command_id)
        self.scheduled.append(item)
        return item

    def _execute(self, trainer, item: _Scheduled) -> None:
        self._switch(trainer, item.plan, item.source, item.prepared)
        if item.forced_index is not None:
            self.applied.append(item.forced_index)
        if item.command_id is not None:
            self._master("ack", item.command_id, "applied")

    def _switch(self, trainer, plan: dict[str, Any], source: str, prepared) -> None:
        p, rp = trainer.pipeline, self.repartitioner
        if trainer.config.checkpoint_dir and trainer.last_saved != trainer.step:
            trainer.save()  # the consistent state a failed migration restarts from
        t0 = time.perf_counter()
        where = f"repartition after step {trainer.step} ({source})"
        p.comm.where = where
        report = rp.switch(p, prepared, where=where)
        everyone = [json.loads(b) for b in p.comm.all_gather_bytes(json.dumps(report).encode(),
                                                                   f"collecting the migration report at step "
                                                                   f"{trainer.step}")]
        self.switches += 1
        self._ticks_since_switch = 0
        trainer.after_switch()
        self._window[:] = 0.0
        self._window_steps = 0
        if self.policy is not None:
            from pipeshift.runtime.policy import stages_of

            if stages_of(plan) != self.policy.policy.stages:  # an operator's or forced plan: the policy follows it
                self.policy.adopt_plan(plan)
            self.policy.record_pause(max(r["pause_s"] for r in everyone))
        if self.rank == 0:
            self._master("announce_plan", plan, trainer.step)
            record = {
                "event": "repartition", "step": trainer.step, "source": source,
                "stages": [st.get("nodes") for st in plan["stages"]],
                "ranks": [st.get("ranks") for st in plan["stages"]],
                "keys_moved": everyone[0]["keys_moved_total"],
                "bytes_moved": sum(r["bytes_sent"] for r in everyone),
                "messages": sum(r["messages"] for r in everyone),
                "pause_s": max(r["pause_s"] for r in everyone),
                "wall_s": time.perf_counter() - t0,
                "per_rank": everyone,
            }
            self._log("repartitions.jsonl", record)
            print(f"pipeshift train: repartitioned after step {trainer.step} ({source}): "
                  f"{len(plan['stages'])} stages, {record['keys_moved']} tensors moved "
                  f"({record['bytes_moved'] / 1e6:.2f} MB), pause {record['pause_s']:.3f} s",
                  file=sys.stderr, flush=True)
        # every rank: one line and its own part of the record, beside its metrics
        mine = {"event": "repartition", "step": trainer.step, "source": source, **report}
        self._log_own(trainer, mine)
        nodes = plan["stages"][report["stage"]].get("nodes") or []
        print(f"pipeshift train: rank {self.rank}: switched after step {trainer.step} ({source}): now stage "
              f"{report['stage']} ({len(nodes)} nodes), sent {report['keys_sent']} tensors "
              f"({report['bytes_sent'] / 1e6:.2f} MB), received {report['keys_received']} "
              f"({report['bytes_received'] / 1e6:.2f} MB), pause {report['pause_s']:.3f} s",
              file=sys.stderr, flush=True)

    def _log_own(self, trainer, record: dict[str, Any]) -> None:
        """This rank's own line in ``rankR/repartitions.jsonl`` (every rank writes one per switch)."""
        out = Path(trainer.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "repartitions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "rank": self.rank, **record}, default=_json_default) + "\n")

    def _reject(self, trainer, source: str, why: str) -> None:
        self.last_rejection = why
        if self.rank == 0:
            self._log("repartitions.jsonl", {"event": "rejected", "step": trainer.step, "source": source,
                                             "reason": why})
            print(f"pipeshift train: repartition from {source} rejected: {why}", file=sys.stderr, flush=True)

    def _resize(self, trainer, world_size: int, decided: Mapping[str, Any]) -> str | None:
        cfg = trainer.config
        if world_size < 1 or not cfg.checkpoint_dir or world_size == self.world_size:
            why = ("needs --checkpoint-dir (the restarted ranks resume from it)" if not cfg.checkpoint_dir
                   else f"{world_size} workers requested, the job has {self.world_size}")
            self._reject(trainer, decided.get("source", "resize"), why)
            if decided.get("id") is not None:
                self._master("ack", decided["id"], f"rejected: {why}")
            return None
        if trainer.last_saved != trainer.step:
            trainer.save()
        if self.rank == 0:
            ckpt.write_json({"world_size": world_size, "step": trainer.step, "source": decided.get("source"),
                             "time": time.time()}, Path(cfg.checkpoint_dir) / ELASTIC_FILE)
            self._log("repartitions.jsonl", {"event": "resize", "step": trainer.step, "from": self.world_size,
                                             "to": world_size, "source": decided.get("source")})
            print(f"pipeshift train: resizing to {world_size} workers after step {trainer.step}: checkpoint "
                  f"written, every rank exits with {EXIT_REGROUP} for the restart", file=sys.stderr, flush=True)
        if decided.get("id") is not None:
            self._master("ack", decided["id"], "applied")
        trainer.pipeline.comm.barrier(f"stopping for a resize after step {trainer.step}")
        return "regroup"

    def _master(self, call: str, *args: Any, **kwargs: Any) -> Any:
        """One request to the master; it refusing one (say, an ack it forgot) never stops training."""
        if self.master is None:
            return None
        try:
            return getattr(self.master, call)(*args, **kwargs)
        except PipeshiftError as e:
            print(f"pipeshift train: rank {self.rank}: the master: {e}", file=sys.stderr, flush=True)
            return None

    def _log(self, name: str, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **record}, default=_json_default) + "\n")

    def close(self) -> None:
        if self.master is not None:
            self.master.close()


def _per_stage(everyone: Sequence[Mapping[str, Any]], num_stages: int) -> list[float]:
    """Measured compute per stage: the mean over its replicas."""
    sums, counts = np.zeros(num_stages), np.zeros(num_stages)
    for r in everyone:
        sums[int(r["stage"])] += float(r["compute_s"])
        counts[int(r["stage"])] += 1
    return (sums / np.maximum(counts, 1)).tolist()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# -- setting a job up -----------------------------------------------------------------------------


def package_plan(pkg) -> dict[str, Any] | None:
    """The package's plan.json with each stage's ranks taken from conf.json; None if it lists no stages."""
    plan = pkg.plan
    stages = plan.get("stages") if isinstance(plan, dict) else None
    if not isinstance(stages, list) or not stages:
        return None
    if len(stages) != pkg.num_stages:
        raise InputFileError(str(pkg.path / "plan.json"), None,
                             f"lists {len(stages)} stages but conf.json has {pkg.num_stages}")
    out = dict(plan)
    out["stages"] = [{**st, "ranks": list(pkg.stage_to_rank[k]), "replicas": len(pkg.stage_to_rank[k])}
                     for k, st in enumerate(stages)]
    return out


def _optimizer_kind(args) -> str:
    name = str(args.optimizer).lower()
    if name in ("adam", "adamw"):
        return name
    if name == "sgd":
        return "momentum" if args.momentum else "sgd"
    return "adam"  # unknown optimizers: assume two state tensors per parameter


def policy_config(items: Sequence[str]):
    from pipeshift.runtime.policy import PolicyConfig
    from pipeshift.spec import parse_model_args

    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    values = parse_model_args(items)
    unknown = sorted(set(values) - known)
    if unknown:
        raise PipeshiftError(f"--policy-arg: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    try:
        return PolicyConfig(**values)
    except TypeError as e:
        raise PipeshiftError(f"--policy-arg: {e}") from None


@dataclasses.dataclass
class Job:
    """How this rank starts: its module list, the partition, and what drives repartitioning."""

    entries: list | None
    rank: int
    world_size: int
    args: Any
    repartitioner: Repartitioner | None = None
    module_to_stage: list[int] | None = None
    stage_ranks: list[list[int]] | None = None
    source: str | None = None
    note: str = ""
    agreed: dict[str, Any] = dataclasses.field(default_factory=dict)
    forced: list[ForcedSwitch] = dataclasses.field(default_factory=list)
    master: ControlPlane | None = None
    connect: Connect | None = None  # how to reach the master (``--master``)
    policy: Any = None
    chain: Any = None
    local: LocalBuild | None = None  # which tensors this rank materialised, and read from --init-from

    def controller(self, pipeline, cfg) -> Controller | None:
        args = self.args
        if not (self.repartitioner or self.forced or args.master or args.policy == "auto"):
            return None  # nothing to decide, and the package's own partition: checkpoints need no plan
        config = ControlConfig(report_every=args.report_every, policy=args.policy, master=bool(args.master),
                               total_steps=cfg.steps, output_dir=Path(cfg.output_dir))
        return Controller(self.rank, self.world_size, self.repartitioner, config, forced=self.forced,
                          master=self.master, policy=self.policy, chain=self.chain)


def prepare_job(args, pkg, bundle, rank: int, world_size: int, connect: Connect | None = None) -> Job:
    """Everything this rank needs before the start-up agreement (errors then reach every rank).

    The plan in force is the package's, or after a restart the checkpoint's (re-planned when the
    number of ranks changed). Stages are built over this rank's full model whenever anything may
    repartition, so a switch moves references, not copies, for the layers a rank keeps.
    """
    from pipeshift.runtime.repartition import Partition, plan_stage_ranks

    job = Job(entries=None, rank=rank, world_size=world_size, args=args, connect=connect)
    job.forced = parse_repartition_at(args.repartition_at)
    wants = bool(job.forced or args.master or args.policy == "auto")
    if job.forced:
        job.agreed["repartition_plans"] = file_digest([f.path for f in job.forced])
    base = package_plan(pkg)
    chain = None
    if base is not None and (args.policy == "auto" or args.resume):
        chain = load_chain(base, find_graph(base, pkg.path, args.graph), _optimizer_kind(args))
    plan, job.note = resume_plan(args.checkpoint_dir if args.resume else None, world_size, base, chain)
    if plan is not None:
        _same_model(plan, pkg, "the checkpoint's plan.json")
    criterion = bundle.criterion()
    if plan is None and not wants:
        job.local = package_entries(pkg, bundle.model, criterion, rank, args.init_from)
        job.entries = job.local.entries
        return _connect(job, None)
    if base is None:
        raise PipeshiftError(f"{pkg.path}: repartitioning needs a stage package written by `pipeshift codegen` "
                             "(its plan.json lists the stages)")
    from pipeshift.codegen import build_stages, capture_model, render_package

    full = bundle.model
    # Capture the model's graph now rather than at the first switch: it builds and runs a fresh
    # copy of the model, seconds for a large one, which would otherwise lengthen the first pause.
    model_capture = capture_model(plan or base)
    if plan is None:
        plan = base
        original = _accepts_original(pkg.module.model)

        def make(model):  # a package that cannot adopt builds its own model; a switch copies its values in
            module = _WithOriginal(pkg.module.model, model) if original else pkg.module
            return dataclasses.replace(pkg, module=module).entries(criterion)
    else:
        inputs = render_package(plan, model_capture).layout.criterion_inputs

        def make(model):
            return [*build_stages(plan, model, model_capture=model_capture), (criterion, inputs, ["loss"])]
        job.source = "the checkpoint's plan.json"
    stage_ranks = plan_stage_ranks(plan)
    # A job that may repartition keeps every layer on every rank, so a switch has them at hand.
    job.local = local_entries(make, full, list(range(len(stage_ranks))) + [len(stage_ranks) - 1],
                              range(len(stage_ranks)), seed=pkg.spec.seed if pkg.spec else 0,
                              init_from=args.init_from, who=f"rank {rank}")
    job.entries = job.local.entries
    job.stage_ranks = plan_stage_ranks(plan)
    job.module_to_stage = list(range(len(job.stage_ranks))) + [len(job.stage_ranks) - 1]
    partition = Partition.of(plan, job.stage_ranks, [m for m, _, _ in job.entries[:-1]])
    job.repartitioner = Repartitioner(rank, full, job.entries[-1], partition, model_capture)
    job.agreed["start_plan"] = hashlib.sha256(json.dumps(plan.get("stages"), sort_keys=True).encode()).hexdigest()
    if args.policy == "auto":
        if chain is None:
            raise PipeshiftError("--policy auto needs the profiled graph.txt: pass --graph (the plan's "
                                 f"'graph' {base.get('graph')!r} was not found)")
        from pipeshift.runtime.policy_driver import PolicyDriver

        job.chain = chain
        job.policy = PolicyDriver(plan, chain, policy_config(args.policy_arg))
    elif chain is not None:
        job.chain = chain
    return _connect(job, plan)


def _same_model(plan: Mapping[str, Any], pkg, source: str) -> None:
    """A plan read from a checkpoint is data: it may only re-split the package's own model.

    Its spec is what the stages would be built from, so a spec other than the package's would
    import and run code the user never named (and train another model besides).
    """
    from pipeshift.spec import ModelSpec

    try:
        spec = ModelSpec.from_json(plan.get("model"))
    except PipeshiftError as e:
        raise PipeshiftError(f"{source}: {e}") from None
    if pkg.spec is None or spec != pkg.spec:
        raise PipeshiftError(f"{source} names the model {spec.callable} (seed {spec.seed}), not the package's "
                             f"{pkg.spec.callable if pkg.spec else 'unknown'} model; refusing to run it")


class _WithOriginal:
    """A package module whose ``model(criterion)`` adopts from a model we already hold."""

    def __init__(self, model_fn, original):
        self._fn, self._original = model_fn, original

    def model(self, criterion):
        return self._fn(criterion, self._original)


def package_entries(pkg, model, criterion, rank: int, init_from: str | None) -> LocalBuild:
    """The package's entries with only this rank's stages' tensors real (see :mod:`pipeshift.runtime.local`).

    A hand-written package whose ``model(criterion)`` cannot adopt from a given model builds its
    own whole model; weights from ``init_from`` are then loaded into this rank's stages only.
    """
    from pipeshift.runtime.local import stage_tensor_names

    stages = [s for s, ranks in pkg.stage_to_rank.items() if rank in ranks]
    who = f"rank {rank} (stage {', '.join(map(str, stages))})"
    if _accepts_original(pkg.module.model):
        def make(m):
            return dataclasses.replace(pkg, module=_WithOriginal(pkg.module.model, m)).entries(criterion)

        return local_entries(make, model, pkg.module_to_stage, stages, seed=pkg.spec.seed if pkg.spec else 0,
                             init_from=init_from, who=who)
    entries = pkg.entries(criterion)
    held: list[str] = []
    loaded: list[str] = []
    for i, (module, _, _) in enumerate(entries[:-1]):
        if pkg.module_to_stage[i] in stages:
            state = module.state_dict(keep_vars=True)
            mine = sorted(set(state) & stage_tensor_names(module))
            held += mine
            if init_from is not None:
                from pipeshift.weights import load_into, open_weights

                loaded += load_into(state, open_weights(init_from), mine, who=who)
    return LocalBuild(entries, held, loaded)


def _accepts_original(fn) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) >= 2
    except (TypeError, ValueError):
        return False


def _connect(job: Job, plan: dict[str, Any] | None) -> Job:
    """Register with the master (every rank), through the control plane the command wired in."""
    if not job.args.master:
        return job
    if job.connect is None:
        raise PipeshiftError("--master: this command has no control-plane client (run `pipeshift train`)")
    stage = 0
    if plan is not None:
        from pipeshift.runtime.repartition import plan_stage_ranks

        stage = next((k for k, ranks in enumerate(plan_stage_ranks(plan)) if job.rank in ranks), 0)
    job.master = job.connect(job.rank, stage)
    return job
