"""The profiler notices a disturbed measurement, measures again, and says so."""

from __future__ import annotations

import json

import torch

from pipeshift.cli import main
from pipeshift.profiler import noise
from pipeshift.profiler.profile import profile_model

QUIET = noise.Calibration(pool_ms=0.05, one_thread_ms=0.06, threads=2)


def test_assess_names_each_kind_of_noise() -> None:
    assert noise.assess(QUIET, QUIET, [10.0, 10.2, 9.9, 10.1]) == []
    drifted = noise.assess(QUIET, noise.Calibration(0.5, 0.5, 2), [10.0] * 4)
    assert len(drifted) == 1 and "load changed while profiling" in drifted[0] and "x10.00" in drifted[0]
    busy = noise.Calibration(pool_ms=7.9, one_thread_ms=0.05, threads=2)  # the pool waits for taken cores
    found = noise.assess(busy, busy, [10.0] * 4)
    assert len(found) == 1 and "158.0x one thread" in found[0] and "--threads 1" in found[0]
    spread = noise.assess(QUIET, QUIET, [10.0, 10.0, 10.0, 40.0, 40.0, 41.0])
    assert len(spread) == 1 and "spread" in spread[0]


def test_calibration_kernel_is_timed_with_the_pool_and_one_thread() -> None:
    cal = noise.calibrate(repeats=5)
    assert cal.pool_ms > 0 and cal.one_thread_ms > 0 and cal.threads == torch.get_num_threads()


def _scripted(monkeypatch, calibrations: list[noise.Calibration]) -> list[noise.Calibration]:
    """Calibrations in this order; the real steps' spread is not judged (this machine may be loaded)."""
    queue = list(calibrations)
    monkeypatch.setattr(noise, "calibrate", lambda repeats=noise.CALIBRATION_REPEATS: queue.pop(0))
    monkeypatch.setattr(noise, "SPREAD_LIMIT", float("inf"))
    return queue


def test_noisy_measurement_is_taken_again_and_the_quiet_one_kept(monkeypatch) -> None:
    left = _scripted(monkeypatch, [QUIET, noise.Calibration(5.0, 5.0, 2), QUIET, QUIET])
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    prof = profile_model(model, (torch.randn(4, 8),), batch_size=4, iterations=3, warmup=0, progress=False,
                         device="cpu", remeasure=2)
    assert not left  # two attempts, two calibrations each
    assert prof.noise["attempts"] == 2 and prof.noise["verdict"] == "quiet" and prof.noise_findings == []


def test_persistent_noise_is_a_warning_on_the_command_line(tmp_path, monkeypatch, capsys) -> None:
    busy = noise.Calibration(pool_ms=7.9, one_thread_ms=0.05, threads=2)
    _scripted(monkeypatch, [busy] * 4)
    rc = main(["profile", "tests.profiler_user_model:tiny_net", "--input-shape", "3,8,8", "-b", "2",
               "--iterations", "2", "--warmup", "0", "--remeasure", "1", "-o", str(tmp_path), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "pipeshift profile: warning: b=2:" in line]
    assert len(warning) == 1 and "kept the steadiest of 2 measurements" in warning[0], err
    recorded = json.loads((tmp_path / "profile.json").read_text())["noise"]
    assert recorded["verdict"] == "noisy" and recorded["attempts"] == 2
