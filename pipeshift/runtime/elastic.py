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
with :data:`~pipeshift.runtime.restart.EXIT_REGROUP`; the elastic supervisor (``pipeshift launch --local N --elastic``) or
torchrun restarts the job with the new number of ranks, and :func:`~pipeshift.runtime.restart.resume_plan` re-plans for it.

Decisions and migrations are logged as JSON lines in the output directory (rank 0):
``decisions.jsonl`` (every policy verdict with its numbers) and ``repartitions.jsonl`` (every
switch: step, source, new stages, bytes moved, pause per rank).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan, parse_plan
from pipeshift.runtime import checkpoint as ckpt
from pipeshift.runtime.control import Command, ControlPlane
from pipeshift.runtime.repartition import Prepared, Repartitioner, check_plan

from pipeshift.runtime.restart import ELASTIC_FILE, EXIT_REGROUP

if TYPE_CHECKING:  # the trainer drives the controller; the policy is imported only where it runs
    from pipeshift.runtime.pipeline import Counters
    from pipeshift.runtime.policy import Chain
    from pipeshift.runtime.policy_driver import PolicyDriver
    from pipeshift.runtime.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class ForcedSwitch:
    """``--repartition-at STEP:PLAN``: switch to ``plan`` at the synchronisation point after step ``step``."""

    index: int
    step: int
    path: str
    plan: Plan


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
    plan: Plan
    source: str
    strict: bool  # a forced switch: a plan that does not fit is an error, not a logged refusal
    prepared: Prepared
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
                 forced: Sequence[ForcedSwitch] = (), master: ControlPlane | None = None,
                 policy: PolicyDriver | None = None, chain: Chain | None = None) -> None:
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
        self.pending: list[Command] = []  # rank 0: operator commands waiting for their at_step
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
    def plan(self) -> Plan | None:
        return None if self.repartitioner is None else self.repartitioner.plan

    def next_sync(self, step: int) -> int | None:
        """The next step after ``step`` that must end a segment (asynchronous schedules)."""
        candidates = [f.step for f in self.forced if f.step > step and f.index not in self.applied]
        candidates += [x.step for x in self.scheduled if x.step > step]
        if self.ticking:
            k = self.config.report_every
            candidates.append((step // k + 1) * k)
        return min(candidates) if candidates else None

    def on_minibatch(self, trainer: Trainer, counters: Counters) -> None:
        self._window += (counters.compute_s, counters.wait_s, counters.comm_s)
        self._window_steps += 1

    def at_start(self, trainer: Trainer) -> None:
        """After a resume: apply the forced switches of the resumed step not applied before it."""
        self.applied = list(trainer.resumed_switches)
        if self.rank == 0 and self.plan is not None:
            self._master("announce_plan", self.plan, trainer.step)
        self._forced(trainer)
        self._prefetch_forced(trainer)

    def at_boundary(self, trainer: Trainer) -> str | None:
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

    def _forced(self, trainer: Trainer) -> None:
        """Forced switches due now that were not prepared a step ahead (e.g. right after a resume)."""
        for f in self.forced:
            if f.step == trainer.step and f.index not in self.applied:
                item = self._schedule(trainer, f.plan, f"--repartition-at {f.step}:{f.path}", strict=True,
                                      forced_index=f.index, at=trainer.step, reserve=False)
                assert item is not None  # a strict switch that does not fit raises
                self.scheduled.remove(item)
                self._execute(trainer, item)

    def _prefetch_forced(self, trainer: Trainer) -> None:
        for f in self.forced:
            due = f.step == trainer.step + 1 and f.index not in self.applied
            if due and not any(x.forced_index == f.index for x in self.scheduled):
                self._schedule(trainer, f.plan, f"--repartition-at {f.step}:{f.path}", strict=True,
                               forced_index=f.index, at=f.step)

    # -- the tick -------------------------------------------------------------------------------

    def _tick(self, trainer: Trainer) -> str | None:
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
        if message is not None and isinstance(message.get("plan"), Plan):
            message = {**message, "plan": message["plan"].to_json()}
        data = p.comm.broadcast_bytes(json.dumps(message).encode() if message else None,
                                      f"agreeing on the control decision at step {trainer.step}")
        decided = json.loads(data) if data else None
        if not decided:
            return None
        if decided["action"] == "switch":
            if trainer.step + 1 >= self.config.total_steps:
                self._reject(trainer, decided["source"], "the run ends at the next step")
                ok = False
            else:  # checked on rank 0 before it was sent: every rank reads the same plan from the same bytes
                plan = parse_plan(decided["plan"], decided["source"])
                ok = self._schedule(trainer, plan, decided["source"], strict=False,
                                    command_id=decided.get("id"), at=trainer.step + 1) is not None
            if not ok and decided.get("id") is not None:
                self._master("ack", decided["id"], f"rejected: {self.last_rejection}")
            return None
        if decided["action"] == "resize":
            return self._resize(trainer, int(decided["world_size"]), decided)
        return None

    def _decide(self, trainer: Trainer, measured: list[float] | None) -> dict[str, Any] | None:
        """Rank 0: an operator's command whose step has come, else the policy's verdict."""
        if self.master is not None:
            command = self._master("poll")
            while command is not None:
                self.pending.append(command)
                command = self._master("poll")
        for command in list(self.pending):
            if command.error is not None:  # malformed: said once, acknowledged as rejected, never applied
                self.pending.remove(command)
                self._log("repartitions.jsonl", {"event": "command_ignored", "step": trainer.step,
                                                 "id": command.id, "type": command.type, "reason": command.error})
                if command.id is not None:
                    self._master("ack", command.id, f"rejected: {command.error}")
                continue
            # a repartition's at_step is the step it switches after (the one agreed here, plus one);
            # a resize's is the tick it stops at
            ahead = 1 if command.type == "repartition" else 0
            if (command.at_step or 0) <= trainer.step + ahead:
                self.pending.remove(command)
                if command.plan is not None:
                    return {"action": "switch", "plan": command.plan, "id": command.id, "source": command.where}
                return {"action": "resize", "world_size": command.world_size, "id": command.id,
                        "source": command.where}
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

    def _schedule(self, trainer: Trainer, plan: Plan, source: str, strict: bool, at: int, reserve: bool = True,
                  forced_index: int | None = None, command_id: int | None = None) -> _Scheduled | None:
        """Check and render ``plan`` now (every rank alike) and reserve its landing buffers; None if refused."""
        rp = self.repartitioner
        if rp is None:
            raise PipeshiftError("repartitioning needs a stage package written by `pipeshift codegen`")
        prepared: Prepared | None = None
        error: str | None = None
        try:
            check_plan(plan, self.world_size, trainer.config.microbatches, running=rp.plan, source=source)
            prepared = rp.prepare(plan)
        except PipeshiftError as e:
            error = str(e)
        if not strict:
            # A plan refused by any rank (rendering ran out of memory there, say) is refused by all:
            # nobody may start a switch the others will not join.
            errors = [json.loads(b) for b in trainer.pipeline.comm.all_gather_bytes(
                json.dumps(error).encode(), f"agreeing on {source}")]
            error = next((f"rank {r}: {e}" if e != error else e for r, e in enumerate(errors) if e), None)
        if error is not None or prepared is None:
            if strict:
                raise PipeshiftError(error or source)
            self._reject(trainer, source, error or "not rendered")
            return None
        if reserve:
            rp.reserve(prepared, trainer.pipeline.optimizer, trainer.pipeline.device)
        item = _Scheduled(at, plan, source, strict, prepared, forced_index, command_id)
        self.scheduled.append(item)
        return item

    def _execute(self, trainer: Trainer, item: _Scheduled) -> None:
        self._switch(trainer, item.plan, item.source, item.prepared)
        if item.forced_index is not None:
            self.applied.append(item.forced_index)
        if item.command_id is not None:
            self._master("ack", item.command_id, "applied")

    def _switch(self, trainer: Trainer, plan: Plan, source: str, prepared: Prepared) -> None:
        p, rp = trainer.pipeline, self.repartitioner
        assert rp is not None  # a switch was scheduled, which needs one
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
            self._master("announce_plan", plan, trainer.step, max(r["pause_s"] for r in everyone))
            record = {
                "event": "repartition", "step": trainer.step, "source": source,
                "stages": plan.node_lists,
                "ranks": plan.stage_ranks,
                "keys_moved": everyone[0]["keys_moved_total"],
                "bytes_moved": sum(r["bytes_sent"] for r in everyone),
                "messages": sum(r["messages"] for r in everyone),
                "pause_s": max(r["pause_s"] for r in everyone),
                "wall_s": time.perf_counter() - t0,
                "per_rank": everyone,
            }
            self._log("repartitions.jsonl", record)
            print(f"pipeshift train: repartitioned after step {trainer.step} ({source}): "
                  f"{plan.num_stages} stages, {record['keys_moved']} tensors moved "
                  f"({record['bytes_moved'] / 1e6:.2f} MB), pause {record['pause_s']:.3f} s",
                  file=sys.stderr, flush=True)
        # every rank: one line and its own part of the record, beside its metrics
        mine = {"event": "repartition", "step": trainer.step, "source": source, **report}
        self._log_own(trainer, mine)
        nodes = plan.stages[report["stage"]].nodes
        print(f"pipeshift train: rank {self.rank}: switched after step {trainer.step} ({source}): now stage "
              f"{report['stage']} ({len(nodes)} nodes), sent {report['keys_sent']} tensors "
              f"({report['bytes_sent'] / 1e6:.2f} MB), received {report['keys_received']} "
              f"({report['bytes_received'] / 1e6:.2f} MB), pause {report['pause_s']:.3f} s",
              file=sys.stderr, flush=True)

    def _log_own(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """This rank's own line in ``rankR/repartitions.jsonl`` (every rank writes one per switch)."""
        out = Path(trainer.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "repartitions.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "rank": self.rank, **record}, default=_json_default) + "\n")

    def _reject(self, trainer: Trainer, source: str, why: str) -> None:
        self.last_rejection = why
        if self.rank == 0:
            self._log("repartitions.jsonl", {"event": "rejected", "step": trainer.step, "source": source,
                                             "reason": why})
            print(f"pipeshift train: repartition from {source} rejected: {why}", file=sys.stderr, flush=True)

    def _resize(self, trainer: Trainer, world_size: int, decided: Mapping[str, Any]) -> str | None:
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
    return [float(x) for x in sums / np.maximum(counts, 1)]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
