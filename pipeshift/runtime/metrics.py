"""What a rank writes about itself: ``metrics.csv`` (one row per minibatch) and ``trace.json``.

The trace is Chrome's trace-event format (opens in Perfetto and ``chrome://tracing``): complete
events (``"ph": "X"``) with ``pid`` = rank and ``tid`` 0 (compute: ``F3``, ``B3``, ``step``…) or
1 (communication: waits, ``allreduce``, ``flush``), named by ``thread_name`` metadata, times in
microseconds — exactly what ``pipeshift simulate`` writes, so predicted and measured timelines
can be laid side by side.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

COMPUTE, COMM = 0, 1  # trace thread ids, as the simulator's
COLUMNS = ["step", "split", "stage", "rank", "loss", "samples_per_s", "compute_s", "wait_s", "comm_s", "lr", "time_s",
           "peak_memory_bytes", "predicted_memory_bytes"]


class Tracer:
    """Collects complete events; stops collecting (silently) past ``max_events``."""

    def __init__(self, rank: int, enabled: bool = True, max_events: int = 200_000):
        self.rank = rank
        self.enabled = enabled
        self.max_events = max_events
        self.origin = time.perf_counter()
        self.events: list[dict[str, Any]] = []

    def add(self, name: str, tid: int, start: float, end: float, **args: Any) -> None:
        if not self.enabled or len(self.events) >= self.max_events:
            return
        event = {"name": name, "ph": "X", "pid": self.rank, "tid": tid,
                 "ts": round((start - self.origin) * 1e6, 3), "dur": round(max(end - start, 0.0) * 1e6, 3)}
        if args:
            event["args"] = args
        self.events.append(event)

    def write(self, path: str | os.PathLike[str], process_name: str) -> None:
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "tid": COMPUTE,
                 "args": {"name": process_name}},
                {"name": "process_sort_index", "ph": "M", "pid": self.rank, "tid": COMPUTE,
                 "args": {"sort_index": self.rank}},
                {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": COMPUTE, "args": {"name": "compute"}},
                {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": COMM, "args": {"name": "communication"}}]
        _atomic_write(Path(path), json.dumps({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}))


class MetricsLog:
    """Appends rows to ``metrics.csv``, flushing each so a crashed run keeps what it measured."""

    def __init__(self, path: str | os.PathLike[str], append: bool = False, upto_step: int | None = None):
        """``append`` continues an earlier run's file; ``upto_step`` first drops its rows past that
        step (a run resumed from a checkpoint repeats the steps after it: one row per step stays)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and self.path.exists())
        if not fresh and upto_step is not None:
            fresh = not self._truncate(upto_step)
        self._file = open(self.path, "w" if fresh else "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()
            self._file.flush()

    def _truncate(self, upto_step: int) -> bool:
        """Keep the rows of steps <= ``upto_step``; False if the file is not ours to continue."""
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != COLUMNS:
                return False
            kept = [row for row in reader if str(row.get("step", "")).isdigit() and int(row["step"]) <= upto_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        return True

    def row(self, **values: Any) -> None:
        clean = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items() if v is not None}
        self._writer.writerow(clean)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
