"""Rank placement on a measured link matrix: known answers, brute force, and the hierarchy it must reproduce.

The brute force enumerates, independently of the planner's code, every ordered choice of workers
and every contiguous split of a chain into that many stages, pricing each stage by its compute
over its worker's speed and each cut by latency + bytes / bandwidth over the measured pair, both
ways.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeshift.cli import main
from pipeshift.graph import Graph, Node, write_graph_txt
from pipeshift.optimizer.planner import PlanOptions, make_plan
from pipeshift.optimizer.topology import Level, Topology, parse_topology

MB = 1e6
FAST = 1e11


def chain(acts: list[float], ms: list[float] | None = None) -> Graph:
    """An input, then one layer per activation size (forward 40 %, backward 60 % of its time)."""
    ms = ms or [10.0] * len(acts)
    g = Graph()
    g.add_node(Node("node1", "Input0", 0.0, 0.0, 1e3, 0.0))
    prev = "node1"
    for i, (a, t) in enumerate(zip(acts, ms)):
        nid = f"node{i + 2}"
        g.add_node(Node(nid, "Linear(4, 4)", forward_ms=0.4 * t, backward_ms=0.6 * t, activation_size=a,
                        parameter_size=0.0))
        g.add_edge(prev, nid)
        prev = nid
    return g


def matrix(n: int, slow: float, pairs: list[tuple[int, int]]) -> dict:
    bw = [[None if i == j else FAST for j in range(n)] for i in range(n)]
    for a, b in pairs:
        bw[a][b] = bw[b][a] = slow
    return {"hosts": [f"h{i}" for i in range(n)], "bandwidth_bytes_per_s": bw}


# six 10 ms layers; the cut after layer 2 carries 100 MB, the one after layer 4 only 1 MB
ACTS = [50 * MB, 100 * MB, 50 * MB, 1 * MB, 50 * MB, 50 * MB]


def test_slow_machine_gets_the_smallest_activation() -> None:
    """Worker 2 reaches both others at 1 GB/s: it runs the last stage, whose cut carries 1 MB."""
    result = make_plan(chain(ACTS), parse_topology(matrix(3, 1e9, [(0, 2), (1, 2)])), PlanOptions(straight=True))
    assert [len(st.nodes) for st in result.stages] == [3, 2, 2]  # input + 2 layers, then 2 and 2
    assert result.stages[2].workers == [2] and sorted(result.stages[0].workers + result.stages[1].workers) == [0, 1]
    # 20 ms per stage; the 1 MB cut over 1 GB/s costs 2 x 1 ms, the 100 MB cut over 100 GB/s 2 x 1 ms
    assert math.isclose(result.optimum, 0.020, rel_tol=1e-9)
    # the same matrix summarised to its worst link: every cut pays 1 GB/s, so the 100 MB cut is avoided at a price
    worst = make_plan(chain(ACTS), Topology((Level(3, 1e9),)), PlanOptions(straight=True))
    assert worst.optimum > 0.05


def test_slow_link_is_avoided_by_the_order() -> None:
    """Only the link 0-2 is slow: worker 1 sits in the middle and no cut crosses 0-2."""
    result = make_plan(chain(ACTS), parse_topology(matrix(3, 1e9, [(0, 2)])), PlanOptions(straight=True))
    assert result.stages[1].workers == [1]
    assert math.isclose(result.optimum, 0.020, rel_tol=1e-9)


def test_very_slow_machine_is_left_out_when_allowed() -> None:
    topo = parse_topology(matrix(3, 1e7, [(0, 2), (1, 2)]))  # 1 MB over 10 MB/s: 200 ms per microbatch
    result = make_plan(chain(ACTS), topo, PlanOptions(straight=True, fewer_machines=True))
    assert sorted(w for st in result.stages for w in st.workers) == [0, 1]
    assert math.isclose(result.optimum, 0.030, rel_tol=1e-9)  # 3 | 3 layers, the 50 MB cut over 100 GB/s
    forced = make_plan(chain(ACTS), topo, PlanOptions(straight=True))  # all three must be used
    # worker 2 is at one end of the pipeline, across the 1 MB cut (2 x 100 ms)
    assert [2] in (forced.stages[0].workers, forced.stages[-1].workers)
    assert math.isclose(forced.optimum, 0.2, rel_tol=1e-9)


def brute_force(g_acts: list[float], ms: list[float], bw: np.ndarray, lat: np.ndarray, speeds: list[float],
                fewer: bool) -> float:
    n, N = len(g_acts), len(speeds)
    best = math.inf
    for used in range(1 if fewer else N, N + 1):
        for workers in itertools.permutations(range(N), used):
            for cuts in itertools.combinations(range(1, n), used - 1):
                bounds = (0, *cuts, n)
                pace = max(sum(ms[bounds[s]:bounds[s + 1]]) / 1000 / speeds[w] for s, w in enumerate(workers))
                for s, c in enumerate(cuts):
                    a, b = workers[s], workers[s + 1]
                    nbytes = g_acts[c - 1]
                    pace = max(pace, lat[a, b] + lat[b, a] + nbytes / bw[a, b] + nbytes / bw[b, a])
                best = min(best, pace)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_placement_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n, N = rng.randint(4, 7), rng.randint(2, 4)
    acts = [rng.choice([1, 5, 20, 80]) * MB for _ in range(n)]
    ms = [round(rng.uniform(1, 20), 2) for _ in range(n)]
    bw = np.array([[rng.choice([1e8, 1e9, 1e10]) for _ in range(N)] for _ in range(N)])
    lat = np.array([[rng.choice([0.0, 1e-4, 2e-3]) for _ in range(N)] for _ in range(N)])
    speeds = [rng.choice([1.0, 1.0, 0.5, 2.0]) for _ in range(N)]
    fewer = seed % 2 == 1
    topo = parse_topology({"hosts": [f"h{i}" for i in range(N)], "worker_speeds": speeds,
                           "bandwidth_bytes_per_s": [[None if i == j else float(bw[i, j]) for j in range(N)]
                                                     for i in range(N)],
                           "latency_s": [[0.0 if i == j else float(lat[i, j]) for j in range(N)] for i in range(N)]})
    want = brute_force(acts, ms, bw, lat, speeds, fewer)
    result = make_plan(chain(acts, ms), topo, PlanOptions(straight=True, fewer_machines=fewer))
    assert math.isclose(result.optimum, want, rel_tol=1e-9), (result.optimum, want, result.search_candidates)
    paces = [st.dp_value for st in result.stages]
    assert math.isclose(max(paces), want, rel_tol=1e-9)  # the traced stages cost the optimum


def two_level_netcheck(path: Path) -> Path:
    """What netcheck writes for 2 machines of 2 ranks: 10 GB/s inside a machine, 1 GB/s between."""
    hosts = ["a", "a", "b", "b"]
    bw = [[None if i == j else (1e10 if hosts[i] == hosts[j] else 1e9) for j in range(4)] for i in range(4)]
    lat = [[0.0 if i == j else (1e-5 if hosts[i] == hosts[j] else 1e-4) for j in range(4)] for i in range(4)]
    from pipeshift.launch.netcheck import build_topology

    path.write_text(json.dumps(build_topology(hosts, lat, bw, {"backend": "gloo"}, "test")))
    return path


@pytest.mark.parametrize("straight", [False, True])
def test_two_level_matrix_reproduces_the_hierarchy(tmp_path: Path, capsys, straight: bool) -> None:
    rng = random.Random(5)
    acts = [rng.choice([1, 5, 20, 80]) * MB for _ in range(8)]
    ms = [round(rng.uniform(1, 20), 2) for _ in range(8)]
    write_graph_txt(chain(acts, ms), tmp_path / "g.txt")
    flag = ["--straight-pipeline"] if straight else []
    topo = two_level_netcheck(tmp_path / "topology.json")
    assert main(["plan", str(tmp_path / "g.txt"), "--topology", str(topo), "-o", str(tmp_path / "m"), *flag]) == 0
    assert main(["plan", str(tmp_path / "g.txt"), "-n", "2", "2", "-b", "1e10", "1e9", "--latencies", "1e-5", "1e-4",
                 "-o", str(tmp_path / "l"), "-q", *flag]) == 0
    out = capsys.readouterr().out
    m, lv = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("m", "l"))
    assert m["predicted"]["time_per_minibatch_s"] == pytest.approx(lv["predicted"]["time_per_minibatch_s"], rel=1e-12)
    assert [(s["nodes"], s["workers"]) for s in m["stages"]] == [(s["nodes"], s["workers"]) for s in lv["stages"]]
    # the placement and the link each boundary crosses are reported
    for st in m["stages"][:-1]:
        link = st["costs"]["output_link"]
        assert link["from"].split(":")[1] in "ab" and link["bandwidth_bytes_per_s"] in (1e10, 1e9)
    if len(m["stages"]) > 1:
        assert "boundary 0->1" in out


def test_cli_reports_placement_and_warns_when_slower_than_one_worker(tmp_path: Path, capsys) -> None:
    write_graph_txt(chain(ACTS), tmp_path / "g.txt")
    (tmp_path / "t.json").write_text(json.dumps(matrix(3, 1e9, [(0, 2), (1, 2)])))
    assert main(["plan", str(tmp_path / "g.txt"), "--topology", str(tmp_path / "t.json"), "--straight-pipeline",
                 "-o", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["placement"] == "measured links" and doc["rank_to_worker"][2] == 2
    line = next(x for x in out.splitlines() if x.startswith("boundary 1->2"))
    assert line.startswith("boundary 1->2: 1 MB over ") and "-> 2:h2 (1000 MB/s" in line, line
    slow = matrix(3, 1e6, [(0, 1), (0, 2), (1, 2)])  # every link 1 MB/s
    (tmp_path / "s.json").write_text(json.dumps(slow))
    assert main(["plan", str(tmp_path / "g.txt"), "--topology", str(tmp_path / "s.json"), "--straight-pipeline",
                 "-q", "-o", str(tmp_path / "s")]) == 0
    notes = json.loads((tmp_path / "s" / "plan.json").read_text())["notes"]
    assert any("slower than one worker" in n and "--use-fewer-machines" in n for n in notes), notes


def test_launch_hosts_puts_each_rank_on_the_machine_the_plan_chose(tmp_path: Path, capsys) -> None:
    """h1 reaches the others at 1 GB/s only, so it runs the last stage (1 MB cut): rank 2 goes to h1, not h2."""
    write_graph_txt(chain(ACTS), tmp_path / "g.txt")
    (tmp_path / "t.json").write_text(json.dumps(matrix(3, 1e9, [(0, 1), (1, 2)])))
    assert main(["plan", str(tmp_path / "g.txt"), "--topology", str(tmp_path / "t.json"), "--straight-pipeline",
                 "-q", "-o", str(tmp_path / "p")]) == 0
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["placement"] == "measured links" and doc["rank_to_worker"][2] == 1
    expected = [f"h{w}" for w in doc["rank_to_worker"]]
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("h2\nh1\nh0\n")  # not the order netcheck measured them in
    capsys.readouterr()
    assert main(["launch", "--hosts", str(hosts), "--port", "29999", str(tmp_path / "p"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    per_rank = [line for line in out.splitlines() if "--dist-addr" in line]
    assert [line.split("--rank ")[1].split()[0] for line in per_rank] == ["0", "1", "2"]
    assert [line[1:line.index("]")] for line in per_rank] == expected
    assert all(f"--world-size 3 --dist-addr {expected[0]}:29999" in line for line in per_rank)
    assert "placed its ranks on measured links" in out and "does not follow it" in out
    # --ssh runs those per-rank commands (a stand-in ssh that prints where each rank would run)
    fake = tmp_path / "fake_ssh"
    fake.write_text("#!/bin/sh\nhost=$1\nshift\ncase \"$*\" in *--rank\\ 0*) r=0;; *--rank\\ 1*) r=1;; "
                    "*--rank\\ 2*) r=2;; esac\necho \"rank $r on $host\"\n")
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "pipeshift", "launch", "--hosts", str(hosts), "--ssh",
                           "--ssh-program", str(fake), str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(line.split("] ", 1)[1] for line in proc.stdout.splitlines()) == [
        f"rank {r} on {h}" for r, h in enumerate(expected)], proc.stdout
    # without the names in the hosts file, worker w is the w-th slot of the file
    hosts.write_text("10.0.0.1\n10.0.0.2\n10.0.0.3\n")
    assert main(["launch", "--hosts", str(hosts), str(tmp_path / "p")]) == 0
    per_rank = [line for line in capsys.readouterr().out.splitlines() if "--dist-addr" in line]
    assert [line[1:line.index("]")] for line in per_rank] == [f"10.0.0.{w + 1}" for w in doc["rank_to_worker"]]


@pytest.mark.parametrize("change, message", [
    ({"rank_to_worker": [0, 0, 1]}, "rank_to_worker must list 3 distinct worker numbers"),
    ({"rank_to_worker": "x"}, "rank_to_worker must list"),
    ({"rank_to_worker": [0, 1, 7], "topology": {}}, "worker 7; the hosts file has 3 slots"),
])
def test_launch_refuses_a_placement_it_cannot_honour(tmp_path: Path, capsys, change: dict, message: str) -> None:
    write_graph_txt(chain(ACTS), tmp_path / "g.txt")
    (tmp_path / "t.json").write_text(json.dumps(matrix(3, 1e9, [(0, 1), (1, 2)])))
    assert main(["plan", str(tmp_path / "g.txt"), "--topology", str(tmp_path / "t.json"), "--straight-pipeline",
                 "-q", "-o", str(tmp_path / "p")]) == 0
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    (tmp_path / "p" / "plan.json").write_text(json.dumps({**doc, **change}))
    (tmp_path / "hosts.txt").write_text("a\nb\nc\n")
    capsys.readouterr()
    assert main(["launch", "--hosts", str(tmp_path / "hosts.txt"), str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
