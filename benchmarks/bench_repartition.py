"""Repartitioning while training: `python -m benchmarks.bench_repartition [--quick]`.

Two measurements, printed as markdown tables (medians with min–max over repeats; nothing is
asserted — it reports):

1. **A worker slowed mid-run.** The zoo MLP, profiled (`pipeshift profile`) and planned for two
   workers (`pipeshift plan --straight-pipeline`), trains with `flush` on two ranks (one thread
   each). From step ``--slow-at`` on, rank 1 computes ``--factor`` times slower (the runtime's
   injected slowdown: it sleeps (F−1)× each forward/backward's measured time). Samples/s:

   * *before* the slowdown (the planned split, nothing slowed);
   * *static*: slowed, never repartitioning — what PipeDream would do;
   * *auto*: slowed, with the in-process policy (`--policy auto`), measured after its last switch;
   * *oracle*: a fresh static plan for the slowed speeds, slowed from the start. The plan is the
     policy's exact DP on the profiled times with speed factors (1, F); the table also shows
     the best measured of it and its two neighbouring cuts, in case the profile misleads.

2. **Pause against bytes moved.** Wide MLPs (``width`` 1024/2048/4096, eight linear layers) on
   two ranks switch back and forth after steps 2, 3 and 4 between a cut after the first layer
   and a cut after the seventh (`--repartition-at`), so six ``width × width`` layers change
   owner each time — about 100M parameters at width 4096 — with their SGD momentum buffers (or
   Adam moments). The pause is the longest rank's time from all ranks being at the switch to
   training again: the point-to-point transfer and the rebuild (the stages were regenerated
   through codegen a step ahead; render time shown apart), from ``repartitions.jsonl``. The
   last row repeats the 100M case without the landing buffers reserved a step ahead
   (``PIPESHIFT_RESERVE=0``), i.e. with the page faults of fresh memory inside the pause (the
   last column counts them: the largest rank's, summed over the row's switches).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeshift.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]

PY = sys.executable


def sh(cmd: list[str], cwd: Path, limit: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=limit)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    return proc.stdout


def train(work: Path, package: Path, out: str, world: int, args: list[str], limit: float = 900,
          extra_env: dict[str, str] | None = None) -> Path:
    """One run: ``world`` explicit ranks of ``pipeshift train`` on this machine."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(extra_env or {}))
    procs = [subprocess.Popen([PY, "-m", "pipeshift", "train", str(package), "--rank", str(r), "--world-size",
                               str(world), "--dist-addr", f"127.0.0.1:{port}", "--threads", "1", "--no-progress",
                               "--timeout", "120", "--trace-steps", "0", "--output-dir", out, *args],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + limit
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"run {out} timed out") from None
    for r, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise SystemExit(f"run {out}: rank {r} exited {p.returncode}\n{text[-3000:]}")
    return work / out


def step_times(run: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run / "rank0" / "metrics.csv"))
    return {int(r["step"]): float(r["time_s"]) for r in rows if r["split"] == "train"}


def rate(times: dict[int, float], first: int, last: int, samples_per_step: int) -> float:
    """Samples/s over steps first+1 … last (from the end of step ``first`` to the end of ``last``)."""
    return (last - first) * samples_per_step / (times[last] - times[first])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def summary(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else fmt.format(med)


# -- 1. a slowed worker ---------------------------------------------------------------------------


def slowed_worker(args, work: Path) -> str:
    import numpy as np

    from pipeshift.graph.graphtxt import read_graph_txt
    from pipeshift.plan import read_plan
    from pipeshift.runtime.policy import ReplanRequest, builtin_replan, chain_from_graph, replace_stages

    m, b = args.microbatches, args.batch
    model = ["pipeshift.models:mlp", "--model-arg", "in_features=256", "--model-arg", f"width={args.width}",
             "--model-arg", f"depth={args.depth}", "--model-arg", "num_classes=10"]
    sh([PY, "-m", "pipeshift", "profile", *model, "-b", str(b), "-o", "prof"], work, 900)
    sh([PY, "-m", "pipeshift", "plan", "prof/graph.txt", "-n", "2", "--straight-pipeline", "-o", "plan"], work, 300)
    sh([PY, "-m", "pipeshift", "codegen", "plan", "-o", "stages"], work, 300)
    base = read_plan(work / "plan")
    chain = chain_from_graph(read_graph_txt(work / "prof" / "graph.txt"), optimizer="momentum")
    request = ReplanRequest(node_ids=list(chain.node_ids),
                            node_times_s=np.outer([1.0, args.factor], chain.node_times_s),
                            speed_factors=np.array([1.0, args.factor]), cut_comm_s=np.zeros(len(chain) + 1),
                            current_stages=[], glued=chain.glued)
    oracle_stages = builtin_replan(request)
    cut = len(oracle_stages[0])
    candidates = {}
    order = list(chain.node_ids)
    for delta in (0, -1, 1):
        c = cut + delta
        if 2 <= c <= len(order) - 1:
            plan = replace_stages(base, [order[:c], order[c:]], node_fqns=chain.node_fqns)
            path = work / f"oracle{delta:+d}.json"
            path.write_text(json.dumps(plan.to_json()))
            sh([PY, "-m", "pipeshift", "codegen", str(path), "-o", f"oracle{delta:+d}"], work, 300)
            candidates[delta] = work / f"oracle{delta:+d}"
    common = ["--steps", str(args.steps), "--microbatches", str(m), "--batch-size", str(b), "--optimizer", "sgd",
              "--momentum", "0.9", "--lr", "0.01"]
    slow = ["--slowdown", f"1:{args.factor}@{args.slow_at}"]
    per_step = m * b
    rows: dict[str, list[float]] = {k: [] for k in ("before", "static", "auto", "oracle", "oracle_best")}
    switch_steps: list[list[int]] = []
    chosen: list[str] = []
    pauses: list[float] = []
    settle = 3  # steps skipped after a change before measuring
    n = args.steps
    for rep in range(args.repeats):
        static = step_times(train(work, work / "stages", f"static{rep}", 2, [*common, *slow]))
        rows["before"].append(rate(static, settle, args.slow_at, per_step))
        rows["static"].append(rate(static, args.slow_at + settle, n, per_step))
        auto_dir = train(work, work / "stages", f"auto{rep}", 2, [*common, *slow, "--policy", "auto", "--graph",
                                                                    str(work / "prof" / "graph.txt"),
                                                                    "--report-every", str(args.report_every)])
        auto = step_times(auto_dir)
        switches = [r for r in jsonl(auto_dir / "repartitions.jsonl") if r["event"] == "repartition"]
        switch_steps.append([r["step"] for r in switches])
        chosen += ["/".join(str(len(st)) for st in r["stages"]) for r in switches[-1:]]
        pauses += [r["pause_s"] for r in switches]
        last = max([r["step"] for r in switches], default=None)
        if last is not None and last + settle < n:
            rows["auto"].append(rate(auto, last + settle, n, per_step))
        best = 0.0
        for delta, pkg in candidates.items():
            times = step_times(train(work, pkg, f"oracle{delta:+d}_{rep}", 2, [*common, "--slowdown",
                                                                               f"1:{args.factor}@0"]))
            value = rate(times, settle, n, per_step)
            if delta == 0:
                rows["oracle"].append(value)
            best = max(best, value)
        rows["oracle_best"].append(best)
    oracle = statistics.median(rows["oracle"])
    best = statistics.median(rows["oracle_best"])

    def share(key: str) -> str:
        if not rows[key]:
            return "–"
        return f"{100 * statistics.median(rows[key]) / oracle:.0f}% / {100 * statistics.median(rows[key]) / best:.0f}%"

    sizes = [len(st["nodes"]) for st in base["stages"]]
    lines = [
        f"### A worker slowed {args.factor:g}× at step {args.slow_at} (MLP width {args.width}, depth {args.depth}; "
        f"M={m} × {b} samples; {args.steps} steps; {args.repeats} repeat(s))",
        "",
        f"Graph nodes per stage: planned {sizes[0]}/{sizes[1]}; oracle for speeds (1, {args.factor:g}) "
        f"{cut}/{len(order) - cut}; chosen by the policy {chosen}. Automatic switches after steps "
        f"{switch_steps} (pauses {summary(pauses, '{:.3f}')} s). Load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores.",
        "",
        "| run | samples/s, median (min–max) | vs oracle / vs best measured oracle cut |",
        "|---|---:|---:|",
        f"| before the slowdown (planned split) | {summary(rows['before'])} | |",
        f"| slowed, static split (PipeDream: never repartitions) | {summary(rows['static'])} | {share('static')} |",
        f"| slowed, after automatic repartitioning | {summary(rows['auto'])} | {share('auto')} |",
        f"| oracle: static plan for the slowed speeds | {summary(rows['oracle'])} | 100% / "
        f"{100 * oracle / best:.0f}% |",
        f"| best measured of the oracle cut and its two neighbours | {summary(rows['oracle_best'])} | |",
    ]
    return "\n".join(lines)


# -- 2. pause against bytes moved ------------------------------------------------------------------


def pause_runs(args, work: Path) -> str:
    from pipeshift.codegen import generate_package
    from pipeshift.graph.capture import capture
    from pipeshift.spec import ModelSpec

    widths = [1024, 2048] if args.quick else [1024, 2048, 4096]
    sgd = ("sgd", ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.001"], {})
    optimizers = [sgd]
    if not args.quick:
        optimizers.append(("adam", ["--optimizer", "adam", "--lr", "0.0001"], {}))
    lines = ["### Pause against bytes moved (two ranks; six width×width layers change owner per switch)", "",
             "| model | optimizer | parameters moved | bytes moved | messages | pause s, median (min–max) | "
             "transfer s | render s (ahead) | rebuild s | effective GB/s | page faults in pauses |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for width in widths:
        spec = ModelSpec("pipeshift.models:mlp", {"in_features": 64, "width": width, "depth": 8, "num_classes": 10},
                         seed=0)
        bundle = spec.build()
        captured = capture(bundle.model, bundle.example_inputs(4))
        nodes = [g.node_id for g in captured.groups]
        linears = [g.node_id for g in captured.groups if g.desc.startswith("Linear")]
        moved_params = sum(p.numel() for i in range(1, 7) for p in bundle.model.layers[2 * i].parameters())
        del bundle, captured
        first = nodes.index(linears[0]) + 2  # input, linear 0, its ReLU
        last = nodes.index(linears[6]) + 2  # ... up to linear 6 and its ReLU
        plans = {}
        for name, cut in (("A", first), ("B", last)):
            plans[name] = {"version": 1, "model": spec.to_json(), "leaf_policy": None, "batch_size": 4,
                           "stages": [{"stage_id": 0, "nodes": nodes[:cut], "ranks": [0]},
                                      {"stage_id": 1, "nodes": nodes[cut:], "ranks": [1]}]}
            (work / f"w{width}{name}.json").write_text(json.dumps(plans[name]))
        pkg = generate_package(plans["A"], work / f"w{width}")
        runs = list(optimizers)
        if width == max(widths):
            runs.append(("sgd, nothing reserved", sgd[1], {"PIPESHIFT_RESERVE": "0"}))
        for index, (opt_name, opt_flags, extra_env) in enumerate(runs):
            samples: list[dict] = []
            for rep in range(args.pause_repeats):
                run = train(work, pkg, f"pause{width}_{index}_{rep}", 2, [
                    "--steps", "5", "--microbatches", "2", "--batch-size", "4", *opt_flags,
                    "--repartition-at", f"2:w{width}B.json", "--repartition-at", f"3:w{width}A.json",
                    "--repartition-at", f"4:w{width}B.json"], limit=1800, extra_env=extra_env)
                samples += [r for r in jsonl(run / "repartitions.jsonl") if r["event"] == "repartition"]
                shutil.rmtree(run, ignore_errors=True)
            pause = [r["pause_s"] for r in samples]
            moved = statistics.median(r["bytes_moved"] for r in samples)

            def part(key: str, samples: list[dict] = samples) -> str:
                return f"{statistics.median(max(x[key] for x in r['per_rank']) for r in samples):.3f}"

            transfer = statistics.median(max(x["transfer_s"] for x in r["per_rank"]) for r in samples)
            lines.append(f"| MLP width {width} | {opt_name} | {moved_params / 1e6:.1f}M | {moved / 1e6:.0f} MB | "
                         f"{statistics.median(r['messages'] for r in samples):.0f} | {summary(pause, '{:.3f}')} | "
                         f"{transfer:.3f} | {part('render_s')} | {part('rebuild_s')} | {moved / 1e9 / transfer:.2f} | "
                         f"{sum(max(x.get('page_faults', 0) for x in r['per_rank']) for r in samples)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repeat, fewer steps, no 100M model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pause-repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--slow-at", type=int, default=20)
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--report-every", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--only", choices=["slowed", "pause"], default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.pause_repeats, args.steps = 1, 1, min(args.steps, 60)
    work = Path(tempfile.mkdtemp(prefix="bench_repartition_"))
    print(f"work directory {work}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
    try:
        parts = []
        if args.only in (None, "slowed"):
            parts.append(slowed_worker(args, work))
        if args.only in (None, "pause"):
            parts.append(pause_runs(args, work))
        print("\n\n".join(parts))
        print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
