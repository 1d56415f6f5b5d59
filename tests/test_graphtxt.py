"""graph.txt: round trips on PipeDream's own profiles, its format variants, and strict errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeshift.errors import InputFileError
from pipeshift.graph import Graph, Node, format_graph_txt, parse_graph_txt, read_graph_txt, write_graph_txt

PROFILES = ["vgg16", "resnet50", "gnmt"]


def _raw_lines(path: Path) -> tuple[list[str], list[str]]:
    """Node and edge lines of a file, split independently of our parser."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [ln for ln in lines if not ln.startswith("\t")], [ln.strip() for ln in lines if ln.startswith("\t")]


@pytest.mark.parametrize("name", PROFILES)
def test_round_trip_pipedream_profiles(profiles_dir: Path, tmp_path: Path, name: str) -> None:
    src = profiles_dir / name / "graph.txt"
    graph = read_graph_txt(src)
    node_lines, edge_lines = _raw_lines(src)
    assert len(graph) == len(node_lines)
    assert sorted(f"{a} -- {b}" for a, b in graph.edges) == sorted(set(edge_lines))
    out = tmp_path / "graph.txt"
    write_graph_txt(graph, out)
    again = read_graph_txt(out)
    assert again == graph
    # Value by value against the original text, not against our own parse only.
    for line in node_lines:
        node_id, desc, metrics = line.split(" -- ")[:3]
        fields = dict(kv.split("=", 1) for kv in metrics.split(", "))
        node = again[node_id]
        assert node.desc == desc
        assert node.forward_ms == float(fields["forward_compute_time"])
        assert node.backward_ms == float(fields["backward_compute_time"])
        assert node.parameter_size == float(fields["parameter_size"])
        act = fields["activation_size"]
        if act.startswith("["):
            assert node.activation_size == [float(v) for v in act[1:-1].split(";")]
        else:
            assert node.activation_size == float(act)
    # Writing twice is byte-identical (stable output for diffs).
    assert format_graph_txt(again) == out.read_text()


def test_multi_output_nodes_and_order(profiles_dir: Path) -> None:
    g = read_graph_txt(profiles_dir / "gnmt" / "graph.txt")
    lists = [n for n in g if isinstance(n.activation_size, list)]
    assert lists and all(len(n.activation_size) >= 2 for n in lists)
    order = g.topological_order()
    pos = {n: i for i, n in enumerate(order)}
    assert all(pos[a] < pos[b] for a, b in g.edges)
    assert set(g.sources()) == {n.node_id for n in g if not g.predecessors(n.node_id)}
    for a, b in g.edges:
        assert b in g.successors(a) and a in g.predecessors(b)


VARIANTS = (
    "node1 -- Input0 -- forward_compute_time=0.000, backward_compute_time=0.000, activation_size=0.0, parameter_size=0.000\n"
    "node2 -- Linear(a, b) -- forward_compute_time=1.5, backward_compute_time=2, activation_size=[1.0; 2.5], parameter_size=10 -- stage_id=3\n"
    "node3 -- ReLU -- forward_compute_time=0.25, backward_compute_time=0.125, activation_size=1e3, parameter_size=0.000 -- stage_id=0\n"
    "\tnode1 -- node2\n"
    "\tnode2 -- node3"
)


def test_variants_accepted() -> None:
    g = parse_graph_txt(VARIANTS, "v.txt")
    assert g["node2"].activation_size == [1.0, 2.5]
    assert g["node2"].stage_id == 3 and g["node3"].stage_id == 0 and g["node1"].stage_id is None
    assert g["node2"].backward_ms == 2.0 and g["node3"].activation_size == 1000.0
    assert g["node1"].is_input and not g["node2"].is_input
    assert parse_graph_txt(format_graph_txt(g)) == g
    assert "stage_id=3" in format_graph_txt(g)


GOOD_NODE = "forward_compute_time=1.000, backward_compute_time=1.000, activation_size=4.000, parameter_size=0.000"


@pytest.mark.parametrize(
    "text,message",
    [
        (
            f"node1 -- A -- {GOOD_NODE}\nnode2 -- B -- forward_compute_time=fast, backward_compute_time=1, activation_size=4, parameter_size=0\n",
            "g.txt:2: forward_compute_time: 'fast' is not a number",
        ),
        (f"node1 -- A -- {GOOD_NODE}\n\tnode1 -- node9\n", "g.txt:2: edge node1 -- node9: unknown node 'node9'"),
        (f"node1 -- A -- {GOOD_NODE}\nnode1 -- B -- {GOOD_NODE}\n", "g.txt:2: duplicate node 'node1' (first defined on line 1)"),
        (
            "node1 -- A -- forward_compute_time=1, backward_compute_time=1, activation_size=4\n",
            "g.txt:1: node1: missing field 'parameter_size'",
        ),
        (
            f"node1 -- A -- {GOOD_NODE}\nnode2 -- B -- {GOOD_NODE}\n\tnode1 -- node2\n\tnode2 -- node1\n",
            "g.txt:4: edge node2 -- node1 closes a cycle: node1 -> node2 -> node1",
        ),
        (f"node1 -- Conv -- 3x3 -- {GOOD_NODE}\n", "g.txt:1: node1: description contains ' -- ' (PipeDream's field separator)"),
        (
            "node1 -- A -- forward_compute_time=-1, backward_compute_time=1, activation_size=4, parameter_size=0\n",
            "g.txt:1: forward_compute_time: '-1' is not a finite non-negative number",
        ),
        (
            "node1 -- A -- forward_compute_time=nan, backward_compute_time=1, activation_size=4, parameter_size=0\n",
            "g.txt:1: forward_compute_time: 'nan' is not a finite non-negative number",
        ),
        (f"node1 -- A -- {GOOD_NODE} -- stage_id=x\n", "g.txt:1: stage_id: 'x' is not a non-negative integer"),
        (
            "node1 -- A -- forward_compute_time=1, backward_compute_time=1, activation_size=[4; b], parameter_size=0\n",
            "g.txt:1: activation_size: 'b' is not a number",
        ),
        (f"node1 -- A -- {GOOD_NODE}\n\tnode1 -> node1\n", "g.txt:2: expected an edge '\\tnodeA -- nodeB', got 'node1 -> node1'"),
        (f"node1 -- A -- {GOOD_NODE}, colour=red\n", "g.txt:1: node1: unknown field 'colour'"),
        ("node1 -- A\n", "g.txt:1: expected 'nodeN -- description -- forward_compute_time=…, …'"),
    ],
)
def test_malformed_input_messages(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "g.txt"
    path.write_text(text)
    with pytest.raises(InputFileError) as info:
        read_graph_txt(path)
    assert str(info.value) == message.replace("g.txt", str(path))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="no such file"):
        read_graph_txt(tmp_path / "absent.txt")
    with pytest.raises(InputFileError, match="is a directory"):
        read_graph_txt(tmp_path)


def test_cli_reports_file_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "graph.txt"
    bad.write_text(f"node1 -- A -- {GOOD_NODE}\n\tnode1 -- node2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeshift", "show", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert f"{bad}:2: edge node1 -- node2: unknown node 'node2'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_writer_refuses_unwritable_descriptions() -> None:
    g = Graph()
    g.add_node(Node("node1", "evil -- desc"))
    with pytest.raises(ValueError):
        format_graph_txt(g)
    g2 = Graph()
    g2.add_node(Node("node1", "two\nlines"))
    with pytest.raises(ValueError):
        format_graph_txt(g2)
