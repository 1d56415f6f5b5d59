"""Is this profile trustworthy? Noise checks around the timed steps, and when to measure again.

A profile taken while something else used the cores comes out slow for every node at once, and
nothing in the numbers themselves says so — one profile came out 100× too slow (a Linear at
7.9 ms instead of 0.05 ms). Two independent signals catch that:

* **a calibration kernel** — a fixed matrix product, timed (best of several short repeats) before
  and after the steps, with the profile's thread count and with one thread. Its time should not
  change between before and after (the machine changed while profiling), and the thread pool
  should not be slower than one thread (the cores it expects are taken: the pool's threads
  wait for each other, which is how one slow core made every node slow by a large factor);
* **the spread between repeats** — the uninstrumented whole steps, timed each iteration: on a
  quiet machine p90/p10 stays near 1; a background process coming and going widens it.

:func:`assess` turns the numbers into findings; the profiler re-measures (``--remeasure``
times) while there are findings, keeps the steadiest attempt, and warns with the numbers if
even that one is noisy. Everything is recorded in profile.json's ``noise``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

CALIBRATION_SIZE = 96  # a 96×96 float32 matrix product: ~1.8 MFLOP, tens of µs on one core
CALIBRATION_REPEATS = 30
CALIBRATION_BUDGET_S = 0.05  # per timing of the kernel
DRIFT_LIMIT = 1.5  # after/before (or before/after) calibration ratio above this: the machine changed
POOL_LIMIT = 1.5  # pool time over one-thread time above this: the threads' cores are busy
SPREAD_LIMIT = 2.0  # p90/p10 of the whole steps above this: the steps were disturbed


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Best-of-repeats time of the calibration kernel, in ms, with the pool and with one thread."""

    pool_ms: float
    one_thread_ms: float
    threads: int

    def to_json(self) -> dict[str, Any]:
        return {"pool_ms": round(self.pool_ms, 6), "one_thread_ms": round(self.one_thread_ms, 6),
                "threads": self.threads}


def _best_ms(a: torch.Tensor, b: torch.Tensor, repeats: int, budget_s: float = CALIBRATION_BUDGET_S) -> float:
    """Best of ``repeats`` products, fewer (at least 3) once ``budget_s`` is spent: on a loaded
    machine one product can wait a whole scheduler slice, and the check must stay cheap."""
    best = float("inf")
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if i >= 2 and t1 - start > budget_s:
            break
    return best * 1e3


def calibrate(repeats: int = CALIBRATION_REPEATS) -> Calibration:
    """Time the calibration kernel on the CPU (the cores the profile's host-side work runs on)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(CALIBRATION_SIZE, CALIBRATION_SIZE, generator=g)
    b = torch.randn(CALIBRATION_SIZE, CALIBRATION_SIZE, generator=g)
    threads = torch.get_num_threads()
    _best_ms(a, b, 3)  # first-touch and thread-pool start-up
    pool = _best_ms(a, b, repeats)
    if threads > 1:
        torch.set_num_threads(1)
        try:
            one = _best_ms(a, b, repeats)
        finally:
            torch.set_num_threads(threads)
    else:
        one = pool
    return Calibration(pool, one, threads)


def spread(samples: Sequence[float]) -> float:
    """p90 / p10 of repeated step times (1.0 = perfectly steady)."""
    if len(samples) < 2:
        return 1.0
    p10, p90 = np.percentile(np.asarray(samples, dtype=float), [10, 90])
    return float(p90 / p10) if p10 > 0 else float("inf")


def assess(before: Calibration, after: Calibration, step_ms: Sequence[float]) -> list[str]:
    """What looks wrong with a measurement taken between ``before`` and ``after`` (empty: nothing)."""
    findings = []
    drift = max(after.pool_ms / before.pool_ms, before.pool_ms / after.pool_ms)
    if drift > DRIFT_LIMIT:
        findings.append(f"the calibration kernel took {before.pool_ms:.3g} ms before the steps and "
                        f"{after.pool_ms:.3g} ms after (x{drift:.2f}): the machine's load changed while profiling")
    for when, cal in (("before", before), ("after", after)):
        if cal.threads > 1 and cal.pool_ms > POOL_LIMIT * cal.one_thread_ms:
            findings.append(f"with {cal.threads} threads the calibration kernel took {cal.pool_ms:.3g} ms, "
                            f"{cal.pool_ms / cal.one_thread_ms:.1f}x one thread's {cal.one_thread_ms:.3g} ms "
                            f"({when} the steps): other processes hold the cores the threads need; "
                            "profile with --threads 1 or on a quiet machine")
            break
    s = spread(step_ms)
    if s > SPREAD_LIMIT:
        findings.append(f"whole-step times spread x{s:.2f} between p10 and p90 (limit x{SPREAD_LIMIT:g}): "
                        "the steps were disturbed")
    return findings


@dataclasses.dataclass
class Attempt:
    """One timed measurement with its noise checks (the profiler keeps the steadiest)."""

    samples: Any
    before: Calibration
    after: Calibration
    findings: list[str]
    step_spread: float

    def badness(self) -> tuple[int, float]:
        return (len(self.findings), self.step_spread)

    def to_json(self, attempts: int) -> dict[str, Any]:
        return {"verdict": "noisy" if self.findings else "quiet", "findings": self.findings,
                "attempts": attempts, "step_spread_p90_over_p10": round(self.step_spread, 4),
                "calibration_before": self.before.to_json(), "calibration_after": self.after.to_json(),
                "limits": {"drift": DRIFT_LIMIT, "pool_over_one_thread": POOL_LIMIT, "step_spread": SPREAD_LIMIT}}
