"""Predicted against measured: `python -m benchmarks.bench_prediction [--quick]`.

PipeDream's users found its predicted stage times and throughput far from what training then
measured (PipeDream issue #50). This benchmark runs pipeshift's whole chain on zoo models, the
way a user would, and compares:

1. ``pipeshift profile`` at a fixed ``--threads`` — the thread count each rank then trains with
   (cores ÷ ranks on this machine, what ``pipeshift train`` picks by default; it is passed
   explicitly because torchrun sets ``OMP_NUM_THREADS=1``, which would otherwise win);
2. ``pipeshift netcheck --local N`` → ``pipeshift plan --topology … --straight-pipeline
   --schedule flush`` (a straight pipeline, so every stage has a rank of its own to compare);
3. ``pipeshift codegen`` and ``pipeshift launch --local N … --schedule flush``, repeated;
4. predicted per-stage forward + backward time (plan.json ``stages[*].costs``, whose sum is
   ``stages[*].predicted.compute_s``) against the median forward and backward times the ranks
   traced; predicted samples/s — the planner's steady state (``predicted``, no pipeline bubble)
   and the simulator's (``pipeshift simulate``'s code, same schedule and microbatches) —
   against the samples/s in the last stage's metrics.csv.

A third throughput figure simulates the same schedule with the *measured* stage times: the gap
between it and the measurement is what the simulator leaves out (optimizer step, data loading,
per-message overhead), separated from what the profile got wrong. Gaps are ``measured /
predicted − 1``; PipeDream's users saw tens of percent, our target is under 10 %. Medians over
repeats, with min–max; the load average is recorded because other work shares the cores.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from benchmarks.common import RunnableSampler, Spread, fmt_gap, load_average, markdown_table, relative_gap
from pipeshift.optimizer.simulator import SimStage, simulate, stages_from_plan
from pipeshift.plan import parse_plan

REPO = Path(__file__).resolve().parents[1]

TARGET = 0.10  # the relative gap we aim to stay under
SCHEDULE = "flush"


@dataclass(frozen=True)
class Case:
    """A zoo model at a size whose stages take ~10–40 ms per microbatch on one thread here."""

    name: str
    callable: str
    kwargs: dict[str, Any]
    batch_size: int

    def spec_args(self) -> list[str]:
        out = [self.callable]
        for key, value in self.kwargs.items():
            out += ["--model-arg", f"{key}={value}"]
        return out


CASES = {
    "mlp": Case("mlp", "pipeshift.models:mlp", {"width": 512, "depth": 16}, 128),
    "resnet18": Case("resnet18", "pipeshift.models:resnet18", {"width": 16, "image_size": 64, "num_classes": 10}, 32),
    "gpt": Case("gpt", "pipeshift.models:gpt",
                {"width": 128, "depth": 4, "heads": 4, "seq_len": 64, "vocab_size": 256}, 16),
}


class StepFailed(RuntimeError):
    """A pipeshift command failed; carries its command line and last output lines."""


# `pipeshift ARGS` with glibc malloc tuned as `pipeshift train` tunes it (runtime/allocator.py)
_WITH_RUNTIME_ALLOCATOR = ("import sys; from pipeshift.runtime.allocator import keep_freed_memory; keep_freed_memory(); "
                           "from pipeshift.cli import main; sys.exit(main(sys.argv[1:]))")


def pipeshift(args: list[str], timeout_s: float, runtime_allocator: bool = False) -> str:
    """Run ``python -m pipeshift ARGS`` in its own process group; on timeout, kill the group."""
    cmd = [sys.executable, *(["-c", _WITH_RUNTIME_ALLOCATOR] if runtime_allocator else ["-m", "pipeshift"]), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers are in this group too
        out, _ = proc.communicate()
        raise StepFailed(f"`pipeshift {' '.join(args[:2])} …` timed out after {timeout_s:.0f} s:\n{_tail(out)}") from None
    if proc.returncode != 0:
        raise StepFailed(f"`pipeshift {' '.join(args)}` exited {proc.returncode}:\n{_tail(out)}")
    return out


def _tail(text: str, lines: int = 12) -> str:
    """The lines that say what went wrong (pipeshift's one-line errors), then the last few."""
    all_lines = [line.rsplit("\r", 1)[-1] for line in text.strip().split("\n")]
    errors = [line for line in all_lines if "error" in line.lower() and "errors.html" not in line][:5]
    rest = [line for line in all_lines[-lines:] if line not in errors]
    return "\n".join(errors + rest)


def threads_per_rank(workers: int) -> int:
    """What ``pipeshift train`` gives each of ``workers`` ranks on this machine by default."""
    return max(1, (os.cpu_count() or 1) // workers)


# -- measurements from a run's files -----------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("split") == "train"]


def traced_compute(path: Path, warmup_steps: int, microbatches: int) -> dict[str, float]:
    """Median forward, backward and optimizer-step time (s) of one rank, past the warm-up steps.

    The trace lists compute events in execution order; the first ``warmup_steps`` minibatches'
    events (one forward and one backward per microbatch, one step) are dropped.
    """
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X" and e.get("tid") == 0]
    events.sort(key=lambda e: e["ts"])

    def durations(kind: str, skip: int) -> list[float]:
        if kind == "step":
            picked = [e for e in events if e["name"] == "step"]
        else:
            picked = [e for e in events if e["name"][:1] == kind and e["name"][1:].isdigit()]
        return [e["dur"] / 1e6 for e in picked[skip:]]

    skip = warmup_steps * microbatches
    fwd, bwd, step = durations("F", skip), durations("B", skip), durations("step", warmup_steps)
    return {"forward_s": statistics.median(fwd) if fwd else math.nan,
            "backward_s": statistics.median(bwd) if bwd else math.nan,
            "step_s": statistics.median(step) if step else math.nan}


@dataclass
class RunResult:
    """One training run: per-stage medians and the last stage's samples/s."""

    stages: list[dict[str, float]]  # per stage: forward_s, backward_s, step_s, runtime_compute_s
    samples_per_s: float  # median over the steps after warm-up
    overall_samples_per_s: float  # the same steps' samples over their wall time
    load_before: float
    load_after: float
    runnable: float = math.nan  # threads runnable machine-wide during the run (ours included), mean


def measure(out_dir: Path, num_stages: int, microbatches: int, batch_size: int, warmup: int) -> tuple[list, float, float]:
    per_stage: dict[int, list[dict[str, float]]] = {}
    last_rows: list[dict[str, Any]] = []
    for rank_dir in sorted(out_dir.glob("rank*")):
        rows = read_metrics(rank_dir / "metrics.csv")
        if not rows:
            raise StepFailed(f"{rank_dir}/metrics.csv has no training rows")
        stage = int(rows[0]["stage"])
        timing = traced_compute(rank_dir / "trace.json", warmup, microbatches)
        kept = rows[warmup:] or rows
        timing["runtime_compute_s"] = statistics.median(float(r["compute_s"]) for r in kept) / microbatches
        per_stage.setdefault(stage, []).append(timing)
        if stage == num_stages - 1 and not last_rows:
            last_rows = rows
    if sorted(per_stage) != list(range(num_stages)):
        raise StepFailed(f"{out_dir}: found stages {sorted(per_stage)}, expected 0..{num_stages - 1}")
    stages = [{k: statistics.median(t[k] for t in per_stage[s]) for k in per_stage[s][0]} for s in range(num_stages)]
    kept = last_rows[warmup:] or last_rows
    median_rate = statistics.median(float(r["samples_per_s"]) for r in kept)
    first = float(last_rows[warmup - 1]["time_s"]) if 0 < warmup < len(last_rows) else 0.0
    last = float(kept[-1]["time_s"])
    overall = len(kept) * microbatches * batch_size / (last - first) if last > first else math.nan
    return stages, median_rate, overall


def stages_alone(stage_dir: Path, batch_size: int, threads: int, iterations: int) -> list[dict[str, float]]:
    """Each generated stage's forward and backward run alone, in this process (no pipeline).

    Medians over ``iterations`` of process CPU time and of wall time. CPU time leaves out the
    time the OS gave other processes, which wall-clock traces of a loaded machine include; at
    one thread it is the stage's own compute (with more threads it sums them, so only the wall
    figure compares). Between the profile's per-node sum and the
    pipeline's trace, this isolates what splitting the model into generated stages costs.
    """
    import torch

    from pipeshift.runtime.allocator import keep_freed_memory
    from pipeshift.runtime.package import load_stage_package
    from pipeshift.runtime.stage import Stage

    keep_freed_memory()  # as pipeshift train does
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pkg = load_stage_package(stage_dir)
    bundle = pkg.bundle()
    entries = pkg.entries(bundle.criterion())
    inputs, target = next(bundle.synthetic_data(batch_size, 0))
    env: dict[str, torch.Tensor] = {f"input{i}": t for i, t in enumerate(inputs)}
    env["target"] = target
    raw = set(env)
    stages = []
    for s in range(pkg.num_stages):
        mine = [e for e, owner in zip(entries, pkg.module_to_stage) if owner == s]
        produced = {n for _, _, outs in mine for n in outs}
        reads = sorted({n for _, ins, _ in mine for n in ins} - produced)
        later = {n for e, owner in zip(entries, pkg.module_to_stage) if owner > s for n in e[1]}
        sends = sorted(produced & later) if s < pkg.num_stages - 1 else ["loss"]
        stages.append((Stage(s, mine), reads, sends))
    with torch.no_grad():  # boundary values, computed once
        for stage, _, _ in stages:
            stage.forward(env)

    def leaf(name: str) -> torch.Tensor:
        t = env[name].detach()
        return t.requires_grad_() if name not in raw and t.is_floating_point() else t

    out = []
    for stage, reads, sends in stages:
        grads = [torch.randn_like(env[n]) if n != "loss" else torch.ones_like(env[n]) for n in sends]
        times: dict[str, list[float]] = {"forward_cpu_s": [], "backward_cpu_s": [], "forward_s": [], "backward_s": []}
        for i in range(iterations + 3):
            local = {n: leaf(n) for n in reads}
            w0, c0 = time.perf_counter(), time.process_time()
            stage.forward(local)
            w1, c1 = time.perf_counter(), time.process_time()
            torch.autograd.backward([local[n] for n in sends], grads)
            w2, c2 = time.perf_counter(), time.process_time()
            if i >= 3:
                for key, value in (("forward_cpu_s", c1 - c0), ("backward_cpu_s", c2 - c1),
                                   ("forward_s", w1 - w0), ("backward_s", w2 - w1)):
                    times[key].append(value)
        for p in stage.params.values():
            p.grad = None
        out.append({k: statistics.median(v) for k, v in times.items()})
    return out


# -- the chain ----------------------------------------------------------------------------------


@dataclass
class Config:
    case: Case
    workers: int
    microbatches: int
    steps: int
    warmup: int
    repeats: int
    threads: int


def sim_samples_per_s(stages: list[SimStage], microbatches: int, batch_size: int) -> float:
    result = simulate(stages, SCHEDULE, microbatches, steps=4)
    return batch_size / result.time_per_microbatch_s


def run_config(cfg: Config, work: Path, profiles: dict[tuple[str, int], tuple[Path, Path]], log) -> dict[str, Any]:
    case = cfg.case
    key = (case.name, cfg.threads)
    if key not in profiles:
        prof = work / f"{case.name}-t{cfg.threads}" / "prof"
        tuned = work / f"{case.name}-t{cfg.threads}" / "prof-runtime-allocator"
        for where, allocator in ((prof, False), (tuned, True)):
            log(f"profile {case.name} (batch {case.batch_size}, {cfg.threads} thread(s)"
                + (", with the runtime's malloc tuning)" if allocator else ")"))
            pipeshift(["profile", *case.spec_args(), "-b", str(case.batch_size), "-o", str(where),
                       "--threads", str(cfg.threads), "--iterations", "30", "--quiet"], timeout_s=900,
                      runtime_allocator=allocator)
        profiles[key] = (prof, tuned)
    prof, tuned_prof = profiles[key]
    base = work / f"{case.name}-n{cfg.workers}"
    base.mkdir(parents=True, exist_ok=True)
    topo = base / "topology.json"
    pipeshift(["netcheck", "--local", str(cfg.workers), "-o", str(topo)], timeout_s=180)
    plan_dir, stage_dir = base / "plan", base / "stages"
    pipeshift(["plan", str(prof / "graph.txt"), "--topology", str(topo), "--straight-pipeline",
               "--schedule", SCHEDULE, "--microbatches", str(cfg.microbatches), "-o", str(plan_dir), "-q"], timeout_s=300)
    plan = json.loads((plan_dir / "plan.json").read_text())
    pipeshift(["codegen", str(plan_dir), "-o", str(stage_dir)], timeout_s=300)
    num_stages = len(plan["stages"])
    log(f"time {case.name}'s {num_stages} generated stages alone")
    alone = stages_alone(stage_dir, case.batch_size, cfg.threads, iterations=20)
    runs: list[RunResult] = []
    retried: list[str] = []
    for r in range(cfg.repeats):
        log(f"train {case.name} on {cfg.workers} ranks, repeat {r + 1}/{cfg.repeats}")
        for attempt in range(2):  # one retry: a crash is reported, but need not lose the row
            out = base / f"run{r}" if attempt == 0 else base / f"run{r}-retry"
            before = load_average()
            try:
                with RunnableSampler() as runnable:
                    pipeshift(["launch", "--local", str(cfg.workers), str(stage_dir), "--schedule", SCHEDULE,
                               "--microbatches", str(cfg.microbatches), "--steps", str(cfg.steps),
                               "--threads", str(cfg.threads), "--trace-steps", str(cfg.steps), "--output-dir", str(out),
                               "--no-progress", "--timeout", "120"], timeout_s=600)
            except StepFailed as e:
                if attempt:
                    raise
                retried.append(f"repeat {r + 1}: {e}")
                log(f"training run failed, retrying once: {e}")
                continue
            stages, rate, overall = measure(out, num_stages, cfg.microbatches, case.batch_size, cfg.warmup)
            runs.append(RunResult(stages, rate, overall, before, load_average(), runnable.mean))
            break
    tuned = stage_times(tuned_prof / "graph.txt", plan)
    result = summarize(cfg, plan, alone, tuned, runs)
    result["retried"] = retried
    return result


def stage_times(graph_txt: Path, plan: dict[str, Any]) -> list[tuple[float, float]]:
    """(forward s, backward s) of each plan stage, summed from another profile of the same model.

    The same spec and leaf policy give the same node ids, so the plan's stages can be priced
    with a second profile without planning again (the split stays the one that was run).
    """
    from pipeshift.graph import read_graph_txt

    by_id = read_graph_txt(graph_txt).nodes
    return [(sum(by_id[n].forward_ms for n in st["nodes"]) / 1e3, sum(by_id[n].backward_ms for n in st["nodes"]) / 1e3)
            for st in plan["stages"]]


def summarize(cfg: Config, plan: dict[str, Any], alone: list[dict[str, float]], tuned: list[tuple[float, float]],
              runs: list[RunResult]) -> dict[str, Any]:
    batch, m = cfg.case.batch_size, cfg.microbatches
    predicted_stages = stages_from_plan(parse_plan(plan, "plan.json"))
    stage_rows = []
    for s, st in enumerate(plan["stages"]):
        measured = {k: Spread.of(run.stages[s][k] for run in runs) for k in runs[0].stages[s]}
        fb = Spread.of(run.stages[s]["forward_s"] + run.stages[s]["backward_s"] for run in runs)
        predicted = st["costs"]["forward_s"] + st["costs"]["backward_s"]
        alone_cpu = alone[s]["forward_cpu_s"] + alone[s]["backward_cpu_s"]
        stage_rows.append({
            "stage": s, "nodes": len(st["nodes"]),
            "predicted_s": predicted, "predicted_forward_s": st["costs"]["forward_s"],
            "predicted_backward_s": st["costs"]["backward_s"],
            "tuned_s": sum(tuned[s]), "tuned_forward_s": tuned[s][0], "tuned_backward_s": tuned[s][1],
            "measured_s": fb, "gap": relative_gap(fb.median, predicted), "gap_tuned": relative_gap(fb.median, sum(tuned[s])),
            "alone_cpu_s": alone_cpu, "alone_wall_s": alone[s]["forward_s"] + alone[s]["backward_s"],
            "gap_alone": relative_gap(alone_cpu, predicted), "gap_alone_tuned": relative_gap(alone_cpu, sum(tuned[s])),
            **{f"measured_{k}": v for k, v in measured.items()}})

    def with_times(times: list[tuple[float, float]]) -> list[SimStage]:
        return [dataclasses.replace(p, forward_s=f, backward_s=b) for p, (f, b) in zip(predicted_stages, times)]

    # The simulator again, fed each repeat's measured stage times: what it leaves out shows as
    # the gap between this and the measured samples/s.
    replayed = Spread.of(sim_samples_per_s(with_times([(st["forward_s"], st["backward_s"]) for st in run.stages]), m, batch)
                         for run in runs)
    rate = Spread.of(run.samples_per_s for run in runs)
    simulated = sim_samples_per_s(predicted_stages, m, batch)
    simulated_tuned = sim_samples_per_s(with_times(tuned), m, batch)
    steady = plan["predicted"]["throughput_samples_per_s"]
    return {
        "model": cfg.case.name, "spec": cfg.case.kwargs, "batch_size": batch, "workers": cfg.workers,
        "threads": cfg.threads, "microbatches": m, "steps": cfg.steps, "warmup": cfg.warmup, "repeats": len(runs),
        "stages": stage_rows,
        "throughput": {"planner_steady": steady, "simulated": simulated, "simulated_tuned": simulated_tuned,
                       "measured": rate, "measured_overall": Spread.of(run.overall_samples_per_s for run in runs),
                       "replayed": replayed, "gap": relative_gap(rate.median, simulated),
                       "gap_tuned": relative_gap(rate.median, simulated_tuned),
                       "gap_steady": relative_gap(rate.median, steady),
                       "gap_replayed": relative_gap(rate.median, replayed.median)},
        "load": Spread.of([run.load_before for run in runs] + [run.load_after for run in runs]),
        "runnable": Spread.of(run.runnable for run in runs),
    }


# -- report --------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1000:.2f}" if math.isfinite(x) else "–"


def rate_fmt(x: float) -> str:
    return f"{x:.0f}" if math.isfinite(x) else "–"


def split_ms(total: float, fwd: float, bwd: float) -> str:
    return f"{ms(total)} ({ms(fwd)} + {ms(bwd)})"


def report(results: list[dict[str, Any]], failures: list[str]) -> str:
    out: list[str] = []
    stage_rows, tput_rows = [], []
    for r in results:
        where = f"{r['model']} (b={r['batch_size']})"
        for st in r["stages"]:
            stage_rows.append([
                where, r["workers"], st["stage"], st["nodes"],
                split_ms(st["predicted_s"], st["predicted_forward_s"], st["predicted_backward_s"]),
                st["measured_s"].format(ms), fmt_gap(st["gap"], TARGET),
                split_ms(st["tuned_s"], st["tuned_forward_s"], st["tuned_backward_s"]), fmt_gap(st["gap_tuned"], TARGET),
                f"{ms(st['alone_cpu_s'])} / {ms(st['alone_wall_s'])}",
                f"{fmt_gap(st['gap_alone'])} / {fmt_gap(st['gap_alone_tuned'])}",
                f"{st['measured_forward_s'].format(ms)} + {st['measured_backward_s'].format(ms)}",
                st["measured_step_s"].format(ms), st["measured_runtime_compute_s"].format(ms)])
        t = r["throughput"]
        tput_rows.append([where, r["workers"], r["microbatches"], rate_fmt(t["planner_steady"]), rate_fmt(t["simulated"]),
                          t["measured"].format(rate_fmt), fmt_gap(t["gap"], TARGET), fmt_gap(t["gap_steady"]),
                          rate_fmt(t["simulated_tuned"]), fmt_gap(t["gap_tuned"], TARGET),
                          t["replayed"].format(rate_fmt), fmt_gap(t["gap_replayed"]), t["measured_overall"].format(rate_fmt),
                          r["load"].format(lambda x: f"{x:.1f}"), r["runnable"].format(lambda x: f"{x:.1f}")])
    if results:
        r0 = results[0]
        out.append(f"How far pipeshift's predictions are from what training measures — the gap PipeDream's users "
                   f"reported in its issue #50; our target is under {TARGET:.0%}. Gaps are measured / predicted − 1.\n")
        out.append(f"Schedule `{SCHEDULE}`, straight pipelines, {r0['steps']} minibatches per run of which the first "
                   f"{r0['warmup']} are warm-up, {r0['repeats']} repeat(s) per row; profiled and trained at "
                   f"{', '.join(sorted({str(r['threads']) for r in results}))} thread(s) per rank on "
                   f"{os.cpu_count()} cores. ms are per microbatch; figures are medians over repeats (min–max).\n")
        out.append("## Per-stage compute: predicted against measured, forward + backward per microbatch\n")
        out.append(markdown_table(
            ["model", "workers", "stage", "nodes", "predicted ms (F + B)", "in pipeline ms", "gap",
             "predicted, runtime's allocator ms (F + B)", "gap", "stage alone ms (CPU / wall)",
             "alone CPU vs the two predictions", "in pipeline F + B ms", "optimizer step ms (per minibatch)",
             "metrics.csv compute_s ÷ M ms"],
            stage_rows, right=range(1, 14)))
        out.append("\n*predicted*: plan.json `stages[*].costs` — `pipeshift profile`'s per-node times summed (their "
                   "sum is `predicted.compute_s`). *predicted, runtime's allocator*: the same stages priced by a "
                   "second profile taken with glibc malloc tuned as `pipeshift train` tunes it "
                   "(`pipeshift/runtime/allocator.py`). *in pipeline*: median forward + median backward event of "
                   "the stage's rank in its trace.json (wall clock, during training). *stage alone*: the generated "
                   "stage run alone in the benchmark process with the runtime's allocator, median process CPU "
                   "time / wall time. *metrics.csv compute_s ÷ M*: the runtime's compute counter, which also holds "
                   "data loading, the loss and the optimizer step (neither is predicted).")
        out.append("\n## Throughput: predicted against measured samples/s\n")
        out.append(markdown_table(
            ["model", "workers", "M", "planner (steady state)", f"simulated ({SCHEDULE})", "measured (median step)",
             "gap vs simulated", "gap vs planner", "simulated, runtime's allocator profile", "gap",
             "simulated with measured stage times", "gap", "measured (whole run)", "load avg",
             "runnable threads during runs"],
            tput_rows, right=range(1, 15)))
        out.append("\n*planner*: plan.json `predicted.throughput_samples_per_s` (steady state: no bubble). "
                   f"*simulated*: the simulator (`pipeshift simulate`'s code) on the plan, `{SCHEDULE}` with the same M. "
                   "*measured*: the last stage's metrics.csv `samples_per_s`, median over the steps after warm-up "
                   "(*whole run*: those steps' samples over their wall time). *simulated with measured stage times*: "
                   "the simulator fed each repeat's in-pipeline forward/backward medians instead of the profile's. "
                   "*runnable threads*: machine-wide, sampled every 50 ms while the ranks ran (ours included); above "
                   "the core count, every rank waited for a core.\n")
        out.append(verdict(results))
    for r in results:
        for note in r.get("retried", []):
            out.append(f"\n**A training run failed and was retried** ({r['model']} on {r['workers']} ranks, {note})")
    for f in failures:
        out.append(f"\n**failed:** {f}")
    return "\n".join(out)


def median_over(stages: list[dict[str, Any]], fn) -> float:
    return statistics.median(fn(st) for st in stages)


def verdict(results: list[dict[str, Any]]) -> str:
    """Say in words how many rows are within the target, and what each gap is made of."""
    def gaps(key: str, where: str = "stages") -> list[float]:
        if where == "stages":
            return [st[key] for r in results for st in r["stages"] if math.isfinite(st[key])]
        return [r["throughput"][key] for r in results if math.isfinite(r["throughput"][key])]

    def within(values: list[float]) -> str:
        return f"{sum(abs(g) <= TARGET for g in values)} of {len(values)}"

    lines = [f"**Within ±{TARGET:.0%}:** stage compute in the pipeline {within(gaps('gap'))} "
             f"({within(gaps('gap_tuned'))} against the allocator-matched profile); stage compute alone "
             f"{within(gaps('gap_alone'))} ({within(gaps('gap_alone_tuned'))}); throughput against the simulator "
             f"{within(gaps('gap', 'throughput'))} ({within(gaps('gap_tuned', 'throughput'))}).", ""]
    for r in results:
        t = r["throughput"]
        med = functools.partial(median_over, r["stages"])
        slowdown = med(lambda st: relative_gap(st["measured_s"].median, st["alone_cpu_s"]))
        stolen = med(lambda st: relative_gap(st["alone_wall_s"], st["alone_cpu_s"]))
        allocator = med(lambda st: relative_gap(st["tuned_s"], st["predicted_s"]))
        step = med(lambda st: st["measured_step_s"].median)
        rate = t["measured"].median
        minibatch = r["microbatches"] * r["batch_size"] / rate if rate and math.isfinite(rate) else math.nan
        busy = r["runnable"].median
        note = (f"- **{r['model']} on {r['workers']} ranks** (load average {r['load'].format(lambda x: f'{x:.1f}')}; "
                f"{busy:.1f} threads runnable during training on {os.cpu_count()} cores, so a rank had about "
                f"{min(1.0, (os.cpu_count() or 1) / busy) if busy > 0 else 1.0:.0%} of a core), "
                f"medians over stages: run alone, the stages took {fmt_gap(med(lambda st: st['gap_alone']))} against "
                f"the profile's prediction; profiling with the runtime's malloc tuning changes the prediction by "
                f"{fmt_gap(allocator)}, leaving {fmt_gap(med(lambda st: st['gap_alone_tuned']))} (the additive "
                f"per-node model). In the pipeline the stages took {fmt_gap(slowdown)} longer "
                f"than alone: ranks sharing cores with each other and with other work, which wall-clock traces count "
                f"(even alone, the stages' wall time was {fmt_gap(stolen)} over their CPU time). Throughput is "
                f"{fmt_gap(t['gap'])} off the simulator ({fmt_gap(t['gap_tuned'])} with the allocator-matched profile); "
                f"fed the measured stage times, the simulator is {fmt_gap(t['gap_replayed'])} off — what it does not "
                f"model: the optimizer step ({step * 1000:.1f} ms per stage in a {minibatch * 1000:.0f} ms minibatch), "
                f"data loading, per-message costs. In the least disturbed repeat: stages "
                f"{fmt_gap(med(lambda st: relative_gap(st['measured_s'].low, st['tuned_s'])))}, throughput "
                f"{fmt_gap(relative_gap(t['measured'].high, t['simulated_tuned']))} against the allocator-matched "
                f"prediction.")
        if r["workers"] > (os.cpu_count() or 1):
            note += (f" {r['workers']} ranks on {os.cpu_count()} cores: the planner assumes a core of its own per "
                     "worker, so this row shows oversubscription, not the planner.")
        lines.append(note)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one model, 2 workers, 2 short repeats")
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=None)
    p.add_argument("--workers", nargs="+", type=int, default=None, help="ranks per run (default 2 and 3; --quick: 2)")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="minibatches per run (default 30; --quick: 16)")
    p.add_argument("--warmup", type=int, default=None, help="minibatches ignored at the start of a run (default 5)")
    p.add_argument("--repeats", type=int, default=None, help="training runs per configuration (default 3; --quick: 2)")
    p.add_argument("--keep", metavar="DIR", help="keep profiles, plans, stages and run outputs here")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    args = p.parse_args(argv)
    models = args.models or (["mlp"] if args.quick else ["mlp", "resnet18", "gpt"])
    workers = args.workers or ([2] if args.quick else [2, 3])
    steps = args.steps or (16 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (4 if args.quick else 5)
    repeats = args.repeats or (2 if args.quick else 3)
    if steps <= warmup or args.microbatches < 1 or repeats < 1 or any(n < 1 for n in workers):
        p.error("need --steps > --warmup, and positive --microbatches, --repeats and --workers")

    def log(msg: str) -> None:
        print(f"[bench_prediction {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    results, failures = [], []
    profiles: dict[tuple[str, int], tuple[Path, Path]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_prediction_") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in models:
            for n in workers:
                if n > 2 and name != "mlp" and args.models is None:
                    continue  # 3 ranks on 2 cores is oversubscribed: one model shows what that does
                cfg = Config(CASES[name], n, args.microbatches, steps, warmup, repeats, threads_per_rank(n))
                try:
                    results.append(run_config(cfg, work, profiles, log))
                except StepFailed as e:
                    failures.append(f"{name} on {n} ranks: {e}")
                    log(f"FAILED {name} on {n} ranks: {e}")
    print(report(results, failures))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=lambda o: dataclasses.asdict(o)))
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
