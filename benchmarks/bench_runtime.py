"""Runtime throughput: `python -m benchmarks.bench_runtime [--quick]`.

Two pipeline stages on two ranks (gloo, one thread each — this machine has two cores), each an
MLP block sized so that its forward + backward takes ``--stage-ms`` per microbatch. On the
*same* stage modules, microbatches, data and SGD optimizer it measures samples/s of

* pipeshift ``flush`` and ``1f1b`` (the in-process :class:`~pipeshift.runtime.pipeline.Pipeline`),
* ``torch.distributed.pipelining``'s ``ScheduleGPipe`` and ``Schedule1F1B``,
* single-process training (the two stages as one model, gradient accumulation over the same
  microbatches) at 1 and 2 threads,

and the *ideal* pipeline throughput ``batch / slowest stage`` from each stage's forward +
backward time measured alone at one thread — and, since two ranks computing at once slow each
other down on shared caches and memory, a second ideal row: both ranks running only their
stage's forward + backward at the same time, with no communication. Every contender runs with the malloc tuning that
``pipeshift train`` applies (:mod:`pipeshift.runtime.allocator`) unless ``--no-malloc-tuning``. Each repeat starts the two ranks once and runs every
pipelined configuration in turn (the order rotates between repeats); results are medians with
min–max over repeats, and ratios of medians. Nothing here is asserted: it reports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


from pipeshift.runtime.allocator import keep_freed_memory
from pipeshift.runtime.distributed import free_port
from pipeshift.runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]

PIPELINED = ("pipeshift flush", "pipeshift 1f1b", "pipelining GPipe", "pipelining 1F1B")


def make_stage(width: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def make_stages(cfg: dict) -> list[nn.Module]:
    return [make_stage(cfg["width"], n, seed=10 + s) for s, n in enumerate(cfg["layers"])]


def make_data(cfg: dict, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(cfg["batch"], cfg["width"], generator=g), torch.randn(cfg["batch"], cfg["width"], generator=g))
            for _ in range(count)]


def fwd_bwd_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Fastest forward + backward time of ``module`` on ``x`` (input requiring grad, as in a pipeline).

    The minimum, not the median: on a shared machine it is the best estimate of the stage's own
    cost, which makes the ideal throughput derived from it an upper bound, not a noisy one.
    """
    times = []
    for _ in range(repeats + 2):
        inp = x.clone().requires_grad_()
        t0 = time.perf_counter()
        module(inp).square().mean().backward()
        times.append(time.perf_counter() - t0)
    module.zero_grad(set_to_none=True)
    return min(times[2:]) * 1e3


def calibrate(args: argparse.Namespace) -> dict:
    """Pick the width and layers per stage so one stage's forward + backward is ~``--stage-ms``."""
    torch.set_num_threads(1)
    width, batch = args.width, args.batch_size
    x = torch.randn(batch, width)
    per_layer = fwd_bwd_ms(make_stage(width, 4, 0), x, 10) / 4
    layers = max(1, round(args.stage_ms / per_layer))
    cfg = {"width": width, "batch": batch, "layers": [layers, layers], "microbatches": args.microbatches,
           "steps": args.steps, "warmup": args.warmup}
    cfg["stage_ms"] = [fwd_bwd_ms(m, x, 30) for m in make_stages(cfg)]
    return cfg


# -- the pipelined runs (inside each of the two ranks) -----------------------------------------------


def _ours(rank: int, cfg: dict, schedule: str, data) -> float:
    s0, s1 = make_stages(cfg)
    entries = [(s0, ["input0"], ["h"]), (s1, ["h"], ["out"]), (nn.MSELoss(), ["out", "target"], ["loss"])]
    pipe = Pipeline(rank, entries, [0, 1, 1], [[0], [1]], schedule=schedule, microbatches=cfg["microbatches"],
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-4), timeout_s=120)
    m = cfg["microbatches"]

    def fetch(base: int):
        return lambda mb: data[(base + mb) % len(data)]

    def run(steps: int, first: int) -> None:
        if schedule == "1f1b":  # asynchronous: one continuous segment
            pipe.run(pipe.actions(steps), fetch(first * m))
        else:
            for k in range(steps):
                pipe.run(pipe.actions(1), fetch((first + k) * m))

    return _timed(run, cfg)


def _timed(run, cfg: dict) -> tuple[float, float]:
    """Wall seconds of the timed minibatches (all ranks), and this rank's CPU seconds in them."""
    run(cfg["warmup"], 0)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    run(cfg["steps"], cfg["warmup"])
    cpu = time.process_time() - c0
    dist.barrier()
    return time.perf_counter() - t0, cpu


def _pipelining(rank: int, cfg: dict, kind: str, data) -> float:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    module = make_stages(cfg)[rank]
    m = cfg["microbatches"]
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    sched = (ScheduleGPipe if kind == "GPipe" else Schedule1F1B)(stage, m, loss_fn=nn.MSELoss())
    opt = torch.optim.SGD(module.parameters(), lr=1e-4)
    minibatches = []
    for k in range(len(data) // m):
        chunk = data[k * m:(k + 1) * m]
        minibatches.append((torch.cat([x for x, _ in chunk]), torch.cat([y for _, y in chunk])))

    def run(steps: int, first: int) -> None:
        for k in range(steps):
            x, y = minibatches[(first + k) % len(minibatches)]
            if rank == 0:
                sched.step(x)
            else:
                sched.step(target=y, losses=[])
            opt.step()
            opt.zero_grad(set_to_none=True)

    return _timed(run, cfg)


def _alone(rank: int, cfg: dict, data) -> float:
    """ms per microbatch of this rank's stage computing forward + backward with no communication,
    while the other rank does the same: the ideal pipeline on cores that are busy together."""
    module = make_stages(cfg)[rank]
    x = data[0][0][0]
    n = cfg["steps"] * cfg["microbatches"]

    def run(count: int, first: int) -> None:  # count minibatches
        for _ in range(count * cfg["microbatches"]):
            inp = x.clone().requires_grad_(rank > 0)
            module(inp).square().mean().backward()

    elapsed, _cpu = _timed(run, cfg)
    return elapsed / n * 1e3


def _rank_main(rank: int, port: int, cfg: dict, order: list[str], out: str) -> None:
    if cfg["malloc_tuning"]:
        keep_freed_memory()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    data = [((x,), y) for x, y in make_data(cfg, 4 * cfg["microbatches"])]
    results = {"alone_ms": _alone(rank, cfg, data)}
    for name in order:
        if name.startswith("pipeshift"):
            elapsed, cpu = _ours(rank, cfg, name.split()[1], data)
        else:
            flat = [(x[0], y) for x, y in data]
            elapsed, cpu = _pipelining(rank, cfg, name.split()[1], flat)
        mbs = cfg["steps"] * cfg["microbatches"]
        results[name] = {"samples_per_s": mbs * cfg["batch"] / elapsed, "cpu_ms_per_microbatch": cpu / mbs * 1e3}
    Path(f"{out}.{rank}").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def pipelined_repeat(cfg: dict, order: list[str]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """samples/s per configuration, and each rank's CPU ms per microbatch."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_runtime_{os.getpid()}.json"
    mp.spawn(_rank_main, args=(free_port(), cfg, order, str(out)), nprocs=2, join=True)
    ranks = []
    for r in range(2):
        path = Path(f"{out}.{r}")
        ranks.append(json.loads(path.read_text()))
        path.unlink()
    rates = {name: ranks[0][name]["samples_per_s"] for name in order}
    rates["ideal, stages computing at once"] = cfg["batch"] / (max(r["alone_ms"] for r in ranks) / 1e3)
    cpu = {name: [ranks[r][name]["cpu_ms_per_microbatch"] for r in range(2)] for name in order}
    return rates, cpu


# -- single process --------------------------------------------------------------------------------


def single_process(cfg: dict, threads: int) -> float:
    torch.set_num_threads(threads)
    model = nn.Sequential(*make_stages(cfg))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    crit = nn.MSELoss()
    data = make_data(cfg, 4 * cfg["microbatches"])
    m = cfg["microbatches"]

    def run(steps: int, first: int) -> None:
        for k in range(steps):
            for i in range(m):
                x, y = data[((first + k) * m + i) % len(data)]
                (crit(model(x), y) / m).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    run(cfg["warmup"], 0)
    t0 = time.perf_counter()
    run(cfg["steps"], cfg["warmup"])
    return cfg["steps"] * m * cfg["batch"] / (time.perf_counter() - t0)


# -- report ------------------------------------------------------------------------------------------


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in samples.items()}


def paired(samples: dict[str, list[float]], name: str, ref: str) -> list[float]:
    """Per-repeat ratios: configurations of one repeat ran back to back, under the same load."""
    return [a / b for a, b in zip(samples[name], samples[ref])]


def report(cfg: dict, stats: dict[str, dict[str, float]], ideal: float, samples: dict[str, list[float]]) -> str:
    ref = stats["pipelining 1F1B"]["median"]
    lines = [
        f"2 stages x {cfg['layers'][0]} Linear({cfg['width']},{cfg['width']})+ReLU, microbatch {cfg['batch']}, "
        f"{cfg['microbatches']} microbatches/minibatch, {cfg['steps']} timed minibatches after {cfg['warmup']} "
        f"warm-up; stage forward+backward alone: "
        + ", ".join(f"{t:.1f} ms" for t in cfg["stage_ms"])
        + f"; ideal 1/slowest stage = {ideal:.0f} samples/s",
        "",
        "| configuration | samples/s (median) | min–max | vs pipelining 1F1B (ratio of medians) "
        "| per-repeat ratio: median (min–max) | vs ideal (median; best) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        pr = paired(samples, name, "pipelining 1F1B")
        lines.append(f"| {name} | {s['median']:.0f} | {s['min']:.0f}–{s['max']:.0f} | {s['median'] / ref:.2f}x | "
                     f"{statistics.median(pr):.2f}x ({min(pr):.2f}–{max(pr):.2f}) | "
                     f"{s['median'] / ideal:.0%}; {s['max'] / ideal:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repeat, few steps")
    p.add_argument("--stage-ms", type=float, default=10.0, help="forward+backward per stage per microbatch")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64, help="samples per microbatch")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed minibatches per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc alone in every contender (pipeshift train tunes it by default)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = 10, 1, 2
    if not args.no_malloc_tuning:
        keep_freed_memory()  # the single-process baselines run here
    cfg = calibrate(args)
    cfg["malloc_tuning"] = not args.no_malloc_tuning
    ideal = cfg["batch"] / (max(cfg["stage_ms"]) / 1e3)
    samples: dict[str, list[float]] = {name: [] for name in PIPELINED}
    samples["ideal, stages computing at once"] = []
    samples["single process, 1 thread"] = []
    samples["single process, 2 threads"] = []
    cpu: dict[str, list[list[float]]] = {name: [] for name in PIPELINED}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        order = list(PIPELINED[r % len(PIPELINED):] + PIPELINED[:r % len(PIPELINED)])
        rates, cpus = pipelined_repeat(cfg, order)
        for name, value in rates.items():
            samples[name].append(value)
        for name, value in cpus.items():
            cpu[name].append(value)
        for threads in (1, 2):
            samples[f"single process, {threads} thread{'s' if threads > 1 else ''}"].append(single_process(cfg, threads))
        load.append(os.getloadavg()[0])
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()),
              file=sys.stderr, flush=True)
    stats = summarize(samples)
    print(report(cfg, stats, ideal, samples))
    print("\nCPU ms per microbatch (median over repeats; rank 0 / rank 1) — work done, whatever the OS "
          "scheduling: " + "; ".join(
              f"{name} {statistics.median(c[0] for c in cpu[name]):.1f} / {statistics.median(c[1] for c in cpu[name]):.1f}"
              for name in PIPELINED))
    print(f"1-minute load average during the run: {min(load):.1f}–{max(load):.1f} on {os.cpu_count()} cores "
          "(above 2, the ranks did not have the cores to themselves)")
    goal = statistics.median(paired(samples, "pipeshift 1f1b", "pipelining 1F1B"))
    print(f"\npipeshift 1f1b / pipelining 1F1B, per-repeat median = {goal:.2f}x (goal >= 1.1x); pipeshift 1f1b = "
          f"{stats['pipeshift 1f1b']['median'] / ideal:.0%} of ideal at the median, "
          f"{stats['pipeshift 1f1b']['max'] / ideal:.0%} in the best repeat (goal >= 90%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg, "ideal": ideal, "samples": samples, "cpu_ms": cpu,
                                               "load": load}, indent=1))
    return 0 if all(math.isfinite(s["median"]) for s in stats.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
