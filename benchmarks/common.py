"""Helpers the benchmarks share: medians with their spread, relative gaps, markdown tables.

Benchmarks report, they never assert: every figure on this shared machine is a sample from a
noisy distribution, so a figure is a median of repeats printed next to its min–max, and a
comparison is a signed relative gap rather than a pass/fail.
"""

from __future__ import annotations

import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Spread:
    """The median of some repeats and the range around it."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(finite), min(finite), max(finite), len(finite))

    def format(self, fmt: Callable[[float], str] = lambda x: f"{x:.3g}") -> str:
        """``median (low–high)``; just the median for a single value, ``–`` for none."""
        if self.count == 0:
            return "–"
        if self.count == 1 or self.low == self.high:
            return fmt(self.median)
        return f"{fmt(self.median)} ({fmt(self.low)}–{fmt(self.high)})"


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Spread, Any]:
    """Wall time of ``repeats`` calls of ``fn`` and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return Spread.of(times), out


def relative_gap(measured: float, predicted: float) -> float:
    """``measured / predicted − 1``: positive when the measurement is the larger."""
    if not (math.isfinite(measured) and math.isfinite(predicted)) or predicted == 0:
        return math.nan
    return measured / predicted - 1.0


def fmt_gap(gap: float, target: float | None = None) -> str:
    """``+4.2%``; in bold, with a mark, when ``|gap|`` exceeds ``target``."""
    if not math.isfinite(gap):
        return "–"
    text = f"{100 * gap:+.1f}%"
    return f"**{text}** ✗" if target is not None and abs(gap) > target else text


def fmt_seconds(x: float) -> str:
    """Milliseconds below a second, seconds above."""
    if not math.isfinite(x):
        return "–"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A GitHub markdown table; ``right`` lists the columns to right-align (numbers).

    Cells are ``str()``-ed and a ``|`` inside a cell is escaped so it cannot split the row.
    """
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    rows = [list(r) for r in rows]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells, the header {len(headers)}: {r!r}")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def load_average() -> float:
    """The 1-minute load average (nan where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return math.nan


class RunnableSampler:
    """How many threads were runnable machine-wide while a block ran (Linux ``procs_running``).

    The load average trails by a minute; this says what a measurement actually competed with.
    With ``R`` runnable threads on ``C`` cores, each gets about ``min(1, C / R)`` of a core, so
    a wall-clock figure taken then is inflated by about ``max(1, R / C)``. The sampling thread
    itself is not counted.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runnable-sampler", daemon=True)

    @staticmethod
    def read() -> int | None:
        try:
            with open("/proc/stat") as f:
                for line in f:
                    if line.startswith("procs_running"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            n = self.read()
            if n is None:
                return
            self.samples.append(max(0, n - 1))  # this thread was running while it read

    def __enter__(self) -> RunnableSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan


def sh(cmd: list[str], cwd: Path) -> None:
    """Run one set-up step, echoing it so a benchmark's report shows how its inputs were made."""
    print(f"    $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def at_once(target: Callable[..., None], args: Sequence[Any], k: int, timeout_s: float = 300.0) -> list[Any]:
    """Run ``target(start, out, *args)`` in ``k`` fresh processes started together; their results.

    Each process sets itself up, waits on ``start`` (a barrier) and puts one result on ``out``:
    what ``k`` workers of this machine deliver at the same time, with no pipeshift in between.
    ``target`` must be importable (a module-level function: the processes are spawned).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=target, args=(start, out, *args)) for _ in range(k)]
    for proc in procs:
        proc.start()
    try:
        return [out.get(timeout=timeout_s) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
