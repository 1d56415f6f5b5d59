"""The master tells workers an address they can use, and a plan is read the same from any directory."""

from __future__ import annotations

import json
from pathlib import Path

from pipeshift.cli import main
from pipeshift.graph import Graph, Node, write_graph_txt
from pipeshift.launch.master import load_policy_driver
from pipeshift.launch.master_cli import worker_address
from pipeshift.runtime.policy import PolicyConfig


def test_loopback_bind_warns_and_a_wildcard_bind_advertises_a_real_address() -> None:
    addr, warning = worker_address("127.0.0.1", 7000)
    assert addr == "127.0.0.1:7000" and "only processes on this machine" in warning and "--host 0.0.0.0" in warning
    addr, warning = worker_address("0.0.0.0", 7000)
    assert warning is None and not addr.startswith("0.0.0.0") and addr.endswith(":7000")


def _chain(n: int = 4) -> Graph:
    g = Graph()
    g.add_node(Node("node1", "Input0", 0.0, 0.0, 1e3, 0.0))
    for i in range(2, n + 2):
        g.add_node(Node(f"node{i}", "Linear(4, 4)", 1.0, 2.0, 1e3, 64.0))
        g.add_edge(f"node{i - 1}", f"node{i}")
    return g


def test_master_reads_a_plan_from_another_directory(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    (work / "prof").mkdir(parents=True)
    write_graph_txt(_chain(), work / "prof" / "graph.txt")
    monkeypatch.chdir(work)
    assert main(["plan", "prof/graph.txt", "-n", "2", "--straight-pipeline", "-o", "plan", "-q"]) == 0
    plan = json.loads((work / "plan" / "plan.json").read_text())
    assert plan["graph"] == "../prof/graph.txt"  # relative to the plan's own directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    driver = load_policy_driver(str(work / "plan" / "plan.json"), None, PolicyConfig(), "adam", None)
    assert driver.chain.node_ids[-1] == "node5"
