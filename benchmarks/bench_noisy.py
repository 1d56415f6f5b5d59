"""The policy on a noisy machine: `python -m benchmarks.bench_noisy [--quick]`.

A background process takes one core on and off (busy for ``--on`` seconds, idle for ``--off``,
pinned to the last core, killed when the run ends) while two ranks train the zoo MLP with
``flush`` (one thread each, as planned by ``pipeshift plan --straight-pipeline``). Nothing is
slow for long, so the right number of switches is zero, or one that pays for itself. Reported
per run (median and min–max over repeats; nothing is asserted):

* *static*: the planned split, never repartitioning;
* *auto*: ``--policy auto`` as shipped (warm-up, calibration, the gain's confidence bound at
  z = 2 over the streak's windows, the remaining steps against the measured pause);
* *auto, z = 0*: the same policy counting the mean gain with no bound — the threshold rule the
  policy had before, which flapped as noise crossed the thresholds;
* *oracle*: the best static split in hindsight — the planned cut and its two neighbours, each
  measured under the same noise, the best kept.

Columns: switches, samples/s over the run after warm-up, and that throughput against static and
oracle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_repartition import PY, jsonl, rate, sh, step_times, summary, train

NOISE = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
on, off, until = float(sys.argv[2]), float(sys.argv[3]), time.monotonic() + float(sys.argv[4])
while time.monotonic() < until:
    busy = time.monotonic() + on
    while time.monotonic() < busy:
        pass
    time.sleep(off)
"""


@contextlib.contextmanager
def noise(args):
    """The background process, for the length of one run (and never past ``--noise-limit``)."""
    core = (os.cpu_count() or 1) - 1
    proc = subprocess.Popen([PY, "-c", NOISE, str(core), str(args.on), str(args.off), str(args.noise_limit)])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repeat, 120 steps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--report-every", type=int, default=4)
    p.add_argument("--on", type=float, default=2.0, help="seconds the noise holds its core")
    p.add_argument("--off", type=float, default=2.0, help="seconds it leaves it")
    p.add_argument("--noise-limit", type=float, default=1800.0, help="the noise process ends after this anyway")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 120
    work = Path(tempfile.mkdtemp(prefix="bench_noisy_"))
    load0 = os.getloadavg()[0]
    try:
        model = ["pipeshift.models:mlp", "--model-arg", "in_features=256", "--model-arg", f"width={args.width}",
                 "--model-arg", f"depth={args.depth}", "--model-arg", "num_classes=10"]
        sh([PY, "-m", "pipeshift", "profile", *model, "-b", str(args.batch), "-o", "prof", "--quiet"], work, 900)
        sh([PY, "-m", "pipeshift", "plan", "prof/graph.txt", "-n", "2", "--straight-pipeline", "-o", "plan", "-q"],
           work, 300)
        sh([PY, "-m", "pipeshift", "codegen", "plan", "-o", "stages"], work, 300)
        base = json.loads((work / "plan" / "plan.json").read_text())
        order = [n for st in base["stages"] for n in st["nodes"]]
        cut = len(base["stages"][0]["nodes"])
        packages = {0: work / "stages"}
        for delta in (-1, 1):
            if 2 <= cut + delta <= len(order) - 1:
                plan = dict(base, stages=[dict(base["stages"][0], nodes=order[:cut + delta], fqns=[]),
                                          dict(base["stages"][1], nodes=order[cut + delta:], fqns=[])])
                (work / f"cut{delta:+d}.json").write_text(json.dumps(plan))
                sh([PY, "-m", "pipeshift", "codegen", f"cut{delta:+d}.json", "-o", f"cut{delta:+d}"], work, 300)
                packages[delta] = work / f"cut{delta:+d}"
        common = ["--steps", str(args.steps), "--microbatches", str(args.microbatches), "--batch-size",
                  str(args.batch), "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01"]
        policy = ["--policy", "auto", "--graph", str(work / "prof" / "graph.txt"), "--report-every",
                  str(args.report_every)]
        per_step, settle, n = args.microbatches * args.batch, 8, args.steps
        runs: dict[str, dict[str, list[float]]] = {k: {"rate": [], "switches": []}
                                                   for k in ("static", "auto", "auto_z0", "oracle")}
        for rep in range(args.repeats):
            for name, flags in (("static", []), ("auto", policy), ("auto_z0", [*policy, "--policy-arg",
                                                                                 "confidence_z=0"])):
                with noise(args):
                    out = train(work, packages[0], f"{name}{rep}", 2, [*common, *flags], limit=3600)
                switches = [r for r in jsonl(out / "repartitions.jsonl") if r["event"] == "repartition"]
                runs[name]["rate"].append(rate(step_times(out), settle, n, per_step))
                runs[name]["switches"].append(len(switches))
            best = 0.0
            for delta, pkg in packages.items():
                with noise(args):
                    out = train(work, pkg, f"cut{delta:+d}_{rep}", 2, common, limit=3600)
                best = max(best, rate(step_times(out), settle, n, per_step))
            runs["oracle"]["rate"].append(best)
            runs["oracle"]["switches"].append(0)
        static = statistics.median(runs["static"]["rate"])
        oracle = statistics.median(runs["oracle"]["rate"])
        labels = {"static": "static split (never repartitions)", "auto": "auto (shipped: z = 2)",
                  "auto_z0": "auto, z = 0 (no confidence bound)", "oracle": "oracle: best static cut in hindsight"}
        lines = [f"### Noisy machine: one core busy {args.on:g} s / idle {args.off:g} s (MLP width {args.width}, depth "
                 f"{args.depth}; M={args.microbatches} x {args.batch}; {n} steps; {args.repeats} repeat(s); load "
                 f"average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores)", "",
                 "| run | switches, median (min–max) | samples/s, median (min–max) | vs static | vs oracle |",
                 "|---|---:|---:|---:|---:|"]
        for key, label in labels.items():
            med = statistics.median(runs[key]["rate"])
            lines.append(f"| {label} | {summary(runs[key]['switches'], '{:.0f}')} | {summary(runs[key]['rate'])} | "
                         f"{100 * med / static:.0f}% | {100 * med / oracle:.0f}% |")
        print("\n".join(lines))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
