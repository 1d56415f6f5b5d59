"""Pipeline schedules as plain data: the ordered list of actions one rank performs.

A schedule is built in three steps, each a pure function that can be printed and unit-tested
without any communication:

1. :func:`compute_order` — the *stage-level* order of forward (``F i``), backward (``B i``) and
   optimizer-step work for one stage, as if the stage had a single replica:

   * ``gpipe``: all forwards of the minibatch, then all backwards, then one step.
   * ``flush`` (PipeDream-Flush): ``num_stages - stage - 1`` warm-up forwards (more with
     replicated stages, see :func:`in_flight`), then one forward / one backward alternately,
     then the remaining backwards, then one step per minibatch.

   (built in :mod:`pipeshift.schedule.order`, with the facts of :mod:`pipeshift.schedule.registry`):
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
from pipeshift.schedule.order import Work, compute_order, for_replica
from pipeshift.schedule.registry import schedule_kind

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
    if schedule_kind(kind).weights == "double":
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


def chain_role(num_stages: int, stage: int, replicas: int) -> Role:
    """The role of a stage in a plain chain: it exchanges activations and gradients with both neighbours."""
    return Role(loads_data=stage == 0, receives_inputs=stage > 0, sends_outputs=stage < num_stages - 1,
                receives_grads=stage < num_stages - 1, sends_grads=stage > 0, replicated=replicas > 1)


def rank_actions(kind: str, num_stages: int, stage: int, microbatches: int, *, replicas: int = 1,
                 replica: int = 0, role: Role | None = None, minibatches: int = 1,
                 stage_replicas: Sequence[int] | None = None) -> list[Action]:
    """Everything above in one call: the annotated action list of one rank for one segment.

    This is the list the runtime executes (:meth:`pipeshift.runtime.pipeline.Pipeline.actions`)
    and the simulator replays (:func:`pipeshift.optimizer.simulator.simulate`).
    """
    role = role or chain_role(num_stages, stage, replicas)
    order = compute_order(kind, num_stages, stage, microbatches, replicas=replicas, minibatches=minibatches,
                          stage_replicas=stage_replicas)
    actions = lower(for_replica(order, replicas, replica), role)
    return plan_weight_versions(actions, version_rule(kind, microbatches))


def pipeline_actions(kind: str, stage_ranks: Sequence[Sequence[int]], microbatches: int, minibatches: int = 1,
                     roles: Sequence[Role] | None = None) -> dict[int, list[Action]]:
    """Every rank's :func:`rank_actions` for a pipeline whose stage ``s`` runs on ``stage_ranks[s]``."""
    n = len(stage_ranks)
    replicas = [len(r) for r in stage_ranks]
    return {rank: rank_actions(kind, n, s, microbatches, replicas=replicas[s], replica=q,
                               role=roles[s] if roles is not None else None, minibatches=minibatches,
                               stage_replicas=replicas)
            for s, ranks in enumerate(stage_ranks) for q, rank in enumerate(ranks)}


def format_actions(actions: Sequence[Action]) -> str:
    """One action per line, numbered as error messages number them."""
    return "\n".join(f"#{i:<4d} {a}" for i, a in enumerate(actions))
