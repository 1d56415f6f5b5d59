"""`pipeshift demo` end to end, short: every step's files appear and the exported model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from pipeshift.codegen import load_package


def test_demo_runs_every_step_and_exports_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeshift", "demo", "--out", str(out), "--steps", "12", "--batch-size", "8",
         "--slowdown", "1"],
        capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rel in ["profile/graph.txt", "profile/profile.json", "plan/plan.json", "plan/gpus=2.txt", "stages/stage0.py",
                "stages/stage1.py", "stages/conf.json", "run/rank0/metrics.csv", "run/rank1/trace.json", "model.pt"]:
        assert (out / rel).is_file(), rel
    assert "loss: step 1:" in proc.stdout and "== report ==" in proc.stdout
    # The exported state_dict is the original model's, key for key.
    package = load_package(out / "stages")
    model = package.full_model()
    state = torch.load(out / "model.pt", map_location="cpu")
    model.load_state_dict(state, strict=True)
    assert set(state) == set(model.state_dict())
