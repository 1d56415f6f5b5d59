"""The one plan reader: every wrong field is `file:line: field …`; a good plan round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeshift.errors import InputFileError
from pipeshift.plan import parse_plan, read_plan

GOOD = {
    "version": 1,
    "graph": "graph.txt",
    "batch_size": 8,
    "schedule": {"kind": "flush", "microbatches": 4},
    "predicted": {"time_per_minibatch_s": 2.0},
    "stages": [
        {"stage_id": 0, "nodes": ["node1", "node2"], "fqns": ["a", "b"], "replicas": 2, "ranks": [0, 1],
         "predicted": {"compute_s": 2.0}, "workers": [0, 1]},
        {"stage_id": 1, "nodes": ["node3"], "fqns": ["c"], "ranks": [2],
         "costs": {"forward_s": 0.5, "backward_s": 1.0, "output_link": {"bandwidth_bytes_per_s": 1e9}}},
    ],
}


def _write(tmp_path: Path, doc: dict) -> Path:
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(doc, indent=1))
    return f


def test_reads_shape_predictions_and_costs(tmp_path: Path) -> None:
    plan = read_plan(_write(tmp_path, GOOD).parent)
    assert (plan.num_stages, plan.world_size, plan.stage_ranks) == (2, 3, [[0, 1], [2]])
    assert plan.node_lists == [["node1", "node2"], ["node3"]]
    assert (plan.batch_size, plan.schedule, plan.microbatches, plan.graph) == (8, "flush", 4, "graph.txt")
    assert [st.tp for st in plan.stages] == [1, 1] and plan.stage_of_rank(2) == 1
    assert plan.stages[0].compute_s == 2.0 and plan.stages[0].costs is None
    assert plan.stages[1].costs is not None and plan.stages[1].costs.link_bandwidth == 1e9
    assert plan.to_json() == GOOD  # unknown fields ("workers") pass through, nothing is added


def test_with_stages_moves_nodes_and_keeps_ranks() -> None:
    plan = parse_plan(GOOD)
    moved = plan.with_stages([["node1"], ["node2", "node3"]], [1.0, 3.0])
    assert moved.node_lists == [["node1"], ["node2", "node3"]]
    assert [st.fqns for st in moved.stages] == [("a",), ("b", "c")]
    assert moved.stage_ranks == plan.stage_ranks
    assert moved.predicted["time_per_minibatch_s"] == 3.0 and moved.stages[1].compute_s == 3.0
    assert plan.node_lists == [["node1", "node2"], ["node3"]]  # plans are values


def test_with_ranks_changes_replicas_and_tp_counts_ranks() -> None:
    plan = parse_plan(GOOD).with_ranks([[0], [1, 2]])
    assert [st.replicas for st in plan.stages] == [1, 2] and plan.world_size == 3
    tp = json.loads(json.dumps(GOOD))
    tp["stages"][1].update(tp=2, ranks=[2, 3])
    assert parse_plan(tp).stages[1].tp == 2 and parse_plan(tp).world_size == 4


def _mutated(change) -> dict:
    doc = json.loads(json.dumps(GOOD))
    change(doc)
    return doc


@pytest.mark.parametrize(("change", "on_line", "message"), [
    (lambda d: d["stages"][1].__setitem__("ranks", [0]), '"ranks"', "stages[1].ranks: rank 0 is in stage 0 and stage 1"),
    (lambda d: d["stages"][1].__setitem__("ranks", [5]), '"stages"', "stages: the stages use ranks [0, 1, 5]"),
    (lambda d: d["stages"][0].__setitem__("replicas", 3), '"ranks"', "stages[0].ranks: the stage has replicas=3 but 2 ranks"),
    (lambda d: d["stages"][0]["nodes"].append("node3"), '"node3"', "stages[1].nodes[0]: node3 is in stage 0 and stage 1"),
    (lambda d: d["stages"][0]["nodes"].append("x; import os"), '"x; import os"', "is not a node id"),
    (lambda d: d["stages"][1]["costs"].__setitem__("forward_s", -1), '"forward_s": -1', "costs.forward_s must be a non-negative"),
    (lambda d: d["stages"][1].__setitem__("tp", 0), '"tp": 0', "stages[1].tp must be a positive integer"),
    (lambda d: d["stages"].reverse(), '"stage_id": 1', "stages[0].stage_id is 1; stages must be listed in pipeline order"),
    (lambda d: d.__setitem__("batch_size", "8"), '"batch_size": "8"', "batch_size must be a positive integer"),
    (lambda d: d["schedule"].__setitem__("microbatches", 0), '"microbatches": 0', "schedule.microbatches must be a positive integer"),
    (lambda d: d.__setitem__("stages", []), '"stages": []', "no 'stages' list"),
    (lambda d: d.__setitem__("version", 2), '"version": 2', "unsupported plan version 2"),
])
def test_errors_name_file_line_and_field(tmp_path: Path, change, on_line: str, message: str) -> None:
    f = _write(tmp_path, _mutated(change))
    with pytest.raises(InputFileError) as err:
        read_plan(f)
    text = str(err.value)
    assert text.startswith(f"{f}:") and message in text and "\n" not in text, text
    # the line named is the line the field stands on
    assert err.value.line is not None and on_line in f.read_text().splitlines()[err.value.line - 1], text
