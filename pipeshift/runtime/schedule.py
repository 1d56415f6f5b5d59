"""Pipeline schedules as plain data: the ordered list of actions one rank performs.

A schedule is built in three steps, each a pure function that can be printed and unit-tested
without any communication:

1. :func:`compute_order` — the *stage-level* order of forward (``F i``), backward (``B i``) and
   optimizer-step work for one stage, as if the stage had a single replica:

   * ``gpipe``: all forwards of the minibatch, then all backwards, then one step.
   * ``flush`` (PipeDream-Flush): ``num_stages - stage - 1`` warm-up forwards (more with
     replicated stages, see :func:`in_flight`), then one forward / one backward alternately,
     then the remaining backwards, then one step per minibatch.

   The forward/backward orders are the simulator's own (``pipeshift.optimizer.schedules``).
   * ``1f1b`` (PipeDream): the same 1F1B order but continuous across minibatches (no flush);
     a step after every backward group (one microbatch per replica).
   * ``2bw`` (PipeDream-2BW): continuous 1F1B with one step per ``microbatches`` backwards.

2. :func:`for_replica` — a replicated stage deals microbatches round-robin (microbatch ``i``
   goes to replica ``i % replicas``); each replica runs the stage-level order restricted to its
   own microbatches. Because every rank's order is a sub-sequence of a deadlock-free stage-level
   order, the replicated pipeline cannot deadlock either.

3. :func:`lower` — the rank-level action list: receives are posted one compute action ahead (so
   a transfer overlaps the compute before it), every forward/backward is followed by its sends,
   steps are preceded by a gradient all-reduce when the stage is replicated, and a ``flush``
   (wait for every outstanding send) ends the list.

:func:`plan_weight_versions` then annotates forwards and steps with the weight version each
microbatch uses — the data the runtime needs for weight stashing (``1f1b``) and double
buffering (``2bw``), derived from the action order rather than from hidden state.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

from pipeshift.errors import PipeshiftError
from pipeshift.optimizer.schedules import schedule_actions, stage_warmup

SCHEDULES = ("flush", "gpipe", "1f1b", "2bw")
ASYNC_SCHEDULES = ("1f1b", "2bw")

# Rank-level action kinds, in the words the trace and error messages use.
LOAD = "load"  # first stage: take the microbatch from the data loader
RECV_FWD = "recv_fwd"  # post the receives of a forward's inputs
FWD = "fwd"
SEND_FWD = "send_fwd"
RECV_BWD = "recv_bwd"  # post the receives of the gradients of a forward's outputs
BWD = "bwd"
SEND_BWD = "send_bwd"
ALLREDUCE = "allreduce"  # sum gradients over the stage's replicas
STEP = "step"
FLUSH = "flush"  # wait for every outstanding send


@dataclasses.dataclass(frozen=True)
class Work:
    """One entry of a stage-level order: ``F``/``B`` of a microbatch, or ``S`` (optimizer step).

    A step carries ``grads``: how many stage-level backwards its gradient sums (the divisor
    that turns the sum into a mean), and ``minibatch_end``: whether it closes a minibatch (the
    LR scheduler and the metrics advance there).
    """

    op: str
    mb: int = -1
    grads: int = 0
    minibatch_end: bool = False

    def __str__(self) -> str:
        return f"{self.op}{self.mb}" if self.op in "FB" else "S"


@dataclasses.dataclass(frozen=True)
class Action:
    """One rank-level action; the weight-version fields are filled by :func:`plan_weight_versions`.

    ``version``: the weight version a ``fwd``/``bwd`` uses; ``stashed``: it runs on a stashed
    copy of that version (``False``: on the live parameters); ``snapshot``: copy the live
    parameters into a stash of ``version`` before running (for ``step``: before stepping);
    ``release``: the stash of ``version`` is not needed after this action.
    """

    kind: str
    mb: int = -1
    grads: int = 0
    minibatch_end: bool = False
    version: int = -1
    stashed: bool = False
    snapshot: bool = False
    release: bool = False

    def __str__(self) -> str:
        if self.kind == STEP:
            text = "step" + (" (minibatch end)" if self.minibatch_end else "")
            return text + (f" [stash v{self.version} first]" if self.snapshot else "")
        if self.kind in (ALLREDUCE, FLUSH):
            return self.kind
        text = f"{self.kind} mb{self.mb}"
        if self.kind in (FWD, BWD) and self.version >= 0:
            text += f" @v{self.version}" + ("/stash" if self.stashed else "")
        return text


def check_schedule(kind: str) -> str:
    if kind not in SCHEDULES:
        raise PipeshiftError(f"unknown schedule {kind!r}: one of {', '.join(SCHEDULES)}")
    return kind


def in_flight(stage_replicas: Sequence[int], stage: int) -> int:
    """Microbatches a 1F1B stage holds in steady state (over all its replicas): its warm-up + 1.

    The warm-up is the simulator's (:func:`pipeshift.optimizer.schedules.stage_warmup`): one
    forward for every worker from this stage to the end, minus one — ``num_stages - stage - 1``
    without replicas. It never grows downstream, which keeps 1F1B deadlock-free.
    """
    return stage_warmup(list(stage_replicas), stage) + 1


def compute_order(kind: str, num_stages: int, stage: int, microbatches: int, *,
                  replicas: int = 1, minibatches: int = 1,
                  stage_replicas: Sequence[int] | None = None) -> list[Work]:
    """Stage-level order of one *segment*: ``minibatches`` minibatches of ``microbatches`` each.

    The forward/backward order is the simulator's
    (:func:`pipeshift.optimizer.schedules.schedule_actions`), so a simulated and a measured run
    execute the same lists; this adds the optimizer steps. Synchronous schedules (``flush``,
    ``gpipe``) repeat their per-minibatch order; asynchronous ones (``1f1b``, ``2bw``) run 1F1B
    continuously over the whole segment, which ends with the pipeline drained (a
    synchronisation point: checkpoints, evaluation, repartitioning). ``stage_replicas`` (every
    stage's replica count) sizes the warm-up; default: no other stage is replicated.
    """
    check_schedule(kind)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} outside 0..{num_stages - 1}")
    if stage_replicas is None:
        stage_replicas = [1] * num_stages
        stage_replicas[stage] = replicas
    warmup = stage_warmup(list(stage_replicas), stage)
    m = microbatches
    if kind in ("flush", "gpipe"):
        body = [Work(a.kind, a.microbatch) for a in schedule_actions(kind, num_stages, stage, m, warmup=warmup)]
        order: list[Work] = []
        for b in range(minibatches):
            order += [Work(w.op, w.mb + b * m) for w in body]
            order.append(Work("S", grads=m, minibatch_end=True))
        return order
    total = m * minibatches
    group = replicas if kind == "1f1b" else m
    order = []
    done = 0
    for a in schedule_actions(kind, num_stages, stage, total, warmup=warmup):
        order.append(Work(a.kind, a.microbatch))
        if a.kind == "B":
            done += 1
            if done % group == 0:
                order.append(Work("S", grads=group, minibatch_end=done % m == 0))
    return order


def for_replica(order: Sequence[Work], replicas: int, replica: int) -> list[Work]:
    """The part of a stage-level order that replica ``replica`` of ``replicas`` runs."""
    return [w for w in order if w.op == "S" or w.mb % replicas == replica]


@dataclasses.dataclass(frozen=True)
class Role:
    """What a rank's stage exchanges, so :func:`lower` emits only the actions that do something."""

    loads_data: bool = False  # first stage
    receives_inputs: bool = False  # some forward input comes from another stage
    sends_outputs: bool = False  # some forward output goes to another stage
    receives_grads: bool = False  # some output is an activation another stage differentiates
    sends_grads: bool = False  # some input is an activation of another stage
    replicated: bool = False


def lower(order: Sequence[Work], role: Role) -> list[Action]:
    """Rank-level actions for a (replica's) compute order; receives run one compute ahead."""
    computes = [w for w in order if w.op in "FB"]
    posted: set[tuple[str, int]] = set()
    actions: list[Action] = []

    def post(w: Work) -> None:
        if (w.op, w.mb) in posted:
            return
        posted.add((w.op, w.mb))
        if w.op == "F":
            if role.loads_data:
                actions.append(Action(LOAD, w.mb))
            if role.receives_inputs:
                actions.append(Action(RECV_FWD, w.mb))
        elif role.receives_grads:
            actions.append(Action(RECV_BWD, w.mb))

    nxt = 0
    for w in order:
        if w.op == "S":
            if role.replicated:
                actions.append(Action(ALLREDUCE))
            actions.append(Action(STEP, grads=w.grads, minibatch_end=w.minibatch_end))
            continue
        post(w)
        nxt += 1
        # prefetch the next compute's receives; a gradient for the forward about to run cannot
        # be posted yet (its shape is known once that forward has run), so look one further
        ahead = nxt
        if ahead < len(computes) and computes[ahead].op == "B" and computes[ahead].mb == w.mb:
            ahead += 1
        if ahead < len(computes):
            post(computes[ahead])
        if w.op == "F":
            actions.append(Action(FWD, w.mb))
            if role.sends_outputs:
                actions.append(Action(SEND_FWD, w.mb))
        else:
            actions.append(Action(BWD, w.mb))
            if role.sends_grads:
                actions.append(Action(SEND_BWD, w.mb))
    actions.append(Action(FLUSH))
    return actions


def forward_only(microbatches: int, replicas: int, replica: int, role: Role) -> list[Action]:
    """Evaluation: every forward of the replica's microbatches, no backward, no step."""
    order = for_replica([Work("F", i) for i in range(microbatches)], replicas, replica)
    role = dataclasses.replace(role, receives_grads=False, sends_grads=False, replicated=False)
    return lower(order, role)


def version_rule(kind: str, microbatches: int) -> Callable[[int, int], int]:
    """``(mb, steps_done) -> weight version`` a forward uses, per schedule.

    * ``flush``/``gpipe``/``1f1b``: the newest weights (``steps_done``).
    * ``2bw``: minibatch ``b`` of the segment runs on version ``max(b - 1, 0)`` at every stage, so
      ``W(t+1) = W(t) - lr * grad(W(t-1))`` — PipeDream-2BW's update rule with a delay of one —
      and at most two versions are in use at a time. (Needs ``microbatches >= num_stages``: the
      version a minibatch needs must exist when its first forward runs.)
    """
    if kind == "2bw":
        return lambda mb, steps: max(mb // microbatches - 1, 0)
    return lambda mb, steps: steps


def plan_weight_versions(actions: Sequence[Action], rule: Callable[[int, int], int]) -> list[Action]:
    """Annotate forwards/backwards with their weight version and where stashes are taken/freed.

    A forward runs on the live parameters when no optimizer step falls between it and its
    backward (always so for ``flush``/``gpipe``: zero copies). Otherwise it runs on a stash: a
    copy of the version, taken either at the first forward that needs it (if the live weights
    still are that version) or just before the step that would overwrite it.
    """
    steps = 0
    step_at: list[int] = []  # index in `actions` of each step, in order
    bwd_index: dict[int, int] = {}
    for i, a in enumerate(actions):
        if a.kind == STEP:
            step_at.append(i)
        elif a.kind == BWD:
            bwd_index[a.mb] = i
    out = list(actions)
    fwd_version: dict[int, tuple[int, bool]] = {}
    last_use: dict[int, int] = {}
    snapshot_taken: set[int] = set()
    for i, a in enumerate(actions):
        if a.kind == STEP:
            steps += 1
            continue
        if a.kind == FWD:
            v = rule(a.mb, steps)
            if v > steps:
                raise PipeshiftError(
                    f"schedule needs weight version {v} for microbatch {a.mb} after only {steps} steps: "
                    "use at least as many microbatches as stages"
                )
            end = bwd_index.get(a.mb, i)
            steps_between = bisect.bisect_left(step_at, end) - bisect.bisect_right(step_at, i)
            stashed = v < steps or steps_between > 0
            snapshot = stashed and v == steps and v not in snapshot_taken
            if stashed and v < steps and v not in snapshot_taken:
                # the live weights moved past v already: the stash must be taken before step v
                out[step_at[v]] = dataclasses.replace(out[step_at[v]], snapshot=True, version=v)
                snapshot_taken.add(v)
            if snapshot:
                snapshot_taken.add(v)
            fwd_version[a.mb] = (v, stashed)
            out[i] = dataclasses.replace(a, version=v, stashed=stashed, snapshot=snapshot)
            if stashed:
                last_use[v] = max(last_use.get(v, -1), end)
        elif a.kind == BWD and a.mb in fwd_version:
            v, stashed = fwd_version[a.mb]
            out[i] = dataclasses.replace(a, version=v, stashed=stashed)
    for i in last_use.values():
        out[i] = dataclasses.replace(out[i], release=True)
    return out


def rank_actions(kind: str, num_stages: int, stage: int, microbatches: int, *, replicas: int = 1,
                 replica: int = 0, role: Role | None = None, minibatches: int = 1,
                 stage_replicas: Sequence[int] | None = None) -> list[Action]:
    """Everything above in one call: the annotated action list of one rank for one segment."""
    role = role or Role(loads_data=stage == 0, receives_inputs=stage > 0, sends_outputs=stage < num_stages - 1,
                        receives_grads=stage < num_stages - 1, sends_grads=stage > 0, replicated=replicas > 1)
    order = compute_order(kind, num_stages, stage, microbatches, replicas=replicas, minibatches=minibatches,
                          stage_replicas=stage_replicas)
    actions = lower(for_replica(order, replicas, replica), role)
    return plan_weight_versions(actions, version_rule(kind, microbatches))


def format_actions(actions: Sequence[Action]) -> str:
    """One action per line, numbered as error messages number them."""
    return "\n".join(f"#{i:<4d} {a}" for i, a in enumerate(actions))
