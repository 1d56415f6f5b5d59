"""Schedules are data: their orders, weight versions and deadlock-freedom, checked without processes."""

from __future__ import annotations

import itertools

import pytest

from pipeshift.errors import PipeshiftError
from pipeshift.schedule import actions as S
from pipeshift.schedule import order as O
from pipeshift.schedule.registry import SCHEDULES
from pipeshift.optimizer.simulator import SimStage, rank_lists
from pipeshift.runtime.pipeline import rank_schedule
from pipeshift.runtime.topology import build_topology
from pipeshift.schedule import check as C
from pipeshift.schedule.check import validate_schedule


def ops(order):
    return " ".join(str(w) for w in order)


def test_flush_and_gpipe_orders():
    assert ops(O.compute_order("gpipe", 2, 0, 3)) == "F0 F1 F2 B0 B1 B2 S"
    assert ops(O.compute_order("flush", 3, 0, 4)) == "F0 F1 F2 B0 F3 B1 B2 B3 S"
    assert ops(O.compute_order("flush", 3, 1, 4)) == "F0 F1 B0 F2 B1 F3 B2 B3 S"
    assert ops(O.compute_order("flush", 3, 2, 4)) == "F0 B0 F1 B1 F2 B2 F3 B3 S"
    two = O.compute_order("flush", 2, 0, 2, minibatches=2)
    assert ops(two) == "F0 F1 B0 B1 S F2 F3 B2 B3 S"
    assert all(w.grads == 2 and w.minibatch_end for w in two if w.op == "S")


def test_async_orders_step_per_backward_group():
    order = O.compute_order("1f1b", 2, 0, 2, minibatches=2)
    assert ops(order) == "F0 F1 B0 S F2 B1 S F3 B2 S B3 S"
    assert [w.minibatch_end for w in order if w.op == "S"] == [False, True, False, True]
    # replicas of a 1f1b stage step together, once per microbatch each
    order = O.compute_order("1f1b", 2, 1, 4, replicas=2)
    assert ops(order) == "F0 F1 B0 F2 B1 S F3 B2 B3 S"
    assert [w.grads for w in order if w.op == "S"] == [2, 2]
    assert ops(O.compute_order("2bw", 2, 0, 2, minibatches=2)) == "F0 F1 B0 F2 B1 S F3 B2 B3 S"


def test_replicas_split_microbatches_round_robin():
    # stage 0 x2 feeding stage 1 x1: one microbatch in flight for each of the three ranks
    assert O.in_flight([2, 1], 0) == 3 and O.in_flight([2, 1], 1) == 1
    order = O.compute_order("flush", 2, 0, 6, stage_replicas=[2, 1])
    assert ops(order) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5 S"
    mine = [O.for_replica(order, 2, r) for r in range(2)]
    assert ops(mine[0]) == "F0 F2 B0 F4 B2 B4 S"
    assert ops(mine[1]) == "F1 F3 B1 F5 B3 B5 S"
    # warm-up never grows downstream (1F1B deadlocks otherwise)
    for reps in ([1, 3, 1], [1, 1, 1, 1], [2, 1, 2]):
        depth = [O.in_flight(reps, s) for s in range(len(reps))]
        assert depth == sorted(depth, reverse=True) and depth[-1] == reps[-1]


def test_lowering_prefetches_receives_and_ends_with_flush():
    acts = S.rank_actions("flush", 2, 1, 2)
    assert [str(a) for a in acts] == [
        "recv_fwd mb0", "recv_fwd mb1", "fwd mb0 @v0", "bwd mb0 @v0", "send_bwd mb0",
        "fwd mb1 @v0", "bwd mb1 @v0", "send_bwd mb1", "step (minibatch end)", "flush"]
    # a gradient receive is never posted before its own forward has run
    for kind, stages, m, reps in itertools.product(SCHEDULES, (2, 3), (3, 4), (1, 2)):
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
        O.compute_order("pipedream", 2, 0, 2)


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


# -- deadlock freedom and consistency: the library's replay, run at start-up ---------------------
LAYOUTS = [[1], [2], [1, 1], [2, 1], [1, 2], [1, 1, 1], [2, 1, 2], [1, 3, 1], [1, 1, 1, 1], [2, 1, 1, 2]]


def _stage_ranks(replicas):
    bounds = list(itertools.accumulate([0, *replicas]))
    return tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]))


def _chain_topology(replicas):
    """A partition whose stage s reads the previous stage's activation: the runtime's routing of a chain."""
    n = len(replicas)
    io = [(["input0"] if s == 0 else [f"act{s - 1}"], [f"act{s}"]) for s in range(n)]
    io.append(([f"act{n - 1}", "target"], ["loss"]))
    return build_topology(io, [*range(n), n - 1], _stage_ranks(replicas))


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("replicas", LAYOUTS)
def test_simulator_replays_the_lists_the_runtime_runs(kind, replicas):
    """For every schedule on 1-4 stages with replication, each rank's list is the same in both."""
    m, steps = 2 * max(len(replicas), *replicas) * max(replicas), 2
    stages = [SimStage(forward_s=1.0, backward_s=2.0, replicas=r, ranks=ranks)
              for r, ranks in zip(replicas, _stage_ranks(replicas))]
    simulated = rank_lists(stages, kind, m, steps)
    topo = _chain_topology(replicas)
    runtime = {rank: rank_schedule(topo, rank, kind, m, steps) for ranks in topo.stage_ranks for rank in ranks}
    assert simulated == runtime
    # and the lists pass the start-up check: no deadlock, every microbatch once, the cost model's bounds
    replayed = validate_schedule(kind, _stage_ranks(replicas), m, steps)
    assert set(replayed.peak_in_flight) == set(runtime)


def A_lists(kind, replicas, m, minibatches=2):
    return S.pipeline_actions(kind, _stage_ranks(replicas), m, minibatches)


def _replay(kind, replicas, m, lists, minibatches=2):
    return C.replay(kind, _stage_ranks(replicas), m, minibatches, lists)


def test_replay_bounds_microbatches_in_flight_by_the_ranks_downstream():
    # 1F1B-style schedules hold one microbatch per worker from the stage to the end; GPipe all of them
    for kind, want in [("flush", [3, 2, 1]), ("1f1b", [3, 2, 1]), ("gpipe", [6, 6, 6])]:
        replayed = _replay(kind, [1, 1, 1], 6, A_lists(kind, [1, 1, 1], 6))
        assert [replayed.peak_in_flight[r] for r in range(3)] == want


@pytest.mark.parametrize(("breakage", "message"), [
    ("backward_first", "deadlocks with 4 microbatches on ranks \\[\\[0, 1\\], \\[2\\]\\]: rank 0 at #0 bwd mb0"),
    ("drop_allreduce", "deadlocks .*rank 1 at #11 allreduce"),  # its replica waits in the collective
    ("drop_allreduce_both", "all-reduced 1 times, the cost model counts 2"),
    ("forward_twice", "forward of microbatch 0 twice"),
    ("drop_backward", "ran B of microbatches"),
    ("extra_step", "took 3 optimizer steps"),
    ("wrong_replica", "which stage 0 runs on rank 1"),
])
def test_replay_refuses_broken_lists(breakage, message):
    replicas = [2, 1]
    lists = A_lists("flush", replicas, 4)
    r0 = lists[0]
    if breakage == "backward_first":  # waits for a gradient of a forward it has not run: nobody can move
        first_bwd = next(a for a in r0 if a.kind == S.BWD)
        r0.remove(first_bwd)
        r0.insert(0, first_bwd)
    elif breakage.startswith("drop_allreduce"):
        for r in (0, 1) if breakage.endswith("both") else (0,):
            lists[r].remove(next(a for a in lists[r] if a.kind == S.ALLREDUCE))
    elif breakage == "forward_twice":
        r0.insert(r0.index(next(a for a in r0 if a.kind == S.FWD)), next(a for a in r0 if a.kind == S.FWD))
    elif breakage == "drop_backward":
        r0.remove(next(a for a in r0 if a.kind == S.BWD and a.mb == 2))
    elif breakage == "extra_step":
        r0.append(next(a for a in r0 if a.kind == S.STEP))
    elif breakage == "wrong_replica":
        lists[0], lists[1] = lists[1], lists[0]
    with pytest.raises(PipeshiftError, match=message):
        _replay("flush", replicas, 4, lists)


def test_startup_check_refuses_impossible_microbatch_counts():
    with pytest.raises(PipeshiftError, match="do not divide"):
        validate_schedule("flush", ((0, 1), (2,)), 3)
    with pytest.raises(PipeshiftError, match="at least as many microbatches as stages"):
        validate_schedule("2bw", ((0,), (1,), (2,)), 2)


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
