"""netcheck: real gloo ping-pong between local ranks, and the topology file the planner reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO
from pipeshift.cli import main
from pipeshift.errors import PipeshiftError
from pipeshift.launch.netcheck import free_port, read_topology, summarise_levels, validate_topology

pytestmark = pytest.mark.timeout(180)
FAST = ["--rounds", "3", "--warmup", "1", "--large-bytes", "65536", "--timeout", "60"]


def check_matrices(topology: dict, n: int) -> None:
    assert topology["world_size"] == n and len(topology["hosts"]) == n
    lat, bw = topology["latency_s"], topology["bandwidth_bytes_per_s"]
    for i in range(n):
        assert lat[i][i] == 0.0 and bw[i][i] is None
        for j in range(n):
            if i != j:
                assert lat[i][j] == lat[j][i] > 0 and bw[i][j] == bw[j][i] > 0


def test_local_two_ranks_write_a_valid_topology(tmp_path, capsys):
    out = tmp_path / "topology.json"
    assert main(["netcheck", "--local", "2", "-o", str(out), *FAST]) == 0
    topology = read_topology(out)
    check_matrices(topology, 2)
    assert topology["method"]["large_bytes"] == 65536 and topology["method"]["rounds"] == 3
    # One host: one level, its figures those of the only pair.
    assert topology["levels"] == [{"workers": 2, "bandwidth_bytes_per_s": topology["bandwidth_bytes_per_s"][0][1],
                                   "latency_s": topology["latency_s"][0][1]}]
    printed = capsys.readouterr().out
    assert "latency" in printed and "bandwidth" in printed


def test_explicit_ranks_as_separate_processes(tmp_path):
    """The per-host path: two `pipeshift netcheck --hosts … --rank R` processes meet at rank 0."""
    port = free_port()
    out = tmp_path / "topo.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "pipeshift", "netcheck", "--hosts", "127.0.0.1,127.0.0.1",
                          "--rank", str(r), "--dist-addr", f"127.0.0.1:{port}", "-o", str(out), *FAST],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (1, 0)  # the peer first: it must wait for rank 0
    ]
    try:
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], results
    topology = read_topology(out)
    check_matrices(topology, 2)
    assert topology["hosts"] == ["127.0.0.1", "127.0.0.1"]


def test_unreachable_rank0_is_a_one_line_error(capsys):
    port = free_port()
    assert main(["netcheck", "--hosts", "127.0.0.1,127.0.0.1", "--rank", "1", "--dist-addr",
                 f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "not reachable" in err and len(err.splitlines()) == 1


def test_hosts_without_rank_prints_the_per_host_commands(capsys, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# two machines\nalpha\nbeta  # the second\n")
    assert main(["netcheck", "--hosts", str(hosts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "alpha:" and "--rank 0" in lines[1] and "--dist-addr alpha:" in lines[1]
    assert lines[2].split()[0] == "beta:" and "--rank 1" in lines[2]


@pytest.mark.parametrize("argv, message", [
    (["--local", "1"], "at least 2"),
    (["--hosts", "onlyone"], "at least 2"),
    ([], "say where to run"),
    (["--hosts", "a,b", "--rank", "5"], "not in 0..1"),
    (["--local", "2", "--rounds", "0"], "--rounds"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert main(["netcheck", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_levels_for_two_hosts_of_two_ranks():
    hosts = ["a", "a", "b", "b"]
    # Intra-host links fast (and one slower), inter-host links slow.
    bw = [[None, 10.0, 1.0, 2.0], [10.0, None, 3.0, 1.5], [1.0, 3.0, None, 8.0], [2.0, 1.5, 8.0, None]]
    lat = [[0.0 if i == j else (1e-6 if hosts[i] == hosts[j] else 1e-4 * (1 + i + j)) for j in range(4)] for i in range(4)]
    levels = summarise_levels(hosts, lat, bw)
    assert levels == [
        {"workers": 2, "bandwidth_bytes_per_s": 8.0, "latency_s": 1e-6},
        {"workers": 2, "bandwidth_bytes_per_s": 1.0, "latency_s": max(lat[i][j] for i in (0, 1) for j in (2, 3))},
    ]
    # One rank per host: a single level of hosts; uneven hosts: one flat level.
    assert [lv["workers"] for lv in summarise_levels(["a", "b", "c"], [[0, 1, 1], [1, 0, 1], [1, 1, 0]],
                                                      [[None, 5, 5], [5, None, 4], [5, 4, None]])] == [3]
    assert summarise_levels(["a", "a", "b"], [[0, 1, 1], [1, 0, 1], [1, 1, 0]],
                            [[None, 5, 5], [5, None, 4], [5, 4, None]])[0]["bandwidth_bytes_per_s"] == 4


def valid_topology() -> dict:
    return {"version": 1, "kind": "pipeshift.topology", "world_size": 2, "hosts": ["a", "b"],
            "latency_s": [[0.0, 1e-5], [1e-5, 0.0]], "bandwidth_bytes_per_s": [[None, 1e9], [1e9, None]],
            "levels": [{"workers": 2, "bandwidth_bytes_per_s": 1e9, "latency_s": 1e-5}]}


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update(kind="other"), "not a pipeshift topology"),
    (lambda t: t.update(world_size=1), "world_size"),
    (lambda t: t.update(hosts=["a"]), "hosts"),
    (lambda t: t["latency_s"].pop(), "2x2"),
    (lambda t: t["bandwidth_bytes_per_s"][0].__setitem__(1, 0), "positive"),
    (lambda t: t["latency_s"][1].__setitem__(0, -1.0), "positive"),
    (lambda t: t["bandwidth_bytes_per_s"][1].__setitem__(1, 5.0), "null"),
    (lambda t: t.update(levels=[{"workers": 0}]), "levels"),
])
def test_validate_topology_rejects(mutate, message):
    t = valid_topology()
    validate_topology(t)
    mutate(t)
    with pytest.raises(PipeshiftError, match=message):
        validate_topology(t, "t.json")


def test_read_topology_reports_file_and_line(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{\n "kind": \n}')
    with pytest.raises(PipeshiftError, match=r"t\.json:3: invalid JSON"):
        read_topology(bad)
    bad.write_text(json.dumps(valid_topology()))
    assert read_topology(bad)["hosts"] == ["a", "b"]
