"""Simulate a plan's pipeline schedule: `pipeshift simulate PLAN --schedule flush --microbatches 8 [-o trace.json]`.

Reports throughput, bubble fraction and peak memory per worker, and writes the timeline as a
Chrome trace (open it in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeshift.errors import PipeshiftError
from pipeshift.optimizer.simulator import simulate, stages_from_plan
from pipeshift.plan import MAX_MICROBATCHES, read_plan
from pipeshift.schedule.registry import SCHEDULES
from pipeshift.textable import text_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan directory (or its plan.json)")
    p.add_argument("--schedule", choices=SCHEDULES, help="default: the schedule the plan was made for")
    p.add_argument("--microbatches", type=str, metavar="M", help="microbatches per minibatch (default: the plan's)")
    p.add_argument("--steps", type=str, default="4", metavar="N", help="minibatches to simulate (default 4)")
    p.add_argument("-o", "--output", metavar="TRACE", help="trace file to write (default PLAN/trace.json)")


MAX_STEPS = 10_000
MAX_EVENTS = 5_000_000  # forward + backward per microbatch, step and rank: a trace of ~1 GB


def _positive_int(text: str, flag: str, maximum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PipeshiftError(f"{flag}: {text!r} is not an integer") from None
    if value < 1:
        raise PipeshiftError(f"{flag}: must be at least 1, got {value}")
    if value > maximum:
        raise PipeshiftError(f"{flag}: {value} is more than {maximum} (the trace would not fit in memory)")
    return value


def run(args: argparse.Namespace) -> int:
    steps = _positive_int(args.steps, "--steps", MAX_STEPS)
    if args.microbatches is not None:
        _positive_int(args.microbatches, "--microbatches", MAX_MICROBATCHES)
    plan = read_plan(args.plan)
    file = Path(plan.source)
    stages = stages_from_plan(plan)
    kind = args.schedule or plan.schedule or "1f1b"
    if kind not in SCHEDULES:
        raise plan.error(("schedule", "kind"), f"{kind!r} is not one of {', '.join(SCHEDULES)}")
    if args.microbatches is not None:
        M = _positive_int(args.microbatches, "--microbatches", MAX_MICROBATCHES)
    else:
        M = plan.microbatches or 4
        if M > MAX_MICROBATCHES:
            raise plan.error(("schedule", "microbatches"), f"{M} is more than {MAX_MICROBATCHES}")
    workers = sum(st.replicas for st in stages)
    events = 2 * M * steps * workers
    if events > MAX_EVENTS:
        raise PipeshiftError(f"{M} microbatches x {steps} steps on {workers} workers is {events} events, more "
                             f"than {MAX_EVENTS}: simulate fewer")
    opt_states = plan.optimizer_states
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
    print(text_table(rows))
    batch = plan.batch_size
    print()
    print(f"schedule {kind}, {M} microbatches x {steps} minibatches on {len(result.ranks)} workers")
    line = f"time per minibatch: {result.time_per_minibatch_s * 1000:.3f} ms ({result.time_per_microbatch_s * 1000:.3f} ms per microbatch"
    if batch is not None and result.time_per_microbatch_s > 0:
        line += f", {batch / result.time_per_microbatch_s:.1f} samples/s"
    print(line + ")")
    if result.steady_time_per_microbatch_s is not None:
        print(f"steady state: {result.steady_time_per_microbatch_s * 1000:.3f} ms per microbatch")
    predicted = plan.predicted.get("time_per_minibatch_s")
    if isinstance(predicted, (int, float)):
        print(f"planner's steady-state prediction: {predicted * 1000:.3f} ms per microbatch")
    print(f"bubble fraction: {result.bubble_fraction:.3f}")
    print(f"wrote {out}")
    return 0
