"""Checks that a pipeline's per-rank action lists run to the end and keep the schedule's promises.

:func:`replay` runs every rank's list against the others' with rendezvous semantics and no
durations: a forward waits for its activations to have been sent, a backward for its gradient,
an all-reduce for every replica of the stage to reach it, and a ``flush`` for every send of the
rank to have a posted receive (gloo's semantics). If no rank can move, the lists deadlock and the
error names what each rank waits for. Along the way it checks what the rest of pipeshift relies
on: every microbatch of a rank is run forward once and backward once, forward first; a send goes
to the rank that the receiver's topology says; replicas of a stage all-reduce equally often;
microbatches and weight versions held stay within what the planner's memory model charges for
(:func:`cost_in_flight`, :func:`cost_weight_versions`).

:func:`validate_schedule` is run by the runtime at start-up (as torch.distributed.pipelining
validates its schedules), so a schedule change that would hang or break the cost model fails
before any process group exists, not in the middle of a run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.schedule import actions as A
from pipeshift.schedule.registry import schedule_kind


def cost_model_bounds(kind: str, microbatches: int, minibatches: int, downstream: int,
                      replicas: int) -> tuple[int, float, int]:
    """(microbatches held, stashed weight versions, optimizer steps) of one replica, as the planner counts them.

    ``downstream``: workers after the stage. The figures are the planner's own
    (:class:`pipeshift.optimizer.cost.Schedule`), so the replay checks the lists against the model
    that chose the plan, not against a second copy of its formulas.
    """
    from pipeshift.optimizer.cost import Schedule

    model = Schedule(kind, microbatches)
    held = float(model.in_flight(downstream, replicas))
    steps = microbatches * minibatches / float(model.sync(replicas))
    return int(held), float(model.weight_versions(np.array(held))), int(round(steps))


@dataclasses.dataclass(frozen=True)
class Replay:
    """What :func:`replay` saw, per rank."""

    peak_in_flight: Mapping[int, int]
    peak_stashes: Mapping[int, int]
    steps: Mapping[int, int]


def replay(kind: str, stage_ranks: Sequence[Sequence[int]], microbatches: int, minibatches: int,
           lists: Mapping[int, Sequence[A.Action]]) -> Replay:
    """Run ``lists`` (rank → actions of one segment) against each other; raise on any broken promise."""
    n = len(stage_ranks)
    stage_of = {r: s for s, ranks in enumerate(stage_ranks) for r in ranks}
    total = microbatches * minibatches

    def bad(rank: int, msg: str) -> PipeshiftError:
        return PipeshiftError(f"schedule {kind}, {microbatches} microbatches, ranks {list(map(list, stage_ranks))}: "
                              f"rank {rank} (stage {stage_of[rank]}): {msg}")

    def peer(stage: int, mb: int) -> int:
        ranks = stage_ranks[stage]
        return ranks[mb % len(ranks)]

    if set(lists) != set(stage_of):
        raise PipeshiftError(f"action lists for ranks {sorted(lists)}, but the stages have ranks {sorted(stage_of)}")
    sent: set[tuple[str, int, int]] = set()  # (F/B, receiving rank, mb)
    posted: set[tuple[str, int, int]] = set()
    unmatched: dict[int, set[tuple[str, int, int]]] = {r: set() for r in lists}
    arrivals: dict[tuple[int, int], set[int]] = {}
    reached = dict.fromkeys(lists, 0)
    pc = dict.fromkeys(lists, 0)
    live: dict[int, set[int]] = {r: set() for r in lists}
    done: dict[int, dict[str, set[int]]] = {r: {"F": set(), "B": set()} for r in lists}
    peak = dict.fromkeys(lists, 0)
    steps = dict.fromkeys(lists, 0)
    stashes: dict[int, set[int]] = {r: set() for r in lists}
    peak_stashes = dict.fromkeys(lists, 0)
    while any(pc[r] < len(lists[r]) for r in lists):
        moved = False
        for r, acts in lists.items():
            s = stage_of[r]
            while pc[r] < len(acts):
                a = acts[pc[r]]
                if a.kind in (A.FWD, A.BWD, A.RECV_FWD, A.RECV_BWD, A.SEND_FWD, A.SEND_BWD, A.LOAD) \
                        and peer(s, a.mb) != r:
                    raise bad(r, f"{a} is for microbatch {a.mb}, which stage {s} runs on rank {peer(s, a.mb)}")
                if a.kind == A.RECV_FWD:
                    posted.add(("F", r, a.mb))
                elif a.kind == A.RECV_BWD:
                    posted.add(("B", r, a.mb))
                elif a.kind == A.FWD:
                    if s > 0 and ("F", r, a.mb) not in sent:
                        break
                    if a.mb in done[r]["F"]:
                        raise bad(r, f"runs the forward of microbatch {a.mb} twice")
                    done[r]["F"].add(a.mb)
                    live[r].add(a.mb)
                    if a.snapshot:
                        stashes[r].add(a.version)
                elif a.kind == A.BWD:
                    if s < n - 1 and ("B", r, a.mb) not in sent:
                        break
                    if a.mb not in live[r]:
                        raise bad(r, f"runs the backward of microbatch {a.mb} without its forward")
                    live[r].discard(a.mb)
                    done[r]["B"].add(a.mb)
                    if a.release:
                        stashes[r].discard(a.version)
                elif a.kind == A.SEND_FWD:
                    if s == n - 1:
                        raise bad(r, "the last stage sends activations")
                    key = ("F", peer(s + 1, a.mb), a.mb)
                    sent.add(key)
                    unmatched[r].add(key)
                elif a.kind == A.SEND_BWD:
                    if s == 0:
                        raise bad(r, "the first stage sends gradients")
                    key = ("B", peer(s - 1, a.mb), a.mb)
                    sent.add(key)
                    unmatched[r].add(key)
                elif a.kind == A.ALLREDUCE:
                    arrivals.setdefault((s, reached[r]), set()).add(r)
                    if len(arrivals[(s, reached[r])]) < len(stage_ranks[s]):
                        break
                elif a.kind == A.STEP:
                    if a.snapshot:
                        stashes[r].add(a.version)
                    steps[r] += 1
                elif a.kind == A.FLUSH:
                    if unmatched[r] - posted:
                        break
                peak[r] = max(peak[r], len(live[r]))
                peak_stashes[r] = max(peak_stashes[r], len(stashes[r]))
                if a.kind == A.ALLREDUCE:
                    reached[r] += 1
                pc[r] += 1
                moved = True
        if not moved:
            stuck = "; ".join(f"rank {r} at #{pc[r]} {lists[r][pc[r]]}" for r in lists if pc[r] < len(lists[r]))
            raise PipeshiftError(f"schedule {kind} deadlocks with {microbatches} microbatches on ranks "
                                 f"{list(map(list, stage_ranks))}: {stuck}")
    for r in lists:
        s = stage_of[r]
        reps = len(stage_ranks[s])
        mine = {mb for mb in range(total) if peer(s, mb) == r}
        for op in ("F", "B"):
            if done[r][op] != mine:
                raise bad(r, f"ran {op} of microbatches {sorted(done[r][op])}, expected {sorted(mine)}")
        downstream = sum(len(x) for x in stage_ranks[s + 1:])
        bound, versions, want = cost_model_bounds(kind, microbatches, minibatches, downstream, reps)
        if steps[r] != want:
            raise bad(r, f"took {steps[r]} optimizer steps, the cost model counts {want}")
        if reps > 1 and reached[r] != want:
            raise bad(r, f"all-reduced {reached[r]} times, the cost model counts {want}")
        if peak[r] > bound:
            raise bad(r, f"holds {peak[r]} microbatches at once; the memory model charges for {bound}")
        if peak_stashes[r] > versions and schedule_kind(kind).weights != "live":
            raise bad(r, f"keeps {peak_stashes[r]} stashed weight versions; the memory model charges for {versions}")
        if schedule_kind(kind).weights == "live" and peak_stashes[r]:
            raise bad(r, "stashes weights, which this schedule never needs")
    return Replay(peak, peak_stashes, steps)


@functools.lru_cache(maxsize=64)
def validate_schedule(kind: str, stage_ranks: tuple[tuple[int, ...], ...], microbatches: int,
                      minibatches: int = 2) -> Replay:
    """Build every rank's list for a segment of ``minibatches`` and :func:`replay` it (cached)."""
    spec = schedule_kind(kind, training=True)
    n = len(stage_ranks)
    if spec.microbatches_at_least_stages and microbatches < n:
        raise PipeshiftError(f"schedule {kind} needs at least as many microbatches as stages ({microbatches} < {n})")
    for s, ranks in enumerate(stage_ranks):
        if microbatches % len(ranks):
            raise PipeshiftError(f"stage {s} has {len(ranks)} replicas, which do not divide the {microbatches} "
                                 "microbatches")
    lists = A.pipeline_actions(kind, stage_ranks, microbatches, minibatches)
    return replay(kind, stage_ranks, microbatches, minibatches, lists)
