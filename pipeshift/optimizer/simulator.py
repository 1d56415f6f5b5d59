"""Discrete-event simulation of a plan's pipeline under a schedule.

Every rank executes its action list (:mod:`pipeshift.schedule.actions`: the list the runtime
executes) in order; an action starts when its rank is free and its input has arrived: a forward
needs the previous stage's activations, a backward the next stage's gradients. Transfers occupy
a link (one per sender/receiver pair and direction) for ``latency + bytes / bandwidth`` and
queue behind earlier transfers on it. Replicated stages take microbatches round-robin and
all-reduce their gradients where the list says (once per own microbatch for 1f1b, once per
minibatch otherwise). Durations come from the plan's per-stage costs, so the simulated timeline is the planner's prediction played out
with the schedule's bubbles, queues and warm-up — what the DP's steady-state objective leaves
out.

The timeline is written in Chrome's trace event format (``"ph": "X"`` events, ``pid`` = rank,
``tid`` = stream: 0 compute, 1 communication), which the runtime writes too, so predicted and
measured runs open side by side in Perfetto.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan
from pipeshift.schedule import actions as A
from pipeshift.schedule.actions import Action, chain_role, pipeline_actions
from pipeshift.schedule.registry import schedule_kind

COMPUTE, COMM = 0, 1


@dataclasses.dataclass(frozen=True)
class SimStage:
    forward_s: float
    backward_s: float
    replicas: int = 1
    ranks: tuple[int, ...] = ()
    output_bytes: float = 0.0  # sent to the next stage per microbatch (and the same back)
    link_bandwidth: float = math.inf
    link_latency: float = 0.0
    allreduce_s: float = 0.0
    tie_allreduce_s: float = 0.0  # the tied parameters' all-reduce, before the same step
    parameter_bytes: float = 0.0
    stash_bytes: float = 0.0

    def transfer_s(self) -> float:
        if self.output_bytes == 0 and self.link_latency == 0:
            return 0.0
        return self.link_latency + self.output_bytes / self.link_bandwidth


@dataclasses.dataclass
class RankStats:
    rank: int
    stage: int
    replica: int
    busy_s: float
    peak_in_flight: int
    peak_memory_bytes: float


@dataclasses.dataclass
class SimResult:
    schedule: str
    microbatches: int
    steps: int
    makespan_s: float
    time_per_minibatch_s: float  # makespan / steps
    time_per_microbatch_s: float  # makespan / all microbatches
    steady_time_per_microbatch_s: float | None  # spacing of the first stage's backwards, mid-run
    bubble_fraction: float
    ranks: list[RankStats]
    events: list[dict[str, Any]]

    def trace(self) -> dict[str, Any]:
        meta: list[dict[str, Any]] = []
        for r in self.ranks:
            meta.append({"name": "process_name", "ph": "M", "pid": r.rank, "tid": 0,
                         "args": {"name": f"rank {r.rank} (stage {r.stage}, replica {r.replica})"}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": r.rank, "tid": 0, "args": {"sort_index": r.rank}})
            meta.append({"name": "thread_name", "ph": "M", "pid": r.rank, "tid": COMPUTE, "args": {"name": "compute"}})
            meta.append({"name": "thread_name", "ph": "M", "pid": r.rank, "tid": COMM, "args": {"name": "communication"}})
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ms",
                "otherData": {"source": "pipeshift simulate", "schedule": self.schedule,
                              "microbatches": self.microbatches, "steps": self.steps}}


def rank_lists(stages: Sequence[SimStage], kind: str, microbatches: int, steps: int) -> dict[int, list[Action]]:
    """Every rank's action list over the whole run: the lists the runtime executes, as one segment.

    The runtime runs a segment (``steps`` minibatches between synchronisation points) from
    :func:`pipeshift.schedule.actions.rank_actions`; so does the simulator, and it replays the
    compute and all-reduce actions (transfers are timed from the sends' completion instead).
    """
    n = len(stages)
    # a stage sharing tied parameters synchronises gradients before its step like a replica does
    roles = [dataclasses.replace(chain_role(n, s, st.replicas), replicated=st.replicas > 1 or st.tie_allreduce_s > 0)
             for s, st in enumerate(stages)]
    return pipeline_actions(kind, stage_ranks(stages), microbatches, minibatches=steps, roles=roles)


def stage_ranks(stages: Sequence[SimStage]) -> list[list[int]]:
    """Each stage's ranks: the plan's where it names them, else the next free ones."""
    out, next_rank = [], 0
    for st in stages:
        ranks = list(st.ranks) if len(st.ranks) == st.replicas else list(range(next_rank, next_rank + st.replicas))
        next_rank = max([next_rank, *(r + 1 for r in ranks)])
        out.append(ranks)
    return out


_REPLAYED = {A.FWD: "F", A.BWD: "B", A.ALLREDUCE: "R"}


def simulate(
    stages: list[SimStage], kind: str, microbatches: int, steps: int = 1, optimizer_states: float = 2.0
) -> SimResult:
    """Run the schedule over ``steps`` minibatches of ``microbatches`` microbatches each."""
    schedule_kind(kind, training=True)
    if not stages:
        raise PipeshiftError("the plan has no stages")
    if microbatches < 1 or steps < 1:
        raise PipeshiftError("need at least one microbatch and one step")
    S, M = len(stages), microbatches
    total_mb = M * steps
    ranks = [(s, q, rid) for s, ids in enumerate(stage_ranks(stages)) for q, rid in enumerate(ids)]
    by_rank = rank_lists(stages, kind, M, steps)
    lists = [[(_REPLAYED[a.kind], a.mb) for a in by_rank[rid] if a.kind in _REPLAYED] for _, _, rid in ranks]
    ptr = [0] * len(ranks)
    free = [0.0] * len(ranks)
    busy = [0.0] * len(ranks)
    live = [0] * len(ranks)
    peak_live = [0] * len(ranks)
    fwd_arrival: list[dict[int, float]] = [dict() for _ in range(S)]  # activations at stage s
    bwd_arrival: list[dict[int, float]] = [dict() for _ in range(S)]  # gradients at stage s
    link_free: dict[tuple[int, int, int, str], float] = {}
    events: list[dict[str, Any]] = []
    b_done_first: list[float] = []

    def send(src_rank: int, key: tuple[int, int, int, str], ready: float, dur: float, name: str,
             args: dict[str, Any]) -> float:
        start = max(ready, link_free.get(key, 0.0))
        end = start + dur
        link_free[key] = end
        if dur > 0:
            events.append({"name": name, "ph": "X", "ts": start * 1e6, "dur": dur * 1e6,
                           "pid": src_rank, "tid": COMM, "args": args})
        return end

    remaining = sum(len(x) for x in lists)
    while remaining:
        progressed = False
        for i, (s, q, rid) in enumerate(ranks):
            st = stages[s]
            while ptr[i] < len(lists[i]):
                kind_i, mb = lists[i][ptr[i]]
                if kind_i == "F":
                    ready = 0.0 if s == 0 else fwd_arrival[s].get(mb)
                    dur = st.forward_s
                elif kind_i == "B":
                    ready = 0.0 if s == S - 1 else bwd_arrival[s].get(mb)
                    dur = st.backward_s
                else:
                    ready, dur = 0.0, st.allreduce_s + st.tie_allreduce_s
                if ready is None:
                    break
                start = max(free[i], ready)
                end = start + dur
                free[i] = end
                ptr[i] += 1
                remaining -= 1
                progressed = True
                if kind_i == "R":
                    if dur > 0:
                        events.append({"name": "allreduce", "ph": "X", "ts": start * 1e6, "dur": dur * 1e6,
                                       "pid": rid, "tid": COMM, "args": {"stage": s}})
                    continue
                busy[i] += dur
                events.append({"name": f"{kind_i}{mb}", "ph": "X", "ts": start * 1e6, "dur": dur * 1e6,
                               "pid": rid, "tid": COMPUTE, "args": {"stage": s, "microbatch": mb}})
                if kind_i == "F":
                    live[i] += 1
                    peak_live[i] = max(peak_live[i], live[i])
                    if s + 1 < S:
                        dst = mb % stages[s + 1].replicas
                        fwd_arrival[s + 1][mb] = send(rid, (s, q, dst, "fwd"), end, st.transfer_s(),
                                                      f"send F{mb}", {"to_stage": s + 1, "microbatch": mb})
                else:
                    live[i] -= 1
                    if s == 0:
                        b_done_first.append(end)
                    if s > 0:
                        prev = stages[s - 1]
                        dst = mb % prev.replicas
                        bwd_arrival[s - 1][mb] = send(rid, (s, q, dst, "bwd"), end, prev.transfer_s(),
                                                      f"send B{mb}", {"to_stage": s - 1, "microbatch": mb})
        if not progressed:
            stuck = [f"rank {rid} waits for {lists[i][ptr[i]]}" for i, (_, _, rid) in enumerate(ranks) if ptr[i] < len(lists[i])]
            raise PipeshiftError("the schedule deadlocks: " + "; ".join(stuck[:4]))
    makespan = max(free) if free else 0.0
    stats = []
    for i, (s, q, rid) in enumerate(ranks):
        st = stages[s]
        weights = schedule_kind(kind).weights
        versions = peak_live[i] if weights == "stashed" else (2 if weights == "double" else 1)
        mem = st.parameter_bytes * (max(versions, 1) + 1 + optimizer_states) + peak_live[i] * st.stash_bytes
        stats.append(RankStats(rid, s, q, busy[i], peak_live[i], mem))
    bubble = 1.0 - sum(busy) / (len(ranks) * makespan) if makespan > 0 else 0.0
    steady = None
    done = sorted(b_done_first)
    if len(done) >= 4:
        lo, hi = len(done) // 4, (3 * len(done)) // 4
        if hi > lo:
            steady = (done[hi] - done[lo]) / (hi - lo)
    return SimResult(kind, M, steps, makespan, makespan / steps, makespan / total_mb, steady, bubble, stats, events)


def stages_from_plan(plan: Plan) -> list[SimStage]:
    """Per-stage durations and sizes of a plan: the planner's ``costs``, or else its ``predicted.compute_s``."""
    out = []
    for st in plan.stages:
        c = st.costs
        if c is not None:
            out.append(SimStage(
                forward_s=c.forward_s, backward_s=c.backward_s, replicas=st.replicas, ranks=st.ranks,
                output_bytes=c.output_bytes, link_bandwidth=c.link_bandwidth, link_latency=c.link_latency,
                allreduce_s=c.allreduce_s, tie_allreduce_s=c.tie_allreduce_s, parameter_bytes=c.parameter_bytes, stash_bytes=c.stash_bytes,
            ))
        elif st.compute_s is not None:  # a hand-written plan: forward ≈ one third of the step, as in most profiles
            comp = st.compute_s
            out.append(SimStage(forward_s=comp / 3, backward_s=2 * comp / 3, replicas=st.replicas, ranks=st.ranks))
        else:
            raise plan.error(("stages", st.stage_id), "has neither 'costs' nor 'predicted.compute_s' to simulate")
    return out
