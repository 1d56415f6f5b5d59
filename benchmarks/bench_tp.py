"""Tensor parallelism on this machine: `python -m benchmarks.bench_tp [--quick]`.

Two measurements (gloo on CPU, one thread per rank; nothing is asserted, it reports):

1. **All-reduce overhead per layer.** One GPT block (zoo ``pipeshift.models:gpt``: LayerNorm,
   fused-QKV attention, GELU MLP) forward + backward alone, at TP 1 (one process) and at TP 2
   (two processes, the MLP sharded column- then row-wise by the generic rule, as ``pipeshift
   profile`` records it), and the pair's two all-reduces of the block's activation timed alone
   (``dist.all_reduce``, the collective DTensor issues).
2. **Planner's prediction against the measured time** for one stage at TP 1 on one rank and at
   TP 2 on two ranks: ``pipeshift profile`` → ``plan`` (``--tp 2 --tp-bandwidth/--tp-latency``
   from the all-reduce fit of 1.) → ``codegen`` → ``pipeshift train`` (flush), per-microbatch
   time from metrics.csv (median over the steps after the first) against plan.json's
   ``predicted.time_per_minibatch_s`` (the DP objective is per microbatch of the profiled size).

Medians with min–max over repeats; the load average is printed because other jobs share the cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PY = sys.executable


def _spec_args(width: int, depth: int, seq: int) -> list[str]:
    return ["--model-arg", f"width={width}", "--model-arg", f"depth={depth}", "--model-arg", "heads=4",
            "--model-arg", "vocab_size=256", "--model-arg", f"block_size={seq}"]


# -- 1. one block, TP 1 vs TP 2, and the all-reduces alone ------------------------------------
def _block_worker(rank: int, world: int, port: int, width: int, seq: int, batch: int, reps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    from pipeshift.models.gpt import Block
    from pipeshift.runtime.tp import TensorParallel

    torch.manual_seed(0)
    block = Block(width, 4, 0.0)
    if world > 1:
        tp = TensorParallel(list(range(world)), rank, dist.new_group(list(range(world))), torch.device("cpu"))
        tp.shard([block], {"mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}, "bench")
    x = torch.randn(batch, seq, width, requires_grad=True)
    g = torch.randn(batch, seq, width)

    def step() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        block(x).backward(g)
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    times = [step() for _ in range(reps)]
    result = {"block_ms": 1000 * statistics.median(times)}
    if world > 1:
        act = torch.randn(batch, seq, width)
        ar = []
        for i in range(reps + 3):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(act)
            dist.all_reduce(act)
            if i >= 3:
                ar.append(time.perf_counter() - t0)
        result["allreduce_pair_ms"] = 1000 * statistics.median(ar)
        sizes = {}
        for nbytes in (4096, 1 << 20):
            buf = torch.zeros(nbytes // 4)
            ts = []
            for i in range(reps + 3):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                if i >= 3:
                    ts.append(time.perf_counter() - t0)
            sizes[nbytes] = statistics.median(ts)
        # ring all-reduce over 2: time = bytes / bw + 2 * latency (cost.py's formula at t = 2)
        small, big = sizes[4096], sizes[1 << 20]
        bw = ((1 << 20) - 4096) / max(big - small, 1e-9)
        result["fit_bandwidth"] = bw
        result["fit_latency"] = max(small - 4096 / bw, 0.0) / 2
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def block_overhead(width: int, seq: int, batch: int, reps: int, repeats: int) -> dict:
    from pipeshift.runtime.distributed import free_port

    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            for world in (1, 2):
                out = os.path.join(d, f"w{world}.json")
                mp.spawn(_block_worker, args=(world, free_port(), width, seq, batch, reps, out), nprocs=world)
                for k, v in json.loads(Path(out).read_text()).items():
                    rows.setdefault(f"{k}@tp{world}", []).append(v)
    return rows


# -- 2. predicted vs measured through the commands ----------------------------------------------
def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def _measured_microbatch_s(run_dir: Path, microbatches: int) -> float:
    with open(run_dir / "rank0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == "train"]
    times = [float(r["time_s"]) for r in rows]
    steps = [b - a for a, b in zip(times, times[1:])]  # the first step (warm-up, shape handshakes) left out
    return statistics.median(steps) / microbatches


def predicted_vs_measured(work: Path, width: int, depth: int, seq: int, batch: int, steps: int, bw: float,
                          lat: float, microbatches: int = 4) -> dict:
    cli = [PY, "-m", "pipeshift"]
    _run([*cli, "profile", "pipeshift.models:gpt", *_spec_args(width, depth, seq), "-b", str(batch), "-o", "prof",
          "--quiet", "--threads", "1", "--iterations", "10"], work)
    out = {}
    for tp in (1, 2):
        plan = f"plan{tp}"
        extra = ["--tp", "2", "--tp-bandwidth", f"{bw:g}", "--tp-latency", f"{lat:g}"] if tp == 2 else []
        _run([*cli, "plan", "prof/graph.txt", "-n", str(tp), "-b", f"{bw:g}", "--schedule", "flush",
              "--microbatches", str(microbatches), "--optimizer-states", "0", *extra, "-o", plan, "-q"], work)
        doc = json.loads((work / plan / "plan.json").read_text())
        _run([*cli, "codegen", plan, "-o", f"stages{tp}"], work)
        _run([*cli, "launch", "--local", str(tp), f"stages{tp}", "--schedule", "flush", "--microbatches",
              str(microbatches), "--steps", str(steps), "--threads", "1", "--no-progress", "--output-dir", f"run{tp}",
              "--lr", "0.001"], work)
        st = doc["stages"][0]
        out[tp] = {"predicted_s": doc["predicted"]["time_per_minibatch_s"],
                   "measured_s": _measured_microbatch_s(work / f"run{tp}", microbatches),
                   "tp_allreduce_predicted_s": st["costs"].get("tp_allreduce_s", 0.0),
                   "replicas_x_tp": f"{st['replicas']} x {st.get('tp', 1)}"}
    return out


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, few steps")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    repeats, steps, reps = (1, 6, 5) if args.quick else (args.repeats, args.steps, 15)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    rows = block_overhead(args.width, args.seq, args.batch, reps, repeats)
    act = args.batch * args.seq * args.width * 4
    print(f"\n## One GPT block (width {args.width}, seq {args.seq}, batch {args.batch}; activation {act / 1e6:.2f} MB)\n")
    print("| | ms, median (min–max) over repeats |\n|---|---:|")
    print(f"| forward + backward, TP 1 (one process) | {_fmt(rows['block_ms@tp1'])} |")
    print(f"| forward + backward, TP 2 (per rank, MLP sharded) | {_fmt(rows['block_ms@tp2'])} |")
    print(f"| the pair's 2 all-reduces of the activation, alone | {_fmt(rows['allreduce_pair_ms@tp2'])} |")
    bw = statistics.median(rows["fit_bandwidth@tp2"])
    lat = statistics.median(rows["fit_latency@tp2"])
    print(f"\nall-reduce fit over 2 ranks: {bw / 1e9:.2f} GB/s, {lat * 1e6:.0f} us per message")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            work = Path(d) / f"r{i}"
            work.mkdir()
            results.append(predicted_vs_measured(work, args.width, args.depth, args.seq, args.batch, steps, bw, lat))
    print(f"\n## One stage, TP 1 on 1 rank vs TP 2 on 2 ranks (GPT width {args.width}, depth {args.depth}; flush, "
          "M = 4)\n")
    print("| stage | predicted ms / microbatch | measured ms / microbatch, median (min–max) | "
          "predicted TP all-reduce ms |\n|---|---:|---:|---:|")
    for tp in (1, 2):
        pred = [r[tp]["predicted_s"] for r in results]
        meas = [r[tp]["measured_s"] for r in results]
        ar = [r[tp]["tp_allreduce_predicted_s"] for r in results]
        print(f"| {results[0][tp]['replicas_x_tp']} | {_fmt(pred, 1000)} | {_fmt(meas, 1000)} | {_fmt(ar, 1000)} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
