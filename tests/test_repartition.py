"""Repartitioning while training: who sends what, the wire format, and exactness with flush.

The end-to-end runs train a codegen package of a tiny MLP on three ranks (gloo, CPU) and switch
plans three times at fixed steps: layers move forward and backward, a stage becomes replicated
(both replicas get the layers it gains) and the stages move to other ranks. The weights at the
end must equal single-process training on the same minibatches — for SGD with momentum and for
Adam, whose state (momentum buffers, moments, step counts) must move with the layers.
"""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from torch import nn

import repartition_helpers as h
from pipeshift.errors import PipeshiftError
from pipeshift.plan import parse_plan, read_plan
from pipeshift.runtime.job import parse_repartition_at
from pipeshift.runtime.restart import load_chain, replan_for_workers
from pipeshift.runtime.policy import Chain, ReplanRequest, builtin_replan
from pipeshift.runtime.repartition import Partition, Repartitioner, _Item, _pack, _unpack, plan_transfers
from pipeshift.testing.slowdown import parse_slowdowns, slowdown_at

# -- who sends what -----------------------------------------------------------------------------


def partition(ranks, keys) -> Partition:
    plan = parse_plan({"stages": [{"nodes": [f"node{s}"], "ranks": list(r), "replicas": len(r)}
                                  for s, r in enumerate(ranks)]})
    return Partition(plan, tuple(frozenset(k) for k in keys))


def test_transfers_move_only_what_changes_owner():
    old = partition([[0], [1], [2]], [{"a", "b"}, {"c"}, {"d", "e"}])
    new = partition([[0], [1], [2]], [{"a"}, {"b", "c", "d"}, {"e"}])
    got = {(t.key, t.src, t.dst) for t in plan_transfers(old, new)}
    assert got == {("b", 0, 1), ("d", 2, 1)}  # one layer forward, one backward; a, c and e stay put


def test_a_replicated_stage_gets_gained_layers_on_every_replica():
    old = partition([[0], [1], [2]], [{"a", "b"}, {"c"}, {"d"}])
    new = partition([[0, 1], [2]], [{"a", "b", "c"}, {"d"}])
    got = sorted((t.key, t.src, t.dst) for t in plan_transfers(old, new))
    # rank 1 keeps 'c' and needs a, b; rank 0 keeps a, b and needs c
    assert got == [("a", 0, 1), ("b", 0, 1), ("c", 1, 0)]


def test_replicated_sources_share_the_sending():
    old = partition([[0, 1], [2]], [{"a"}, {"b"}])
    new = partition([[2], [0, 1, 3]], [{"a"}, {"b"}])
    sends = sorted((t.key, t.src, t.dst) for t in plan_transfers(old, new))
    assert sends == [("a", 0, 2), ("b", 2, 0), ("b", 2, 1), ("b", 2, 3)]
    old2 = partition([[0, 1], [2]], [{"a"}, {"b"}])
    new2 = partition([[2, 3], [0, 1]], [{"a"}, {"b"}])
    a_sources = sorted(t.src for t in plan_transfers(old2, new2) if t.key == "a")
    assert a_sources == [0, 1]  # ranks 2 and 3 get 'a' from different replicas


def test_pack_and_unpack_round_trip_mixed_dtypes_and_scalars():
    tensors = [torch.randn(3, 5), torch.tensor(7.0), torch.arange(5, dtype=torch.int64), torch.tensor([True, False]),
               torch.randn(2, dtype=torch.float64), torch.zeros(0)]
    items = []
    for i, t in enumerate(tensors):
        items.append(_Item("optim", f"k{i}", "x", t, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
    flat = _pack(items, torch.device("cpu"))
    for t, back in zip(tensors, _unpack(items, flat)):
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


# -- regenerating stages through codegen --------------------------------------------------------


def test_prepared_plan_builds_stages_over_the_full_model(tmp_path):
    h.package(tmp_path, [5, 9], [[0], [1], [2]])
    new = read_plan(h.plan(tmp_path, "P", [3, 10], [[0], [1], [2]]))
    start = read_plan(tmp_path / "plan.json")
    bundle = h.SPEC.build()
    full = bundle.model
    rp = Repartitioner(0, full, (bundle.criterion(), ["node12", "target"], ["loss"]),
                       Partition.of(start, [nn.Module()] * 3))
    prepared = rp.prepare(new)
    stage0 = prepared.entries[0][0]
    assert set(stage0.state_dict()) == {"layers.0.weight", "layers.0.bias"}
    assert stage0.state_dict()["layers.0.weight"].data_ptr() == full.layers[0].weight.data_ptr()  # adopted, not copied
    assert prepared.partition.stage_keys[2] == {"layers.10.weight", "layers.10.bias"}
    assert prepared.partition.stage_ranks == [[0], [1], [2]]


# -- flags and plans ----------------------------------------------------------------------------


def test_slowdown_flags():
    s = parse_slowdowns(["1:3@10", "1:1@20", "0:2"])
    assert [slowdown_at(s, 1, step) for step in (0, 9, 10, 19, 20, 50)] == [1, 1, 3, 3, 1, 1]
    assert slowdown_at(s, 0, 0) == 2 and slowdown_at(s, 2, 5) == 1
    for bad in ("1", "x:2", "1:0.5", "1:2@-1", "-1:2"):
        with pytest.raises(PipeshiftError, match="--slowdown"):
            parse_slowdowns([bad])


def test_repartition_at_flags(tmp_path):
    good = h.plan(tmp_path, "P", [3], [[0], [1]])
    forced = parse_repartition_at([f"7:{good}", f"3:{good}"])
    assert [f.step for f in forced] == [3, 7] and forced[0].plan.node_lists[0] == h.NODES[:3]
    with pytest.raises(PipeshiftError, match="STEP:PLAN"):
        parse_repartition_at(["seven:x.json"])
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(PipeshiftError, match="bad.json:1"):
        parse_repartition_at([f"2:{tmp_path / 'bad.json'}"])


def test_policy_never_leaves_a_stage_with_only_the_inputs():
    # A very slow first worker would get nothing but the (free) input node; it must keep an operation.
    n = 6
    chain = Chain(node_ids=[f"node{i}" for i in range(1, n + 1)], node_times_s=np.array([0, 1, 1, 1, 1, 1.0]),
                  activation_bytes=np.zeros(n), state_bytes=np.ones(n),
                  edges=np.array([(i, i + 1) for i in range(n - 1)]), fqns=[None] * n,
                  glued=np.array([True] + [False] * (n - 1)))
    request = ReplanRequest(node_ids=chain.node_ids, node_times_s=np.outer([100.0, 1.0], chain.node_times_s),
                            speed_factors=np.array([100.0, 1.0]), cut_comm_s=np.zeros(n + 1), current_stages=[])
    assert builtin_replan(request)[0] == ["node1"]  # without the glue: an input-only stage
    request.glued = chain.glued
    assert builtin_replan(request)[0] == ["node1", "node2"]


def test_replan_for_fewer_workers_uses_the_profiled_times(tmp_path):
    h.package(tmp_path, [5, 9], [[0], [1], [2]])
    base = read_plan(tmp_path / "plan.json")
    chain = load_chain(tmp_path / "graph.txt", "momentum")
    two = replan_for_workers(base, 2, chain).to_json()
    assert [st["ranks"] for st in two["stages"]] == [[0], [1]]
    assert sum(len(st["nodes"]) for st in two["stages"]) == 12
    # eleven equal operations: the cut leaves five or six on each side
    assert sorted(len(st["nodes"]) for st in two["stages"]) in ([6, 6], [5, 7])
    blind = replan_for_workers(base, 4, None).to_json()
    assert [len(st["nodes"]) for st in blind["stages"]] == [3, 3, 3, 3]


# -- exactness end to end -----------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": (["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.1"],
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "adam": (["--optimizer", "adam", "--lr", "0.01"], lambda ps: torch.optim.Adam(ps, lr=0.01)),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_flush_with_three_repartitions_equals_training_without(tmp_path, optimizer):
    flags, make = OPTIMIZERS[optimizer]
    h.package(tmp_path, [5, 9], [[0], [1], [2]])
    h.plan(tmp_path, "P1", [3, 10], [[0], [1], [2]])  # stage 0 → 1 and stage 2 → 1: both directions
    h.plan(tmp_path, "P2", [7], [[0, 1], [2]])  # a replicated stage: both replicas get what it gains
    h.plan(tmp_path, "P3", [4, 8], [[2], [0], [1]])  # every stage on another rank
    steps, m = 8, 4
    rc, out = h.launch(tmp_path, 3, ["--steps", str(steps), "--microbatches", str(m), *flags,
                                     "--repartition-at", "2:P1.json", "--repartition-at", "4:P2.json",
                                     "--repartition-at", "6:P3.json"])
    assert rc == 0, out[-4000:]
    log = h.jsonl(tmp_path / "out" / "repartitions.jsonl")
    assert [r["step"] for r in log if r["event"] == "repartition"] == [2, 4, 6]
    assert all(r["bytes_moved"] > 0 for r in log)
    final = (tmp_path / "ck" / "latest").read_text().strip()
    assert json.loads((tmp_path / "ck" / final / "plan.json").read_text())["stages"][0]["ranks"] == [2]
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), h.reference(steps, m, make))
