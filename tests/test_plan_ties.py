"""Tied parameters in the planner: counted once per stage, and their all-reduce charged when split.

The graphs are tiny chains whose known answers are worked out here from cost.py's definitions:
a shared weight held by node2 and node4 (a module called twice), equal node times, no
activation traffic, so the only thing that can move the cut is the tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeshift.cli import main
from pipeshift.graph import Graph, Node, write_graph_txt
from pipeshift.graph.capture import capture
from pipeshift.optimizer.simulator import simulate, stages_from_plan
from pipeshift.plan import parse_plan

TIE = 4e6  # bytes of the shared weight
MS = 1.0  # forward and backward milliseconds of every layer
M = 4  # microbatches per minibatch (flush: the tie is summed once per minibatch)


def tied_chain(out: Path, shared: bool = True) -> Path:
    """node1 (input) → node2 (holds w) → node3 → node4 (holds w) → node5; profile.json says which hold w."""
    g = Graph()
    g.add_node(Node("node1", "Input0"))
    params = {"node2": TIE, "node3": 1000.0, "node4": TIE, "node5": 1000.0}
    for nid, p in params.items():
        g.add_node(Node(nid, "Linear(8, 8)", forward_ms=MS, backward_ms=MS, parameter_size=p))
    for a, b in zip(["node1", "node2", "node3", "node4"], ["node2", "node3", "node4", "node5"]):
        g.add_edge(a, b)
    out.mkdir(parents=True, exist_ok=True)
    write_graph_txt(g, out / "graph.txt")
    nodes = {nid: {"fqn": f"layer{nid[-1]}"} for nid in params}
    if shared:
        for nid in ("node2", "node4"):
            nodes[nid]["shared_parameters"] = {"w": TIE}
    (out / "profile.json").write_text(json.dumps({"version": 1, "batch_size": 1, "nodes": nodes}))
    return out / "graph.txt"


def plan(graph: Path, out: Path, *flags: str) -> dict:
    assert main(["plan", str(graph), "--schedule", "flush", "--microbatches", str(M), "--quiet", "-o", str(out),
                 *flags]) == 0
    return json.loads((out / "plan.json").read_text())


def ring(nbytes: float, ranks: int, bandwidth: float) -> float:
    return 2.0 * (ranks - 1) / ranks * nbytes / bandwidth


def test_a_slow_tie_keeps_its_holders_together(tmp_path: Path) -> None:
    slow = 1e8  # the tie's ring: 40 ms per minibatch, 10 ms per microbatch, worse than 6 ms vs 4 ms
    untied = plan(tied_chain(tmp_path / "a", shared=False), tmp_path / "pa", "-n", "2", "-b", str(slow),
                  "--straight-pipeline")
    assert [st["nodes"] for st in untied["stages"]] == [["node1", "node2", "node3"], ["node4", "node5"]]
    tied = plan(tied_chain(tmp_path / "b"), tmp_path / "pb", "-n", "2", "-b", str(slow), "--straight-pipeline")
    assert [st["nodes"] for st in tied["stages"]] == [["node1", "node2", "node3", "node4"], ["node5"]]
    first = tied["stages"][0]
    assert first["costs"]["parameter_bytes"] == TIE + 1000.0  # node2 and node4 hold one w
    assert "tie_allreduce_s" not in first["costs"]
    assert tied["predicted"]["time_per_minibatch_s"] == pytest.approx(3 * 2 * MS / 1000)


def test_a_split_tie_is_charged_its_all_reduce(tmp_path: Path) -> None:
    bw = 1e10  # ring = 0.4 ms per minibatch: cheaper than moving a layer, so the balanced cut stays
    doc = plan(tied_chain(tmp_path / "g"), tmp_path / "p", "-n", "2", "-b", str(bw), "--straight-pipeline")
    assert [st["nodes"] for st in doc["stages"]] == [["node1", "node2", "node3"], ["node4", "node5"]]
    tie_s = ring(TIE, 2, bw)
    for st in doc["stages"]:
        assert st["costs"]["parameter_bytes"] == TIE + 1000.0  # every holder pays for its copy
        assert st["costs"]["tie_allreduce_s"] == pytest.approx(tie_s)
        assert st["predicted"]["time_s"] == pytest.approx(2 * 2 * MS / 1000 + tie_s / M)
    # the simulator replays it before the step: one minibatch ends exactly one all-reduce later
    stages = stages_from_plan(parse_plan(doc))
    with_tie = simulate(stages, "flush", M, steps=1).makespan_s
    without = simulate([s.__class__(**{**s.__dict__, "tie_allreduce_s": 0.0}) for s in stages], "flush", M,
                       steps=1).makespan_s
    assert with_tie - without == pytest.approx(tie_s)


def test_memory_counts_a_tie_once_per_stage(tmp_path: Path) -> None:
    # one worker holds everything: w once (4 MB) + 2 KB, times (weights + gradients + 2 Adam states)
    need = (TIE + 2000.0) * 4
    one = plan(tied_chain(tmp_path / "g"), tmp_path / "p1", "-n", "1", "-s", str(need * 1.01))
    assert one["stages"][0]["costs"]["parameter_bytes"] == TIE + 2000.0
    assert one["memory_per_worker_bytes"][0] <= need * 1.01
    # the same weights counted per node would not fit
    untied_dir = tmp_path / "u"
    tied_chain(untied_dir, shared=False)
    assert main(["plan", str(untied_dir / "graph.txt"), "-n", "1", "-s", str(need * 1.01), "--quiet",
                 "--schedule", "flush", "--microbatches", str(M), "-o", str(tmp_path / "p3")]) == 1


def test_capture_finds_ties_by_identity() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight  # GPT-2's tie: one tensor, two names

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.mid(self.mid(self.emb(ids))))  # mid: one module called twice

    groups = {g.target: g for g in capture(Tied(), [torch.zeros(2, 3, dtype=torch.long)]).groups}
    assert groups["emb"].shared_parameters == {"emb.weight": 16 * 8 * 4}
    assert groups["head"].shared_parameters == {"emb.weight": 16 * 8 * 4}
    mids = [g for g in capture(Tied(), [torch.zeros(2, 3, dtype=torch.long)]).groups if g.target == "mid"]
    assert len(mids) == 2 and all(g.shared_parameters == {"mid.weight": 256, "mid.bias": 32} for g in mids)


def test_malformed_shared_parameters_are_one_line_errors(tmp_path: Path, capsys) -> None:
    graph = tied_chain(tmp_path / "g")
    doc = json.loads((tmp_path / "g" / "profile.json").read_text())
    doc["nodes"]["node2"]["shared_parameters"] = {"w": "lots"}
    (tmp_path / "g" / "profile.json").write_text(json.dumps(doc))
    assert main(["plan", str(graph), "-n", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "node2" in err and "shared_parameters" in err and err.count("\n") == 1
