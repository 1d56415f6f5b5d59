"""``pipeshift plan --objective serve``: forward-only costs, free replication, memory, latency objective.

The brute force is written from the serving cost model's definition (cost.py's docstring):
a stage on r replicas takes forward/r, a cut one message per batch, memory is the weights plus
the activations of ceil((D + r)/r) batches in flight — independently of the DP code.
"""

from __future__ import annotations

import math
import random

import pytest

from pipeshift.errors import PipeshiftError
from pipeshift.optimizer.cost import SERVE, Schedule
from pipeshift.optimizer.planner import PlanOptions, make_plan, predicted_latency_s
from pipeshift.optimizer.topology import Level, Topology
from test_planner import all_downset_set, brute_force, cut_bytes, random_dag

INF = math.inf


def bf_serve(g, level: Level, N: int, memory: float | None) -> float:
    base = frozenset(n for n in g.sources() if g[n].desc.startswith("Input"))
    states = all_downset_set(g, base)

    def cost(prev, d, r, used, first):
        nodes = d - prev
        comp = sum(g[n].forward_ms for n in nodes) / 1000.0
        par = sum(g[n].parameter_size for n in nodes)
        act = sum(g[n].activation_bytes for n in nodes)
        t = comp / r
        if not first:
            t = max(t, (level.latency + cut_bytes(g, prev) / level.bandwidth) / r)
        if memory is not None and par + math.ceil((N - used - r + r) / r) * act > memory:
            return INF
        return t

    return brute_force(cost, states, states[-1], N, False, False)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_serve_dp_equals_brute_force(seed: int) -> None:
    g = random_dag(seed, 6, chain=seed % 2 == 0)
    rng = random.Random(seed)
    for N in (1, 2, 3):
        level = Level(N, rng.choice([1e8, 1e9]), rng.choice([0.0, 1e-4]))
        memory = None
        if rng.random() < 0.6:
            memory = sum(x.activation_bytes + x.parameter_size for x in g) * rng.uniform(0.3, 1.2)
        want = bf_serve(g, level, N, memory)
        opt = PlanOptions(memory_limit=memory, schedule=Schedule(SERVE, 1), search="exact")
        try:
            got = make_plan(g, Topology((level,)), opt).optimum
        except PipeshiftError:
            got = INF
        assert (got == want == INF) or math.isclose(got, want, rel_tol=1e-9), (N, memory, got, want)


def test_replicas_cost_serving_nothing_but_memory() -> None:
    g = random_dag(7, 8, chain=True)
    topo = Topology((Level(4, 1e8),))
    serve = make_plan(g, topo, PlanOptions(schedule=Schedule(SERVE, 1)))
    # unconstrained, one stage on every worker is optimal: the whole forward, shared four ways
    assert [len(st.workers) for st in serve.stages] == [4]
    assert math.isclose(serve.optimum, sum(n.forward_ms for n in g) / 1000.0 / 4)
    train = make_plan(g, topo, PlanOptions(schedule=Schedule("1f1b", 4)))
    assert train.optimum > serve.optimum


def test_latency_objective() -> None:
    g = random_dag(5, 8, chain=True)
    params = sum(n.parameter_size for n in g)
    topo = Topology((Level(3, 1e8, 1e-3),))
    # weights that fit nowhere whole force a pipeline; its cuts add latency
    base = PlanOptions(schedule=Schedule(SERVE, 1), memory_limit=params * 0.7 + 64 * 2 ** 20 * 3, search="exact")
    free = make_plan(g, topo, base)
    lat = predicted_latency_s(g, free.stages, free.states, free.arrays, topo, base)
    forward = sum(n.forward_ms for n in g) / 1000.0
    assert len(free.stages) >= 2 and lat > forward
    with pytest.raises(PipeshiftError, match="no plan meets --latency-slo"):
        make_plan(g, topo, PlanOptions(**{**base.__dict__, "latency_slo_s": forward * 0.5}))
    loose = PlanOptions(**{**base.__dict__, "latency_slo_s": lat * 2})
    assert make_plan(g, topo, loose).optimum == free.optimum


def test_latency_objective_forbids_a_heavy_cut() -> None:
    from pipeshift.graph import Graph, Node

    g = Graph()
    g.add_node(Node("node1", "Input0", activation_size=1e3))
    # forward ms and output bytes per layer; each layer 100 MB of weights, three fit a worker, four do not
    for i, (ms, out) in enumerate([(30, 1e3), (10, 3e7), (10, 1e3), (30, 1e3)], start=2):
        g.add_node(Node(f"node{i}", "Linear(4, 4)", forward_ms=ms, backward_ms=ms, activation_size=out,
                        parameter_size=1e8))
        g.add_edge(f"node{i - 1}", f"node{i}")
    topo = Topology((Level(2, 1e9),))
    base = PlanOptions(schedule=Schedule(SERVE, 1), memory_limit=4e8, search="exact")
    free = make_plan(g, topo, base)
    # the throughput optimum cuts after node3 (40 ms | 40 ms) and its 30 MB cut adds 30 ms of latency
    assert free.stages[0].nodes[-1] == "node3" and math.isclose(free.optimum, 0.040)
    assert math.isclose(predicted_latency_s(g, free.stages, free.states, free.arrays, topo, base), 0.110)
    bounded_opt = PlanOptions(**{**base.__dict__, "latency_slo_s": 0.090})
    bounded = make_plan(g, topo, bounded_opt)
    latency = predicted_latency_s(g, bounded.stages, bounded.states, bounded.arrays, topo, bounded_opt)
    assert latency <= 0.090 and math.isclose(bounded.optimum, 0.050)
    assert bounded.stages[0].nodes[-1] in ("node2", "node4")
