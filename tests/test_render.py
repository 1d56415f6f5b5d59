"""The one picture mechanism (pipeshift.graph.render) and the steps that draw through it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeshift.cli import main
from pipeshift.graph import Graph, Node, write_graph_txt
from pipeshift.graph.render import PALETTE, render_graph, to_dot


def _graph() -> Graph:
    g = Graph()
    for k, stage in enumerate([0, 0, 1, None]):
        g.add_node(Node(f"node{k}", f"Op{k} with a \"quoted\" description", forward_ms=k, backward_ms=2 * k,
                        stage_id=stage))
    for a, b in [("node0", "node1"), ("node1", "node2"), ("node0", "node3"), ("node2", "node3")]:
        g.add_edge(a, b)
    return g


def _edges_in(source: str) -> set[tuple[str, str]]:
    return set(re.findall(r"^\s*(\w+) -> (\w+)", source, flags=re.MULTILINE))


def _attributes(source: str, node_id: str) -> str:
    """The ``[...]`` of a node statement (labels may span lines)."""
    found = re.search(rf"^\s*{node_id} \[([^\]]*)\]", source, flags=re.MULTILINE)
    assert found, node_id
    return found.group(1)


def _broken_graphviz(monkeypatch) -> None:
    from pipeshift.graph import render

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")

    def broken(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["dot"], stderr="Error: syntax error\nmore detail")

    monkeypatch.setattr(render.subprocess, "run", broken)


def test_dot_source_has_every_node_and_edge_and_stage_colours() -> None:
    g = _graph()
    source = to_dot(g)
    assert _edges_in(source) == set(g.edges)
    for node in g:
        colour = PALETTE[node.stage_id % len(PALETTE)] if node.stage_id is not None else "#FFFFFF"
        assert f'fillcolor="{colour}"' in _attributes(source, node.node_id)
    moved = _attributes(to_dot(g, stage_of={"node3": 2}), "node3")
    assert f'fillcolor="{PALETTE[2]}"' in moved and "stage 2" in moved


def test_labels_and_fills_replace_the_defaults_per_node() -> None:
    source = to_dot(_graph(), labels={"node1": "custom label"}, fills={"node1": "0.08 0.500 1.0"})
    node1 = _attributes(source, "node1")
    assert 'label="custom label"' in node1 and 'fillcolor="0.08 0.500 1.0"' in node1
    assert "Op0" in source  # the other nodes keep their default labels


def test_without_dot_the_source_is_kept_with_one_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for keep in (True, False):
        picture = render_graph(_graph(), tmp_path / f"g{keep}", keep_dot=keep)
        dot = tmp_path / f"g{keep}.dot"
        assert picture.path == dot and picture.written == [dot]
        assert _edges_in(dot.read_text()) == set(_graph().edges)
        assert not dot.with_suffix(".svg").exists()
        assert "\n" not in picture.warning and "not installed" in picture.warning and str(dot) in picture.warning


def test_a_failing_graphviz_keeps_the_source(tmp_path: Path, monkeypatch) -> None:
    _broken_graphviz(monkeypatch)
    picture = render_graph(_graph(), tmp_path / "g", keep_dot=False)
    assert picture.path == tmp_path / "g.dot" and picture.written == [tmp_path / "g.dot"]
    assert picture.path.read_text().startswith("digraph") and not (tmp_path / "g.svg").exists()
    assert "\n" not in picture.warning and "graphviz failed (CalledProcessError" in picture.warning


def test_with_dot_the_svg_is_drawn(tmp_path: Path) -> None:
    if shutil.which("dot") is None:
        pytest.skip("graphviz 'dot' is not installed")
    both = render_graph(_graph(), tmp_path / "both")
    assert both.warning is None and both.path == tmp_path / "both.svg"
    assert both.written == [tmp_path / "both.dot", tmp_path / "both.svg"]
    svg = both.path.read_text()
    assert svg.lstrip().startswith(("<?xml", "<svg", "<!--")) and all(n.node_id in svg for n in _graph())
    only = render_graph(_graph(), tmp_path / "only", keep_dot=False)
    assert only.written == [tmp_path / "only.svg"] and not (tmp_path / "only.dot").exists()


def test_plan_keeps_its_files_when_graphviz_fails(profiles_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    _broken_graphviz(monkeypatch)
    rc = main(["plan", str(profiles_dir / "vgg16" / "graph.txt"), "-n", "2", "-o", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert rc == 0
    assert all((tmp_path / name).is_file() for name in ("plan.json", "gpus=2.txt", "gpus=2.dot"))
    assert not (tmp_path / "gpus=2.svg").exists()
    assert err.count("\n") == 1 and err.startswith("warning: graphviz failed")


def test_show_picture_reports_the_dot_file_without_dot(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = tmp_path / "graph.txt"
    write_graph_txt(_graph(), path)
    rc = main(["show", str(path), "--picture", str(tmp_path / "pic")])
    out = capsys.readouterr()
    assert rc == 0 and f"picture: {tmp_path / 'pic.dot'}" in out.out
    assert out.err.count("\n") == 1 and "not installed" in out.err
    assert _edges_in((tmp_path / "pic.dot").read_text()) == set(_graph().edges)
