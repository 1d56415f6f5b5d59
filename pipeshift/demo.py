"""The end-to-end demo: profile → plan → codegen → train on 2 local ranks, with a short report.

``pipeshift demo`` (``make demo``) runs every step as the shell command a user would type, prints
that command first, and ends with where each file went. It trains a small ResNet-18 on
scikit-learn's bundled handwritten digits (real data, no download), so the loss visibly falls.
Where the repartitioning step is available, one worker is slowed down mid-run and the policy
moves layers away from it while training continues; the report then shows samples/s before,
during and after.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeshift.errors import PipeshiftError
from pipeshift.plan import read_plan

MODEL = "pipeshift.models:resnet18"
MODEL_ARGS = ["width=8", "image_size=32", "num_classes=10", "data=digits"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="directory for every file the demo writes")
    p.add_argument("--steps", type=int, default=300, help="training minibatches")
    p.add_argument("--batch-size", type=int, default=32, help="samples per microbatch")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--slowdown", type=float, default=4.0, help="how much slower worker 1 gets mid-run (1 = none)")
    p.add_argument("--no-repartition", action="store_true", help="keep the first plan even when a worker slows")


def _pipeshift(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeshift", *args]


def _run(cmd: list[str], log: Path, timeout: float = 900) -> None:
    shown = " ".join(shlex.quote(c) for c in ["pipeshift", *cmd[3:]] if c)
    print(f"\n$ {shown}", flush=True)
    with open(log, "a") as fh:
        fh.write(f"$ {shown}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        fh.write(proc.stdout)
    lines = [ln for ln in proc.stdout.splitlines() if "\r" not in ln and "it/s" not in ln and "step/s" not in ln]
    print("\n".join("  " + ln for ln in lines[-14:]))
    if proc.returncode != 0:
        raise PipeshiftError(f"step failed (exit {proc.returncode}): {shown}; full output in {log}")


def _supports(command: str, flag: str) -> bool:
    proc = subprocess.run(_pipeshift(command, "--help"), capture_output=True, text=True, timeout=120)
    return flag in proc.stdout


def _read_metrics(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(run_dir.glob("rank*/metrics.csv")):
        with open(path) as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("split", "train") == "train"]
        by_rank[int(path.parent.name[4:])] = rows
    return by_rank


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _phase_rates(rows: list[dict[str, Any]], slow_at: int | None, switched_at: int | None) -> dict[str, float]:
    """Median samples/s per phase; the first steps (start-up) and the switch step are left out."""
    rate = {int(r["step"]): float(r["samples_per_s"]) for r in rows if r.get("samples_per_s")}
    steps = sorted(rate)
    if not steps:
        return {}
    first = steps[0] + 3
    if slow_at is None:
        return {"whole run": _median([rate[s] for s in steps if s >= first])}
    phases = {"before slowdown": _median([rate[s] for s in steps if first <= s < slow_at])}
    end_during = switched_at if switched_at is not None else steps[-1] + 1
    phases["slowed, before repartition"] = _median([rate[s] for s in steps if slow_at + 1 <= s < end_during])
    if switched_at is not None:
        phases["after repartition"] = _median([rate[s] for s in steps if s > switched_at + 1])
    return phases


def _repartitions(run_dir: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for path in sorted(run_dir.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("event") in ("repartition", "migration"):
                events.append(rec)
    return events


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    prof, plan, stages, run_dir, ckpt = (out / d for d in ("profile", "plan", "stages", "run", "checkpoint"))
    t0 = time.perf_counter()
    model_args = [a for kv in MODEL_ARGS for a in ("--model-arg", kv)]
    print("pipeshift demo: a small ResNet-18 on scikit-learn's handwritten digits, 2 local workers")
    _run(_pipeshift("profile", MODEL, *model_args, "-b", str(args.batch_size), "--threads", "1", "-o", str(prof)), log)
    _run(_pipeshift("plan", str(prof / "graph.txt"), "-n", "2", "--straight-pipeline", "--schedule", "flush",
                    "--microbatches", str(args.microbatches), "-o", str(plan)), log)
    _run(_pipeshift("codegen", str(plan), "-o", str(stages)), log)

    train = ["launch", "--local", "2", str(stages), "--schedule", "flush", "--microbatches", str(args.microbatches),
             "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--optimizer", "sgd", "--lr", "0.05",
             "--momentum", "0.9", "--eval-steps", "4", "--checkpoint-dir", str(ckpt), "--output-dir", str(run_dir),
             "--no-progress"]
    slow_at = None
    can_shift = _supports("train", "--slowdown")
    if args.slowdown > 1 and can_shift:
        slow_at = max(args.steps // 3, 5)
        train += ["--slowdown", f"1:{args.slowdown}@{slow_at}"]
        if not args.no_repartition and _supports("train", "--policy"):
            train += ["--policy", "auto"]
    elif args.slowdown > 1:
        print("\n(note: this build has no --slowdown/--policy yet; the demo trains on a static plan)")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    _run(_pipeshift(*train), log, timeout=1800)
    _run(_pipeshift("export", str(ckpt), "-o", str(out / "model.pt"), "--package", str(stages)), log)

    # -- report ---------------------------------------------------------------------------
    planned = read_plan(plan)
    metrics = _read_metrics(run_dir)
    last_rank = max(metrics) if metrics else None
    predicted = planned.predicted
    print("\n== report ==")
    print(f"plan: {planned.num_stages} stages, predicted {predicted['time_per_minibatch_s'] * 1e3:.2f} ms "
          f"per microbatch, {predicted.get('throughput_samples_per_s', float('nan')):.0f} samples/s")
    for s in planned.stages:
        print(f"  stage {s.stage_id}: {len(s.nodes)} nodes ({s.nodes[0]}..{s.nodes[-1]}), ranks {list(s.ranks)}")
    if last_rank is not None:
        losses = [(int(r["step"]), float(r["loss"])) for r in metrics[last_rank] if r.get("loss")]
        if losses:
            marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
            print("loss: " + "  ".join(f"step {losses[i][0]}: {losses[i][1]:.3f}" for i in marks))
    events = [e for e in _repartitions(run_dir) if e.get("event") == "repartition"]
    # The policy may also move layers before the slowdown, when measured stage times differ from
    # the profile's; the "during" phase ends at the first repartition after the slowdown.
    switched = min((int(e["step"]) for e in events if slow_at is not None and int(e["step"]) >= slow_at), default=None)
    if slow_at is not None:
        print(f"worker 1 slowed {args.slowdown:g}x from step {slow_at}")
    for e in events:
        why = " (before the slowdown: measured stage times differed from the profile)" if (
            slow_at is not None and int(e["step"]) < slow_at) else ""
        print(f"repartition after step {e['step']} by {e.get('source', '?')}: moved {e.get('bytes_moved', 0) / 1e3:.1f} kB "
              f"in {e.get('messages', '?')} messages, pause {e.get('pause_s', float('nan')):.3f} s{why}")
    if last_rank is not None:
        for phase, rate in _phase_rates(metrics[0], slow_at, switched).items():
            print(f"samples/s {phase}: {rate:.0f}")
    print("\nfiles:")
    for what, path in [("profile", prof / "graph.txt"), ("profile picture", prof / "graph.svg"),
                       ("plan", plan / "plan.json"), ("plan picture", next(iter(sorted(plan.glob("*.svg"))), plan)),
                       ("stage files", stages), ("metrics and traces", run_dir), ("checkpoint", ckpt),
                       ("exported state_dict", out / "model.pt"), ("log of every command", log)]:
        print(f"  {what:22s} {path}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s" + (f" (OMP_NUM_THREADS={env_threads})" if env_threads else ""))
    return 0
