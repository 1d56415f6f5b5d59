"""Simulate a plan's pipeline schedule: `pipeshift simulate PLAN --schedule flush --microbatches 8 [-o trace.json]`.

Reports throughput, bubble fraction and peak memory per worker, and writes the timeline as a
Chrome trace (open it in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pipeshift.jsonfile import read_json_object
from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.optimizer.schedules import SCHEDULES
from pipeshift.optimizer.simulator import simulate, stages_from_plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan directory (or its plan.json)")
    p.add_argument("--schedule", choices=SCHEDULES, help="default: the schedule the plan was made for")
    p.add_argument("--microbatches", type=str, metavar="M", help="microbatches per minibatch (default: the plan's)")
    p.add_argument("--steps", type=str, default="4", metavar="N", help="minibatches to simulate (default 4)")
    p.add_argument("-o", "--output", metavar="TRACE", help="trace file to write (default PLAN/trace.json)")


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PipeshiftError(f"{flag}: {text!r} is not an integer") from None
    if value < 1:
        raise PipeshiftError(f"{flag}: must be at least 1, got {value}")
    return value


def load_plan(path: str) -> tuple[Path, dict]:
    p = Path(path)
    file = p / "plan.json" if p.is_dir() else p
    return file, read_json_object(file, "plan file", " (expected the directory `pipeshift plan -o` wrote)")


def run(args: argparse.Namespace) -> int:
    steps = _positive_int(args.steps, "--steps")
    if args.microbatches is not None:
        _positive_int(args.microbatches, "--microbatches")
    file, plan = load_plan(args.plan)
    stages = stages_from_plan(plan, str(file))
    planned = plan.get("schedule") if isinstance(plan.get("schedule"), dict) else {}
    kind = args.schedule or planned.get("kind") or "1f1b"
    if kind not in SCHEDULES:
        raise InputFileError(str(file), None, f"schedule.kind {kind!r} is not one of {', '.join(SCHEDULES)}")
    if args.microbatches is not None:
        M = _positive_int(args.microbatches, "--microbatches")
    else:
        M = planned.get("microbatches", 4)
        if isinstance(M, bool) or not isinstance(M, int) or M < 1:
            raise InputFileError(str(file), None, f"schedule.microbatches must be a positive integer, got {M!r}")
    mem = plan.get("memory") if isinstance(plan.get("memory"), dict) else {}
    opt_states = mem.get("optimizer_states", 2.0)
    if isinstance(opt_states, bool) or not isinstance(opt_states, (int, float)) or opt_states < 0:
        opt_states = 2.0
    result = simulate(stages, kind, M, steps, float(opt_states))
    out = Path(args.output) if args.output else file.parent / "trace.json"
    try:
        out.write_text(json.dumps(result.trace()))
    except OSError as e:
        raise PipeshiftError(f"{out}: cannot write the trace ({e.strerror})") from None
    rows = [
        {"rank": r.rank, "stage": r.stage, "replica": r.replica, "busy %": round(100 * r.busy_s / result.makespan_s, 1)
         if result.makespan_s else 0.0, "peak in flight": r.peak_in_flight, "peak memory GB": round(r.peak_memory_bytes / 1e9, 3)}
        for r in result.ranks
    ]
    print(pd.DataFrame(rows).to_string(index=False))
    batch = plan.get("batch_size")
    print()
    print(f"schedule {kind}, {M} microbatches x {steps} minibatches on {len(result.ranks)} workers")
    line = f"time per minibatch: {result.time_per_minibatch_s * 1000:.3f} ms ({result.time_per_microbatch_s * 1000:.3f} ms per microbatch"
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 and result.time_per_microbatch_s > 0:
        line += f", {batch / result.time_per_microbatch_s:.1f} samples/s"
    print(line + ")")
    if result.steady_time_per_microbatch_s is not None:
        print(f"steady state: {result.steady_time_per_microbatch_s * 1000:.3f} ms per microbatch")
    predicted = plan.get("predicted", {}).get("time_per_minibatch_s") if isinstance(plan.get("predicted"), dict) else None
    if isinstance(predicted, (int, float)):
        print(f"planner's steady-state prediction: {predicted * 1000:.3f} ms per microbatch")
    print(f"bubble fraction: {result.bubble_fraction:.3f}")
    print(f"wrote {out}")
    return 0
