"""What the tests share: running processes under a hard limit, references, and comparisons.

* processes — :func:`free_port`, :func:`run_bounded` (a command and everything it starts, in
  its own session, killed at the limit), :func:`wait_until`;
* references — :func:`accumulate` (single-process training with gradient accumulation: the
  exact equivalent of ``flush``/``gpipe`` and of a repartitioned flush run) and :func:`stream`
  (a bundle's data, as the runtime's loader draws it);
* comparisons — :func:`final_weights` (a checkpoint re-assembled into one state_dict) and
  :func:`assert_same_weights` (relative error per tensor).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeshift.runtime import checkpoint as ckpt
from pipeshift.runtime.distributed import free_port

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]

__all__ = ["PY", "REPO", "accumulate", "assert_same_weights", "final_weights", "free_port", "run_bounded", "stream",
           "wait_until"]


# -- processes -------------------------------------------------------------------------------------
def run_bounded(cmd: list[str], cwd: Path, limit: float, environ: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` (and everything it starts, in its own session) with a hard time limit; (code, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {limit} s:\n{out[-4000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return proc.returncode, out


def wait_until(predicate: Callable[[], Any], timeout_s: float = 15.0, every_s: float = 0.05) -> Any:
    """``predicate()``'s first truthy value, polled until ``timeout_s``; an AssertionError after that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError("condition not met in time")


# -- references ------------------------------------------------------------------------------------
def stream(bundle: Any, batch_size: int, seed: int, split: str = "train") -> Iterator[Any]:
    """The bundle's minibatches as the runtime draws them (its data, else its synthetic data)."""
    if bundle.data is not None:
        return bundle.data(batch_size, split, seed)
    return bundle.synthetic_data(batch_size, seed + (split != "train"))


def accumulate(bundle: Any, steps: int, microbatches: int, batch_size: int,
               make_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
               seed: int = 0) -> torch.nn.Module:
    """Single-process training: each step averages the gradients of ``microbatches`` microbatches."""
    model, criterion = bundle.model, bundle.criterion()
    data = stream(bundle, batch_size, seed)
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        for _ in range(microbatches):
            x, y = next(data)
            (criterion(model(*x), y) / microbatches).backward()
        opt.step()
        opt.zero_grad()
    return model


# -- comparisons -----------------------------------------------------------------------------------
def final_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The latest checkpoint under ``ckpt_dir`` as one state_dict (keys: the original model's FQNs)."""
    where = ckpt.resolve(ckpt_dir)
    return ckpt.assemble_state_dict(ckpt.stage_files(where, ckpt.read_meta(where)))


def assert_same_weights(got: dict[str, torch.Tensor], model: torch.nn.Module, rtol: float = 1e-5) -> None:
    """Every tensor of ``model``'s state_dict is in ``got`` within ``rtol`` relative error (and no other)."""
    want = model.state_dict()
    assert set(got) == set(want)
    for name, w in want.items():
        err = float((got[name].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        assert err <= rtol, f"{name}: relative error {err:.3g}"
