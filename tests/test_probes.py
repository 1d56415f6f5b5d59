"""The hostile-input probe as a table-driven suite: every input ends in one clean line, nothing runs.

The table is ``tests/probes.py`` (one row per hostile input: a file, a flag, a control-plane
message or connection). Each probe plants a marker-writing injection wherever code could be
named; the marker must never appear. Probes run in this process (one shared base of tiny
artifacts, built once), so the whole table costs about as much as one training run.
``benchmarks/probe_counts.py`` runs the same table in subprocesses and counts the outcomes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import probes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-base")
    probes.build_base(root)
    return root


@pytest.mark.parametrize("probe", probes.PROBES, ids=[p.id for p in probes.PROBES])
def test_probe_ends_in_a_clean_error(probe: probes.Probe, base: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("PIPESHIFT_TOKEN", raising=False)
    monkeypatch.delenv("PIPESHIFT_MASTER", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scratch directory (evil module) leaves with the test
    scratch = probes.Scratch(tmp_path / "work", base)
    out = probe.run(scratch)
    assert not scratch.marker.exists(), f"{probe.id}: injected code ran ({out.message})"
    assert out.outcome == "clean error", f"{probe.id}: {out.outcome}: {out.message}"
    assert "\n" not in out.message
    assert probe.expect in out.message, f"{probe.id}: the error does not say {probe.expect!r}: {out.message}"


# -- launch: --master through torchrun, one line when a rank fails, a rank dead at start-up ------
PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPESHIFT_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture()
def master():
    from pipeshift.launch.master import Master

    m = Master(probes.TOKEN, port=0, heartbeat_timeout_s=30.0)
    m.start_in_thread()
    yield m
    m.stop()


TRAIN = ["--steps", "2", "--no-progress", "--trace-steps", "0"]


# launch --local runs `torchrun … -m pipeshift -- train … --master H:P`; bare torchrun takes $PIPESHIFT_MASTER
# (and `launch --hosts`'s printed commands are parsed by torchrun's own parser in the probe table).
@pytest.mark.parametrize("how", ["launch --local", "torchrun, PIPESHIFT_MASTER"])
def test_master_reaches_the_ranks_through_torchrun(how: str, base: Path, tmp_path: Path, master) -> None:
    where = f"{master.address[0]}:{master.address[1]}"
    train = [str(base / "pkg"), *TRAIN, "--output-dir", str(tmp_path / "out")]
    env = _env(PIPESHIFT_TOKEN=probes.TOKEN)
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "pipeshift"]
    if how == "launch --local":
        cmd = [PY, "-m", "pipeshift", "launch", "--local", "1", *train, "--master", where]
    else:
        cmd, env = [*torchrun, "train", *train], {**env, "PIPESHIFT_MASTER": where}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [w["rank"] for w in master._on_status({})["workers"]] == [0]  # registered, reported, said goodbye


def test_failed_local_launch_ends_with_one_summary_line(base: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(base / "pkg", bad)
    (bad / "conf.json").write_text('{"module_to_stage_map": [0,')
    done = subprocess.run([PY, "-m", "pipeshift", "launch", "--local", "1", str(bad), *TRAIN], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("pipeshift")]
    assert "conf.json:1: invalid JSON" in lines[0] and lines[-1].startswith("pipeshift launch: rank 0 exited with code 1")


def test_elastic_stops_at_once_when_a_rank_dies_during_start_up(base: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    done = subprocess.run([PY, "-m", "pipeshift", "launch", "--local", "2", "--elastic", "--max-restarts", "0",
                           str(base / "pkg2"), *TRAIN, "--microbatches", "2", "--timeout", "120",
                           "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "out")],
                          cwd=tmp_path, env=_env(PIPESHIFT_FAULT="1@start"), capture_output=True, text=True,
                          timeout=300)
    took = time.monotonic() - t0
    assert done.returncode != 0
    assert "rank 1 died during start-up (killed by signal 9); stopping the others now" in done.stderr, done.stderr
    assert took < 100, f"waited {took:.0f} s: the survivors sat out the rendezvous timeout"


def test_the_rendezvous_store_listens_only_on_the_address_given() -> None:
    """``--dist-addr 127.0.0.1:P`` must not open P on every interface (torch's tcp:// store does)."""
    import torch.distributed as dist

    from pipeshift.runtime.distributed import init_distributed

    port = probes._free_port()
    init_distributed(rank=0, world_size=1, dist_addr=f"127.0.0.1:{port}", timeout_s=30)
    try:
        listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
        listening6 = [line.split()[1] for line in Path("/proc/net/tcp6").read_text().splitlines()[1:]
                      if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    finally:
        dist.destroy_process_group()
    assert listening == ["0100007F:" + f"{port:04X}"] and listening6 == []
