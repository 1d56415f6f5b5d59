"""The planner's choice of tensor-parallel degree (``plan --tp``), on graphs with a known answer.

One transformer-like block dominates: a column-parallel layer (3 ms) then a row-parallel one
(1 ms), between small layers. A stage boundary cannot split a layer, so a 2-stage pipeline is
paced by the 3 ms layer; TP 2 halves both (2 ms) but pays the pair's all-reduces. Replicating
is ruled out by memory (a worker holds weights and gradients of at most half the model). With a
fast link (1 TB/s) TP wins: 3.45 ms against the pipeline's 4.65 ms. At 1 GB/s TP's two
all-reduces of 1 MB add 2.1 ms to its compute, while the pipeline's transfers (the block's
output and the residual, 2 MB each way, 4.2 ms) overlap its compute: the pipeline wins.
"""

from __future__ import annotations

import pytest

from pipeshift.errors import PipeshiftError
from pipeshift.graph import Graph, Node
from pipeshift.optimizer.cost import Schedule
from pipeshift.optimizer.planner import PlanOptions, TPOptions, make_plan, planning_graph, with_tp_nodes
from pipeshift.optimizer.topology import Level, Topology

MB = 1024 * 1024


def block_graph() -> Graph:
    g = Graph()
    g.add_node(Node("node1", "Input0", activation_size=1 * MB))
    spec = [("node2", "LayerNorm", 0.05, "ln", 0.0), ("node3", "Linear(up)", 1.5, "up", 40 * MB),
            ("node4", "GELU", 0.05, "act", 0.0), ("node5", "Linear(down)", 0.5, "down", 40 * MB),
            ("node6", "add", 0.05, "res", 0.0)]
    prev = "node1"
    for nid, desc, fwd, fqn, params in spec:
        g.add_node(Node(nid, desc, forward_ms=fwd, backward_ms=2 * fwd, activation_size=1 * MB,
                        parameter_size=params, meta={"fqn": fqn}))
        g.add_edge(prev, nid)
        prev = nid
    g.add_edge("node1", "node6")
    return g


def plan(bandwidth: float, degrees=(1, 2)):
    graph = block_graph()
    opt = PlanOptions(schedule=Schedule("flush", 4), optimizer_states=0.0, memory_limit=2.0 * 60 * MB,
                      tp=TPOptions(degrees=tuple(degrees), modules={"up": "colwise", "down": "rowwise"}))
    opt = with_tp_nodes(graph, planning_graph(graph, "pipeshift"), opt)
    return make_plan(graph, Topology([Level(2, bandwidth, 0.0)]), opt)


def test_fast_link_big_layers_choose_tensor_parallelism() -> None:
    result = plan(1e12)
    assert [(st.tp, st.replicas, len(st.workers)) for st in result.stages] == [(2, 1, 2)]
    # both big layers at half their time (forward + backward = 3 × forward), nothing else split
    assert result.optimum == pytest.approx((0.05 + 0.75 + 0.05 + 0.25 + 0.05) * 3 / 1000, rel=1e-3)


def test_slow_link_chooses_the_pipeline() -> None:
    result = plan(1e9)
    assert [(st.tp, st.replicas) for st in result.stages] == [(1, 1), (1, 1)]
    assert result.stages[0].nodes[-1] in ("node3", "node4")  # the cut falls between the two big layers


def test_tp_one_is_the_plain_planner_and_bad_requests_are_refused() -> None:
    graph = block_graph()
    plain = make_plan(graph, Topology([Level(2, 1e12, 0.0)]),
                      PlanOptions(schedule=Schedule("flush", 4), optimizer_states=0.0, memory_limit=2.0 * 60 * MB))
    assert plan(1e12, degrees=(1,)).optimum == pytest.approx(plain.optimum)
    with pytest.raises(PipeshiftError, match="records no TP plan"):
        with_tp_nodes(graph, planning_graph(graph, "pipeshift"), PlanOptions(tp=TPOptions(degrees=(1, 2))))


def saved_graph() -> Graph:
    """The block with what each node saves for backward (MLP 4× wide): ln 1 MB, up its input
    1 MB, the activation its 4 MB input, down its 4 MB input, the residual add nothing."""
    g = block_graph()
    for nid, saved in (("node2", 1), ("node3", 1), ("node4", 4), ("node5", 4), ("node6", 0)):
        g[nid].meta["saved_bytes"] = saved * MB
    return g


def test_held_activations_are_split_between_the_pair_only() -> None:
    graph = saved_graph()
    g = planning_graph(graph, "pipeshift")
    for serving, want in ((False, [1, 1, 2, 2, 0]), (True, [1, 0.5, 0.5, 1, 1])):
        opt = with_tp_nodes(graph, g, PlanOptions(schedule=Schedule("serve" if serving else "gpipe", 8),
                                                  tp=TPOptions(degrees=(1, 2), modules={"up": "colwise",
                                                                                        "down": "rowwise"})))
        ids = [g.node_ids.index(n) for n in ("node2", "node3", "node4", "node5", "node6")]
        held = opt.tp.node_held(opt.held_bytes(g), 2)[ids] / MB
        # training: the activation and down's input are shards; serving: up's and the activation's outputs
        assert list(held) == pytest.approx(want), (serving, list(held))


def test_memory_per_tp_rank_counts_sharded_activations() -> None:
    """gpipe, 8 microbatches in flight, one 2-worker TP stage: 40 MB of weights + gradients per rank
    (80 MB) and 8 × 6 MB held (10 MB a microbatch whole, 6 MB on a TP rank): 128 MB. A 144 MB
    worker fits it; counting whole activations (160 MB) would not; 120 MB fits nothing."""
    graph = saved_graph()

    def solve(limit: float):
        opt = PlanOptions(schedule=Schedule("gpipe", 8), optimizer_states=0.0, memory_limit=limit,
                          tp=TPOptions(degrees=(2,), modules={"up": "colwise", "down": "rowwise"}))
        opt = with_tp_nodes(graph, planning_graph(graph, "pipeshift"), opt)
        return make_plan(graph, Topology([Level(2, 1e12, 0.0)]), opt)

    assert [(st.tp, len(st.workers)) for st in solve(144 * MB).stages] == [(2, 2)]
    with pytest.raises(PipeshiftError):
        solve(120 * MB)


def test_a_block_kept_whole_is_priced_by_its_sharded_share() -> None:
    """One node for the whole block (``tp_plan.leaves``): 80% of its weights sharded, two
    row-parallel layers inside, each all-reducing its 1 MB output forward and backward."""
    g = Graph()
    g.add_node(Node("node1", "Input0", activation_size=1 * MB))
    g.add_node(Node("node2", "Block", forward_ms=1.0, backward_ms=2.0, activation_size=1 * MB,
                    parameter_size=100 * MB, meta={"fqn": "block"}))
    g.add_edge("node1", "node2")
    leaves = {"block": {"sharded_fraction": 0.8, "row_parallel": 2}}
    pg = planning_graph(g, "pipeshift")
    opt = with_tp_nodes(g, pg, PlanOptions(tp=TPOptions(degrees=(1, 2), modules={"block.up": "colwise"},
                                                        leaves=leaves)))
    i = pg.node_ids.index("node2")
    bw = 1e9
    time = opt.tp.node_time_s(opt.compute_ms(pg) / 1000.0, 2, bw, 0.0)[i]
    assert time == pytest.approx(3e-3 * (0.2 + 0.8 / 2) + 2 * (2 * 1 / 2 * MB / bw) * 2)
    assert opt.tp.node_params(pg.parameter, 2)[i] == pytest.approx(100 * MB * (0.2 + 0.8 / 2))
