"""Several machines, emulated: network namespaces on one bridge, one link shaped with ``tc``.

A master and three workers, each in its own namespace with its own address (they share the
hostname, which resolves to loopback — the trap the interface choice must avoid), joined by a
bridge that lives in a namespace of its own, so nothing touches this machine's own network.
Needs root and ``ip``/``tc``; skipped otherwise, saying why. Every namespace is named
``psq18-<random>-…`` and removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import repartition_helpers as h
from helpers import run_bounded

PY = sys.executable
RANKS = ("a", "b", "c")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "network-namespace tests need iproute2's ip and tc"
    probe = f"psq18-{uuid.uuid4().hex[:6]}-p"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here ({made.stderr.strip()[:100]})"
    _ip("netns", "delete", probe, check=False)
    return None


class Cluster:
    """Namespaces ``m`` (master) and ``a``, ``b``, ``c`` (ranks 0-2) on a bridge in namespace ``sw``."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.prefix = f"psq18-{tag}"
        self.subnet = f"10.218.{int(tag[:2], 16)}"
        self.names = {k: f"{self.prefix}-{k}" for k in ("sw", "m", *RANKS)}
        self.addr = {k: f"{self.subnet}.{i + 1}" for i, k in enumerate(("m", *RANKS))}
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        for ns in self.names.values():
            _ip("netns", "add", ns)
        sw = self.names["sw"]
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for k in ("m", *RANKS):
            ns = self.names[k]
            _ip("-n", sw, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", f"v{k}", "master", "br0")
            _ip("-n", sw, "link", "set", f"v{k}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[k]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def shape(self, who: str, rate: str) -> None:
        """Limit ``who``'s link both ways (its egress, and the bridge port's egress towards it)."""
        for ns, dev in ((self.names[who], "eth0"), (self.names["sw"], f"v{who}")):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", "64kb", "latency", "400ms"], check=True, capture_output=True, timeout=30)

    def start(self, who: str, cmd: list[str], cwd: Path, environ: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[who], *cmd], cwd=cwd, env=environ,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        for ns in self.names.values():
            _ip("netns", "delete", ns, check=False)


@pytest.fixture(scope="module")
def cluster():
    why = _why_not()
    if why:
        pytest.skip(why)
    c = Cluster()
    try:
        c.up()
        c.shape("c", "40mbit")
        yield c
    finally:
        c.down()
    left = _ip("netns", "list", check=False).stdout
    assert c.prefix not in left, f"namespaces left behind: {left}"


def _finish(procs: list[subprocess.Popen], limit: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + limit
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, 9)
            raise AssertionError("a process in a namespace did not finish in time") from None
        out.append((p.returncode, text))
    return out


def test_netcheck_sees_the_shaped_link_and_the_planner_routes_around_it(cluster, tmp_path):
    hosts = ",".join(cluster.addr[k] for k in RANKS)
    dist = f"{cluster.addr['a']}:29613"
    procs = [cluster.start(k, [PY, "-m", "pipeshift", "netcheck", "--hosts", hosts, "--rank", str(r), "--dist-addr",
                               dist, "--rounds", "3", "--warmup", "1", "--large-bytes", str(1 << 20), "--timeout", "60",
                               "-o", str(tmp_path / "topology.json")], tmp_path, h.env())
             for r, k in enumerate(RANKS)]
    results = _finish(procs, 240)
    assert all(rc == 0 for rc, _ in results), [t[-2000:] for _, t in results]
    assert "network interface eth0" in results[0][1]  # not lo, though the hostname resolves to loopback
    topo = json.loads((tmp_path / "topology.json").read_text())
    bw = topo["bandwidth_bytes_per_s"]
    assert bw[0][2] < 0.5 * bw[0][1] and bw[1][2] < 0.5 * bw[0][1], bw  # 40 Mbit/s to c, a bridge between a and b
    # the planner puts the shaped machine where the smallest activation crosses its link
    from test_placement import ACTS, chain

    from pipeshift.graph import write_graph_txt

    write_graph_txt(chain(ACTS), tmp_path / "g.txt")
    rc, out = run_bounded([PY, "-m", "pipeshift", "plan", str(tmp_path / "g.txt"), "--topology",
                           str(tmp_path / "topology.json"), "--straight-pipeline", "-o", str(tmp_path / "plan"), "-q"],
                          tmp_path, 120, h.env())
    assert rc == 0, out
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["placement"] == "measured links", plan["notes"]
    slow_stage = next(st for st in plan["stages"] if st["workers"] == [2])
    assert slow_stage["stage_id"] in (0, len(plan["stages"]) - 1)
    boundary = plan["stages"][0] if slow_stage["stage_id"] == 0 else plan["stages"][-2]
    assert boundary["costs"]["output_bytes"] == min(st["costs"]["output_bytes"] for st in plan["stages"][:-1])


def test_master_and_three_ranks_on_a_bridge_with_ctl_repartition(cluster, tmp_path):
    h.package(tmp_path, [4, 8], [[0], [1], [2]])
    target = h.plan(tmp_path, "target", [3, 6], [[0], [1], [2]])
    token = "netns-token"
    environ = h.env(PIPESHIFT_TOKEN=token)
    master = cluster.start("m", [PY, "-m", "pipeshift", "master", "--host", "0.0.0.0", "--port", "29614"], tmp_path,
                           environ)
    where = f"{cluster.addr['m']}:29614"
    first = master.stdout.readline() + master.stdout.readline()
    assert "listening on 0.0.0.0:29614" in first and f"PIPESHIFT_MASTER={cluster.addr['m']}:29614" in first, first
    dist = f"{cluster.addr['a']}:29615"
    ranks = [cluster.start(k, [PY, "-m", "pipeshift", "train", str(tmp_path / "stages"), "--rank", str(r),
                               "--world-size", "3", "--dist-addr", dist, "--master", where, "--report-every", "2",
                               "--steps", "60", "--microbatches", "3", "--optimizer", "sgd", "--lr", "0.05",
                               *[x for k in range(3) for x in ("--slowdown", f"{k}:30")], "--timeout", "60", "--no-progress", "--output-dir",
                               str(tmp_path / "out")], tmp_path, environ)
             for r, k in enumerate(RANKS)]
    ctl = [PY, "-m", "pipeshift", "ctl", "--master", where]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the job is running once every rank has reported
        status = subprocess.run(["ip", "netns", "exec", cluster.names["m"], *ctl, "status", "--json"],
                                capture_output=True, text=True, env=environ, timeout=60)
        if status.returncode == 0 and sum(1 for w in json.loads(status.stdout)["workers"] if w["step"]) == 3:
            break
        assert all(p.poll() is None for p in ranks), [p.communicate()[0][-2000:] for p in ranks]
        time.sleep(0.5)
    queued = subprocess.run(["ip", "netns", "exec", cluster.names["m"], *ctl, "repartition", "--plan", str(target)],
                            capture_output=True, text=True, env=environ, timeout=60)
    assert queued.returncode == 0, queued.stderr
    results = _finish(ranks, 240)
    assert all(rc == 0 for rc, _ in results), [t[-3000:] for _, t in results]
    announced = int(queued.stdout.split("switch after step ")[1].split(",")[0])
    for r, (_, text) in enumerate(results):
        assert "network interface eth0" in text, text[-2000:]
        assert f"rank {r}: switched after step {announced} (operator command #1)" in text, text[-3000:]
    final = json.loads((tmp_path / "out" / "repartitions.jsonl").read_text().splitlines()[-1])
    assert final["event"] == "repartition" and [len(s) for s in final["stages"]] == [3, 3, 6]


def _status(cluster: Cluster, where: str, environ: dict[str, str]) -> dict:
    out = subprocess.run(["ip", "netns", "exec", cluster.names["m"], PY, "-m", "pipeshift", "ctl", "--master", where,
                          "status", "--json"], capture_output=True, text=True, env=environ, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_master_through_launch_local_and_through_torchrun(cluster, tmp_path):
    """--master reaches the ranks whether pipeshift's launcher or a bare torchrun starts them."""
    h.package(tmp_path, [6], [[0], [1]])
    environ = h.env(PIPESHIFT_TOKEN="netns-token-2")
    cluster.start("m", [PY, "-m", "pipeshift", "master", "--host", "0.0.0.0", "--port", "29616"], tmp_path, environ)
    where = f"{cluster.addr['m']}:29616"
    deadline = time.monotonic() + 60
    while subprocess.run(["ip", "netns", "exec", cluster.names["m"], PY, "-m", "pipeshift", "ctl", "--master", where,
                          "status"], capture_output=True, env=environ, timeout=60).returncode != 0:
        assert time.monotonic() < deadline, "the master did not come up"
        time.sleep(0.5)
    train = ["--steps", "{steps}", "--microbatches", "2", "--optimizer", "sgd", "--report-every", "2",
             "--no-progress", "--output-dir", "{out}", "--master", where]
    jobs = {
        "b": (6, [PY, "-m", "pipeshift", "launch", "--local", "2", str(tmp_path / "stages")]),
        "c": (8, [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pipeshift", "--",
                  "train", str(tmp_path / "stages")]),
    }
    seen: set[int] = set()
    for who, (steps, cmd) in jobs.items():
        args = [a.format(steps=steps, out=tmp_path / f"out-{who}") for a in train]
        [(rc, text)] = _finish([cluster.start(who, [*cmd, *args], tmp_path, environ)], 240)
        assert rc == 0, text[-3000:]
        workers = {w["rank"]: w for w in _status(cluster, where, environ)["workers"]}
        # both ranks of this job registered and reported (new processes: not the previous job's)
        assert sorted(workers) == [0, 1] and all((w["step"] or 0) >= 2 for w in workers.values()), workers
        pids = {w["pid"] for w in workers.values()}
        assert not pids & seen
        seen |= pids
