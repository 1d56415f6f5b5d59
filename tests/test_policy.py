"""The repartitioning policy: hysteresis, cost/benefit, cool-down, the built-in DP, plan diffs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeshift.errors import PipeshiftError
from pipeshift.graph.ir import Graph, Node
from pipeshift.plan import parse_plan
from pipeshift.runtime.policy import (
    Chain,
    PolicyConfig,
    RepartitionPolicy,
    boundary_bytes,
    brute_force_straight_pipeline,
    chain_from_graph,
    diff_plans,
    pipeline_time_s,
    replace_stages,
    stages_of,
    straight_pipeline_dp,
)


def linear_chain(times_s, param_bytes=None, act_bytes=None) -> Chain:
    n = len(times_s)
    return Chain(
        node_ids=[f"node{i}" for i in range(n)],
        node_times_s=np.asarray(times_s, dtype=float),
        activation_bytes=np.asarray(act_bytes if act_bytes is not None else [0.0] * n, dtype=float),
        state_bytes=np.asarray(param_bytes if param_bytes is not None else [1e6] * n, dtype=float),
        edges=np.array([(i, i + 1) for i in range(n - 1)], dtype=np.int64).reshape(-1, 2),
        fqns=[f"layer{i}" for i in range(n)],
    )


def split(chain: Chain, bounds) -> list[list[str]]:
    return [chain.node_ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def measured_for(policy: RepartitionPolicy, true_speed) -> np.ndarray:
    """What the runtime would measure: each stage's profiled time × its worker's true speed."""
    profiled = np.bincount(policy.assignment, weights=policy.chain.node_times_s, minlength=policy.num_stages)
    return profiled * np.asarray(true_speed, dtype=float)


# -- the built-in DP against brute force ---------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force_with_speed_factors(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))
    workers = int(rng.integers(1, min(n, 4) + 1))
    times = rng.uniform(0.1, 2.0, n)
    speed = rng.uniform(0.5, 3.0, workers)
    matrix = np.outer(speed, times)
    cut = np.concatenate([[0.0], rng.uniform(0.0, 1.5, n - 1), [0.0]]) if seed % 2 else None
    bounds, value = straight_pipeline_dp(matrix, cut)
    assert value == pytest.approx(brute_force_straight_pipeline(matrix, cut), rel=1e-12)
    # The returned split really achieves the value.
    assert bounds[0] == 0 and bounds[-1] == n and all(a < b for a, b in zip(bounds[:-1], bounds[1:]))
    achieved = max(matrix[k, bounds[k] : bounds[k + 1]].sum() for k in range(workers))
    if cut is not None:
        achieved = max([achieved, *(cut[b] for b in bounds[1:-1])])
    assert achieved == pytest.approx(value, rel=1e-12)


def test_dp_rejects_more_workers_than_nodes():
    with pytest.raises(PipeshiftError):
        straight_pipeline_dp(np.ones((4, 3)))


def test_cut_and_boundary_bytes_agree_on_skip_connections():
    # node0 feeds node1 and node3 (a skip connection): its output crosses every cut up to node3.
    chain = linear_chain([1.0] * 5, act_bytes=[10.0, 1.0, 2.0, 3.0, 4.0])
    chain.edges = np.array([(0, 1), (1, 2), (2, 3), (3, 4), (0, 3)], dtype=np.int64)
    cut = chain.cut_bytes()
    assert cut.tolist() == [0.0, 10.0, 11.0, 12.0, 3.0, 0.0]
    for bounds in ([0, 1, 5], [0, 2, 3, 5], [0, 1, 2, 3, 4, 5]):
        stages = split(chain, bounds)
        crossing = boundary_bytes(chain, chain.assignment(stages), len(stages))
        assert crossing.tolist() == [cut[b] for b in bounds[1:-1]]


# -- plan diffs -----------------------------------------------------------------------------
def test_diff_plans_moves_exactly_the_changed_nodes():
    old = parse_plan({"stages": [{"stage_id": 0, "nodes": ["a", "b", "c"]}, {"stage_id": 1, "nodes": ["d", "e"]}]})
    new = [["a", "b"], ["c", "d", "e"]]
    node_bytes = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0, "e": 16.0}
    moves = diff_plans(old, new, node_bytes, {"c": "layer.c"})
    assert [(m.node, m.fqn, m.from_stage, m.to_stage, m.bytes) for m in moves] == [("c", "layer.c", 0, 1, 4.0)]
    assert diff_plans(old, old, node_bytes) == []
    back = diff_plans(new, old, node_bytes)
    assert [(m.node, m.from_stage, m.to_stage) for m in back] == [("c", 1, 0)]


def test_diff_plans_rejects_plans_over_different_nodes():
    with pytest.raises(PipeshiftError, match="different nodes"):
        diff_plans([["a"], ["b"]], [["a"], ["c"]], {})


@pytest.mark.parametrize(
    "plan, message",
    [
        ({}, "no 'stages'"),
        ({"stages": [{"nodes": []}]}, "no stage may be empty"),
        ([["a"], []], "at least one node"),
        ([["a"], ["a"]], "stage 0 and stage 1"),
        ({"stages": [{"nodes": ["a"]}, {"nodes": ["a"]}]}, "stage 0 and stage 1"),
        ({"stages": [{"stage_id": 1, "nodes": ["a"]}]}, "pipeline order"),
        ({"stages": [{"nodes": [3]}]}, "strings"),
        ({"stages": [{"nodes": ["a"], "ranks": ["x"]}]}, "ranks"),
        ("stages", "JSON object"),
    ],
)
def test_stages_of_rejects_malformed_plans(plan, message):
    with pytest.raises(PipeshiftError, match=message):
        stages_of(parse_plan(plan) if isinstance(plan, dict) else plan)


def test_replace_stages_keeps_ranks_and_updates_predictions():
    plan = {
        "version": 1, "num_workers": 2, "predicted": {"time_per_minibatch_s": 3.0},
        "stages": [
            {"stage_id": 0, "nodes": ["a", "b"], "fqns": ["fa", "fb"], "ranks": [0], "replicas": 1},
            {"stage_id": 1, "nodes": ["c"], "fqns": ["fc"], "ranks": [1], "replicas": 1},
        ],
    }
    new = replace_stages(parse_plan(plan), [["a"], ["b", "c"]], [1.0, 2.0])
    out = new.to_json()
    assert [s["nodes"] for s in out["stages"]] == [["a"], ["b", "c"]]
    assert [s["fqns"] for s in out["stages"]] == [["fa"], ["fb", "fc"]]
    assert [s["ranks"] for s in out["stages"]] == [[0], [1]]
    assert out["predicted"]["time_per_minibatch_s"] == 2.0
    assert plan["stages"][0]["nodes"] == ["a", "b"]  # the input is not modified
    assert stages_of(new) == [["a"], ["b", "c"]]


def test_chain_from_graph_reads_times_bytes_and_order():
    g = Graph()
    g.add_node(Node("node1", "Input0"))
    g.add_node(Node("node2", "Linear", forward_ms=1.0, backward_ms=2.0, activation_size=64.0, parameter_size=100.0,
                    meta={"fqn": "fc1", "buffer_bytes": 8}))
    g.add_node(Node("node3", "ReLU", forward_ms=0.5, backward_ms=0.5, activation_size=64.0))
    g.add_edge("node1", "node2")
    g.add_edge("node2", "node3")
    chain = chain_from_graph(g, optimizer="momentum")
    assert chain.node_ids == ["node1", "node2", "node3"]
    assert chain.node_times_s.tolist() == pytest.approx([0.0, 0.003, 0.001])
    assert chain.state_bytes.tolist() == [0.0, 100.0 * 2 + 8, 0.0]
    assert chain.node_fqns == {"node2": "fc1"}
    with pytest.raises(PipeshiftError, match="unknown optimizer"):
        chain_from_graph(g, optimizer="lion")


# -- the policy ----------------------------------------------------------------------------
CONFIG = PolicyConfig(threshold=0.15, clear_threshold=0.05, persist_windows=3, cooldown_windows=2,
                      bandwidth_bytes_per_s=1e9, fixed_pause_s=0.5)


def balanced_policy(config=CONFIG, n=8, workers=2, **chain_args) -> RepartitionPolicy:
    chain = linear_chain([1.0] * n, **chain_args)
    return RepartitionPolicy(chain, split(chain, np.linspace(0, n, workers + 1).astype(int).tolist()), config)


def test_noise_within_threshold_never_repartitions_or_flaps():
    policy = balanced_policy()
    rng = np.random.default_rng(0)
    decisions = []
    for window in range(200):
        noise = rng.uniform(-0.12, 0.12, policy.num_stages)  # below the 0.15 threshold
        decisions.append(policy.observe(measured_for(policy, 1.0 + noise), step=window, remaining_steps=10**6))
    assert not any(d.repartition for d in decisions)
    assert all(d.streak == 0 for d in decisions)


def test_isolated_spikes_do_not_add_up_to_a_repartition():
    policy = balanced_policy()
    # Two windows above threshold, one clearly below, two above again...: never 3 in a row.
    pattern = [1.3, 1.3, 1.0] * 10
    decisions = [policy.observe(measured_for(policy, [s, 1.0]), remaining_steps=10**6) for s in pattern]
    assert not any(d.repartition for d in decisions)
    assert max(d.streak for d in decisions) == 2


def test_signal_between_thresholds_holds_the_streak():
    policy = balanced_policy()
    streaks = [policy.observe(measured_for(policy, [s, 1.0]), remaining_steps=0).streak for s in (1.3, 1.1, 1.3)]
    assert streaks == [1, 1, 2]  # 1.1 is inside the hysteresis band: neither counts nor clears


def test_persistent_slowdown_repartitions_when_gain_pays_for_migration():
    policy = balanced_policy()
    true_speed = [1.5, 1.0]  # worker 0 became 1.5x slower
    decisions = [policy.observe(measured_for(policy, true_speed), step=100 + w, remaining_steps=1000) for w in range(3)]
    assert [d.repartition for d in decisions] == [False, False, True]
    d = decisions[-1]
    assert d.speed_factors == pytest.approx(true_speed)
    # Reference: every split of 8 unit-time nodes with worker 0 at 1.5x (the optimum is unique).
    times = {b: max(1.5 * b, 8.0 - b) for b in range(1, 8)}
    best_bounds = min(times, key=times.get)
    best_time = times[best_bounds]
    assert sorted(times.values())[1] > best_time
    assert d.new_stages == [[f"node{i}" for i in range(best_bounds)], [f"node{i}" for i in range(best_bounds, 8)]]
    assert d.current_time_s == pytest.approx(max(1.5 * 4, 4.0)) and d.new_time_s == pytest.approx(best_time)
    moved = 4 - best_bounds
    assert d.migration_bytes == pytest.approx(moved * 1e6)
    assert d.migration_cost_s == pytest.approx(moved * 1e6 / 1e9 + 0.5)
    assert d.total_gain_s == pytest.approx((6.0 - best_time) * 1000)
    assert len(d.moves) == moved and all(m["from_stage"] == 0 and m["to_stage"] == 1 for m in d.moves)
    # The policy now runs the new split and expects the slowed worker's speed there.
    assert policy.stages == d.new_stages
    assert policy.expected_s().tolist() == pytest.approx(measured_for(policy, true_speed).tolist())


def test_no_repartition_when_too_few_steps_remain():
    policy = balanced_policy(config=PolicyConfig(**{**CONFIG.__dict__, "fixed_pause_s": 100.0}))
    decisions = [policy.observe(measured_for(policy, [2.0, 1.0]), remaining_steps=10) for _ in range(3)]
    d = decisions[-1]
    assert not d.repartition and "does not pay" in d.reason
    assert d.total_gain_s == pytest.approx(d.gain_per_step_s * 10) and d.total_gain_s < d.migration_cost_s
    # The finding is accepted as the new normal: the same slowdown does not re-trigger every window.
    later = [policy.observe(measured_for(policy, [2.0, 1.0]), remaining_steps=10) for _ in range(5)]
    assert all(x.streak == 0 and x.new_stages is None for x in later)
    # With plenty of steps the same numbers would have been worth it.
    fresh = balanced_policy(config=PolicyConfig(**{**CONFIG.__dict__, "fixed_pause_s": 100.0}))
    yes = [fresh.observe(measured_for(fresh, [2.0, 1.0]), remaining_steps=10**6) for _ in range(3)]
    assert yes[-1].repartition


def test_uniform_slowdown_is_detected_but_not_worth_a_migration():
    policy = balanced_policy()
    decisions = [policy.observe(measured_for(policy, [1.5, 1.5]), remaining_steps=10**6) for _ in range(3)]
    assert decisions[-1].streak == 3 and not decisions[-1].repartition
    assert "too little" in decisions[-1].reason


def test_cooldown_is_respected_after_a_repartition():
    policy = balanced_policy(n=12, workers=3)
    speed = [2.0, 1.0, 1.0]
    first = [policy.observe(measured_for(policy, speed), remaining_steps=10**6) for _ in range(3)]
    assert first[-1].repartition
    # Worker 1 now slows down too; the first cooldown_windows windows are ignored whatever they show.
    speed = [2.0, 3.0, 1.0]
    after = [policy.observe(measured_for(policy, speed), remaining_steps=10**6) for _ in range(2 + 3)]
    assert [d.repartition for d in after] == [False, False, False, False, True]
    assert all("cool-down" in d.reason for d in after[:2])
    assert after[2].streak == 1 and after[4].speed_factors == pytest.approx(speed)


def test_repartition_cycle_returns_to_balance_when_slowdown_ends():
    policy = balanced_policy(config=PolicyConfig(**{**CONFIG.__dict__, "cooldown_windows": 0}))
    original = [list(s) for s in policy.stages]
    for _ in range(3):
        policy.observe(measured_for(policy, [2.0, 1.0]), remaining_steps=10**6)
    assert policy.stages != original
    decisions = [policy.observe(measured_for(policy, [1.0, 1.0]), remaining_steps=10**6) for _ in range(3)]
    assert decisions[-1].repartition and policy.stages == original


def test_injected_replanner_is_used_and_checked():
    chain = linear_chain([1.0] * 4)
    seen = {}

    def replan(request):
        seen["times"] = request.node_times_s.copy()
        return [request.node_ids[:1], request.node_ids[1:]]

    policy = RepartitionPolicy(chain, split(chain, [0, 2, 4]), CONFIG, replan=replan)
    for _ in range(3):
        d = policy.observe(measured_for(policy, [3.0, 1.0]), remaining_steps=10**6)
    assert d.repartition and d.new_stages == [["node0"], ["node1", "node2", "node3"]]
    assert seen["times"].tolist() == [[3.0] * 4, [1.0] * 4]

    bad = RepartitionPolicy(chain, split(chain, [0, 2, 4]), CONFIG, replan=lambda r: [r.node_ids])
    with pytest.raises(PipeshiftError, match="1 stages for 2 workers"):
        for _ in range(3):
            bad.observe(measured_for(bad, [3.0, 1.0]))


def test_comm_bound_cut_is_avoided_by_the_model():
    # A heavy activation after node1 makes that cut expensive; the model must account for it.
    chain = linear_chain([1.0] * 4, act_bytes=[0.0, 1e10, 0.0, 0.0])
    assignment = chain.assignment(split(chain, [0, 2, 4]))
    assert pipeline_time_s(chain, assignment, 2, np.ones(2), 1e9) == pytest.approx(20.0)


def test_observe_rejects_bad_measurements():
    policy = balanced_policy()
    with pytest.raises(PipeshiftError):
        policy.observe([1.0])
    with pytest.raises(PipeshiftError):
        policy.observe([float("nan"), 1.0])


def test_config_is_validated():
    with pytest.raises(PipeshiftError):
        PolicyConfig(threshold=0.1, clear_threshold=0.2)
