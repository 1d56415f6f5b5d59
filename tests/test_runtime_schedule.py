"""Schedules are data: their orders, weight versions and deadlock-freedom, checked without processes."""

from __future__ import annotations

import itertools

import pytest

from pipeshift.errors import PipeshiftError
from pipeshift.runtime import schedule as S
from pipeshift.runtime.topology import build_topology


def ops(order):
    return " ".join(str(w) for w in order)


def test_flush_and_gpipe_orders():
    assert ops(S.compute_order("gpipe", 2, 0, 3)) == "F0 F1 F2 B0 B1 B2 S"
    assert ops(S.compute_order("flush", 3, 0, 4)) == "F0 F1 F2 B0 F3 B1 B2 B3 S"
    assert ops(S.compute_order("flush", 3, 1, 4)) == "F0 F1 B0 F2 B1 F3 B2 B3 S"
    assert ops(S.compute_order("flush", 3, 2, 4)) == "F0 B0 F1 B1 F2 B2 F3 B3 S"
    two = S.compute_order("flush", 2, 0, 2, minibatches=2)
    assert ops(two) == "F0 F1 B0 B1 S F2 F3 B2 B3 S"
    assert all(w.grads == 2 and w.minibatch_end for w in two if w.op == "S")


def test_async_orders_step_per_backward_group():
    order = S.compute_order("1f1b", 2, 0, 2, minibatches=2)
    assert ops(order) == "F0 F1 B0 S F2 B1 S F3 B2 S B3 S"
    assert [w.minibatch_end for w in order if w.op == "S"] == [False, True, False, True]
    # replicas of a 1f1b stage step together, once per microbatch each
    order = S.compute_order("1f1b", 2, 1, 4, replicas=2)
    assert ops(order) == "F0 F1 B0 F2 B1 S F3 B2 B3 S"
    assert [w.grads for w in order if w.op == "S"] == [2, 2]
    assert ops(S.compute_order("2bw", 2, 0, 2, minibatches=2)) == "F0 F1 B0 F2 B1 S F3 B2 B3 S"


def test_replicas_split_microbatches_round_robin():
    # stage 0 x2 feeding stage 1 x1: one microbatch in flight for each of the three ranks
    assert S.in_flight([2, 1], 0) == 3 and S.in_flight([2, 1], 1) == 1
    order = S.compute_order("flush", 2, 0, 6, stage_replicas=[2, 1])
    assert ops(order) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5 S"
    mine = [S.for_replica(order, 2, r) for r in range(2)]
    assert ops(mine[0]) == "F0 F2 B0 F4 B2 B4 S"
    assert ops(mine[1]) == "F1 F3 B1 F5 B3 B5 S"
    # warm-up never grows downstream (1F1B deadlocks otherwise)
    for reps in ([1, 3, 1], [1, 1, 1, 1], [2, 1, 2]):
        depth = [S.in_flight(reps, s) for s in range(len(reps))]
        assert depth == sorted(depth, reverse=True) and depth[-1] == reps[-1]


def test_lowering_prefetches_receives_and_ends_with_flush():
    acts = S.rank_actions("flush", 2, 1, 2)
    assert [str(a) for a in acts] == [
        "recv_fwd mb0", "recv_fwd mb1", "fwd mb0 @v0", "bwd mb0 @v0", "send_bwd mb0",
        "fwd mb1 @v0", "bwd mb1 @v0", "send_bwd mb1", "step (minibatch end)", "flush"]
    # a gradient receive is never posted before its own forward has run
    for kind, stages, m, reps in itertools.product(S.SCHEDULES, (2, 3), (3, 4), (1, 2)):
        for stage in range(stages - 1):
            for rep in range(reps):
                seen = set()
                for a in S.rank_actions(kind, stages, stage, m * reps, replicas=reps, replica=rep):
                    if a.kind == S.FWD:
                        seen.add(a.mb)
                    if a.kind == S.RECV_BWD:
                        assert a.mb in seen


def test_printable():
    text = S.format_actions(S.rank_actions("1f1b", 2, 0, 2))
    assert "#0" in text and "fwd mb1 @v0/stash" in text and "step" in text


def test_unknown_schedule():
    with pytest.raises(PipeshiftError, match="unknown schedule"):
        S.compute_order("pipedream", 2, 0, 2)


def _versions_in_use(actions):
    """Replay snapshots/releases; return the peak number of stashes and each forward's version."""
    held, peak, fwd = set(), 0, {}
    steps = 0
    for a in actions:
        if a.kind == S.STEP:
            if a.snapshot:
                held.add(a.version)
            steps += 1
        if a.kind == S.FWD:
            if a.stashed:
                if a.snapshot:
                    assert a.version == steps
                    held.add(a.version)
                assert a.version in held, f"forward of mb{a.mb} needs v{a.version}, not stashed"
            else:
                assert a.version == steps
            fwd[a.mb] = a.version
        if a.kind == S.BWD:
            assert a.version == fwd[a.mb]
            if a.stashed:
                assert a.version in held
            if a.release:
                held.discard(a.version)
        peak = max(peak, len(held))
    assert not held
    return peak, fwd


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_1f1b_weight_stashing_versions(stages):
    m = 4
    for stage in range(stages):
        acts = S.rank_actions("1f1b", stages, stage, m, minibatches=3)
        peak, fwd = _versions_in_use(acts)
        delay = stages - stage - 1
        assert fwd == {i: max(0, i - delay) for i in range(3 * m)}
        assert peak <= stages - stage  # one stashed copy per microbatch in flight, at most
        # a forward on the live weights has no step before its backward
        for i, a in enumerate(acts):
            if a.kind == S.FWD and not a.stashed:
                j = next(k for k, b in enumerate(acts) if b.kind == S.BWD and b.mb == a.mb)
                assert not any(b.kind == S.STEP for b in acts[i:j])


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_2bw_uses_two_versions_with_delay_one(stages):
    m = stages
    for stage in range(stages):
        acts = S.rank_actions("2bw", stages, stage, m, minibatches=4)
        peak, fwd = _versions_in_use(acts)
        assert fwd == {i: max(i // m - 1, 0) for i in range(4 * m)}
        assert peak <= 2
        assert sum(a.kind == S.STEP for a in acts) == 4


def test_flush_never_stashes():
    for stage in range(3):
        assert not any(a.stashed or a.snapshot for a in S.rank_actions("flush", 3, stage, 5, minibatches=2))


def test_2bw_needs_enough_microbatches():
    with pytest.raises(PipeshiftError, match="at least as many microbatches as stages"):
        S.rank_actions("2bw", 4, 0, 2, minibatches=3)


# -- deadlock freedom: a discrete-event replay of every rank's actions ----------------------------


def _simulate(kind: str, replicas: list[int], m: int, minibatches: int = 2) -> int:
    """Run all ranks' action lists against each other with rendezvous sends; return max in flight.

    A receive is usable once its sender has sent; a ``flush`` waits until every send has been
    posted for by its receiver (gloo semantics); an all-reduce waits for the stage's replicas.
    """
    n = len(replicas)
    ranks = list(itertools.accumulate([0] + replicas))
    stage_ranks = [list(range(ranks[s], ranks[s + 1])) for s in range(n)]
    lists, where = {}, {}
    for s in range(n):
        for j, r in enumerate(stage_ranks[s]):
            role = S.Role(loads_data=s == 0, receives_inputs=s > 0, sends_outputs=s < n - 1,
                          receives_grads=s < n - 1, sends_grads=s > 0, replicated=replicas[s] > 1)
            order = S.compute_order(kind, n, s, m, replicas=replicas[s], minibatches=minibatches,
                                    stage_replicas=replicas)
            lists[r] = S.plan_weight_versions(S.lower(S.for_replica(order, replicas[s], j), role),
                                              S.version_rule(kind, m))
            where[r] = s

    def peer(stage, mb):
        return stage_ranks[stage][mb % replicas[stage]]

    sent, posted, unmatched = set(), set(), {r: set() for r in lists}
    arrivals, reached = {}, {r: 0 for r in lists}
    pc = {r: 0 for r in lists}
    inflight = {r: 0 for r in lists}
    peak = 0
    while any(pc[r] < len(lists[r]) for r in lists):
        moved = False
        for r in lists:
            while pc[r] < len(lists[r]):
                a, s = lists[r][pc[r]], where[r]
                if a.kind == S.RECV_FWD:
                    posted.add(("F", s, a.mb))
                elif a.kind == S.RECV_BWD:
                    posted.add(("B", s, a.mb))
                elif a.kind == S.FWD:
                    if s > 0 and ("F", s, a.mb) not in sent:
                        break
                    inflight[r] += 1
                elif a.kind == S.BWD:
                    if s < n - 1 and ("B", s, a.mb) not in sent:
                        break
                    inflight[r] -= 1
                elif a.kind == S.SEND_FWD:
                    sent.add(("F", s + 1, a.mb))
                    unmatched[r].add(("F", s + 1, a.mb))
                elif a.kind == S.SEND_BWD:
                    sent.add(("B", s - 1, a.mb))
                    unmatched[r].add(("B", s - 1, a.mb))
                elif a.kind == S.ALLREDUCE:
                    key = (s, reached[r])
                    if arrivals.get(key, set()) is not None:
                        arrivals.setdefault(key, set()).add(r)
                    if len(arrivals[key]) < replicas[s]:
                        break
                    reached[r] += 1
                elif a.kind == S.FLUSH:
                    if unmatched[r] - posted:
                        break
                peak = max(peak, inflight[r])
                pc[r] += 1
                moved = True
        if not moved:
            stuck = {r: str(lists[r][pc[r]]) for r in lists if pc[r] < len(lists[r])}
            raise AssertionError(f"deadlock: {stuck}")
    return peak


@pytest.mark.parametrize("kind", S.SCHEDULES)
@pytest.mark.parametrize("replicas", [[1], [1, 1], [1, 1, 1], [2, 1], [1, 2], [2, 1, 2], [1, 1, 1, 1]])
def test_every_schedule_completes_without_deadlock(kind, replicas):
    m = 2 * max(len(replicas), max(replicas))
    peak = _simulate(kind, replicas, m)
    # backpressure: 1F1B-style schedules bound the microbatches a rank holds by the ranks after it
    bound = m if kind == "gpipe" else sum(replicas)
    assert peak <= bound


def test_topology_routes_skips_raw_inputs_and_targets():
    io = [(["input0"], ["node1"]), (["node1"], ["node2", "node3"]),
          (["node1", "node2", "node3", "input0"], ["node4"]), (["node4", "target"], ["loss"])]
    topo = build_topology(io, [0, 1, 2, 2], {"0": [0], "1": [1, 2], "2": [3]})
    assert {(e.name, e.src, e.dst, e.raw) for e in topo.edges} == {
        ("node1", 0, 1, False), ("node1", 0, 2, False), ("node2", 1, 2, False), ("node3", 1, 2, False),
        ("input0", 0, 2, True), ("target", 0, 2, True)}
    assert [topo.rank_for(1, mb) for mb in range(4)] == [1, 2, 1, 2]
    assert topo.stage_of(2) == 1 and topo.replica_of(2) == 1 and topo.world_size == 4


@pytest.mark.parametrize("io, m2s, ranks, message", [
    ([(["input0"], ["a"]), (["b", "target"], ["loss"])], [0, 1], {"0": [0], "1": [1]}, "no earlier module"),
    ([(["input0"], ["a"]), (["a", "target"], ["loss"])], [0, 0], {"0": [0], "1": [1]}, "expected 0..0"),
    ([(["input0"], ["a"]), (["a", "target"], ["loss"])], [1, 0], {"0": [0], "1": [1]}, "never decrease"),
    ([(["input0"], ["a"]), (["a", "target"], ["loss"])], [0, 1], {"0": [0], "1": [2]}, "exactly once"),
    ([(["input0"], ["a"]), (["a", "target"], ["out"])], [0, 1], {"0": [0], "1": [1]}, "must output"),
    ([(["input0"], ["a"]), (["a"], ["loss"])], [0, 1], {"0": [0], "1": [1]}, "target"),
    ([(["input0"], ["a"]), (["a", "target"], ["loss"])], [0, 1, 1], {"0": [0], "1": [1]}, "3 entries"),
])
def test_topology_rejects_bad_partitions(io, m2s, ranks, message):
    with pytest.raises(PipeshiftError, match=message):
        build_topology(io, m2s, ranks)
