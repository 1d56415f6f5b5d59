"""Swapping models in and out of one set of serving ranks: `python -m benchmarks.bench_swap [--quick]`.

Two measurements through ``pipeshift serve --model … --max-loaded 1`` (the real server, its
front end and its ranks), each bounded:

* **swap-in time against the number of stages.** A zoo MLP of about ``--gb`` GB (``--width`` ×
  ``--depth`` float32 weights), profiled once and planned as a straight pipeline of S = 1, 2, 4
  stages (``pipeshift plan -n S --straight-pipeline --objective serve``), served beside a tiny
  second model; requests alternate between the two, so every request for the big one swaps it
  in (every rank copying its own shard from its host copy at the same time). The figure is the
  front end's swap-in time (from sending the loads to the last rank's report) over ``--swaps``
  swap-ins: median and range, and its ratio to the one-stage time (goal: ≤ 1.3 / S).
* **response time under a Computron-like workload.** Three MLPs (``--work-width`` ×
  ``--work-depth``) on two ranks, at most one resident, requests for a random model arriving as
  a Gamma process (``--rate`` per second, shape ``--gamma-shape``: bursty below 1) until
  ``--work-requests`` were sent; once with ``--swap-in pipelined`` (a stage starts as soon as its
  own shard is in) and once with ``--swap-in whole`` (batches wait for every rank's report, as in
  Computron); then pipelined with two resident, where a swap-in overlaps with serving the
  resident model. p50/p99 latency, statuses and swap counts.

Several ranks share this machine's cores and memory bandwidth (the load average is printed);
the figures say what one machine does, not what separate devices would. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from benchmarks.common import Spread, at_once, load_average, markdown_table, sh

REPO = Path(__file__).resolve().parents[1]

PY = sys.executable


def packages(work: Path, name: str, width: int, depth: int, stage_counts: list[int]) -> dict[int, Path]:
    """Profile the MLP once, plan and generate a straight pipeline of each stage count."""
    model = ["pipeshift.models:mlp", "--model-arg", f"in_features={width}", "--model-arg", f"width={width}",
             "--model-arg", f"depth={depth}"]
    if not (work / f"prof-{name}" / "graph.txt").exists():
        # equal layers: a few steps tell the planner enough to cut them evenly
        sh([PY, "-m", "pipeshift", "profile", *model, "-b", "2", "--iterations", "3", "--warmup", "1",
            "--remeasure", "0", "-o", f"prof-{name}"], work)
    out = {}
    for s in stage_counts:
        plan, stages = f"plan-{name}-{s}", f"stages-{name}-{s}"
        if not (work / stages).exists():
            sh([PY, "-m", "pipeshift", "plan", f"prof-{name}/graph.txt", "-n", str(s), "--straight-pipeline",
                "--objective", "serve", "-q", "-o", plan], work)
            sh([PY, "-m", "pipeshift", "codegen", plan, "-o", stages], work)
        out[s] = work / stages
    return out


class Server:
    def __init__(self, work: Path, models: dict[str, Path], ranks: int, flags: list[str], label: str):
        port_file = work / f"port-{label}.txt"
        port_file.unlink(missing_ok=True)
        self.cmd = [PY, "-m", "pipeshift", "serve", *[a for n, p in models.items() for a in ("--model", f"{n}={p}")],
                    "--local", str(ranks), "--port", "0", "--port-file", str(port_file), "--queue", "4096",
                    "--timeout", "120", "--request-timeout", "300", *flags]
        self.log_path = work / f"serve-{label}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=work, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 600
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"server did not start: {shlex.join(self.cmd)}\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        import httpx

        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.client = httpx.Client(base_url=self.url, timeout=600)
        while self.client.get("/ready").status_code != 200:
            time.sleep(0.2)

    def models(self) -> dict:
        return {m["id"]: m for m in self.client.get("/v1/models").json()["data"]}

    def predict(self, name: str, example: list) -> int:
        return self.client.post(f"/v1/models/{name}/predict", json={"inputs": example}).status_code

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if hasattr(self, "client"):
            self.client.close()
        self.log.close()


def swap_times(server: Server, big: str, small: str, swaps: int) -> tuple[list[float], list[dict]]:
    """Alternate requests so that every one for ``big`` swaps it in; its swap-in times and per-rank records."""
    listed = server.models()
    examples = {n: listed[n]["example"]["inputs"] for n in (big, small)}
    times, per_rank = [], []
    for _ in range(swaps):
        for name in (small, big):
            status = server.predict(name, examples[name])
            if status != 200:
                raise RuntimeError(f"{name}: status {status}")
        m = server.models()[big]
        times.append(float(m["last_swap_in_s"]))
        per_rank.append({r: rec["seconds"] for r, rec in m["last_swap_in"].items()})
    return times, per_rank


def _copy(start, out, n_bytes: int, repeats: int) -> None:
    """Copy ``n_bytes`` from a host tensor as a swap-in does: into fresh pages, then into touched ones.

    The fastest repeat's seconds of each. A fresh allocation this large is new pages that fault
    in one by one as the copy touches them; a swap-in whose allocator kept the evicted model's
    memory copies into touched pages, at memory speed.
    """
    import torch

    torch.set_num_threads(1)
    src = torch.ones(n_bytes // 4)
    fresh = touched = float("inf")
    kept = torch.empty_like(src)
    kept.copy_(src)
    for _ in range(repeats):
        start.wait()
        t0 = time.perf_counter()
        dst = torch.empty_like(src)
        dst.copy_(src)
        fresh = min(fresh, time.perf_counter() - t0)
        del dst
        start.wait()
        t0 = time.perf_counter()
        kept.copy_(src)
        touched = min(touched, time.perf_counter() - t0)
    out.put((fresh, touched))


def copy_ceiling(n_bytes: int, ranks: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds for ``ranks`` processes to copy ``n_bytes / ranks`` each at once (the slowest one):
    into fresh pages, and into touched pages.

    The same allocation and copy as every rank's swap-in, with nothing of pipeshift around it:
    what S ranks of this machine can do at best, so the swap-in's ratio reads against it.
    """
    results = at_once(_copy, (n_bytes // ranks, repeats), ranks)
    return max(r[0] for r in results), max(r[1] for r in results)


def part_stages(work: Path, args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    big = packages(work, "big", args.width, args.depth, args.stages)
    small = packages(work, "small", 16, 4, args.stages)
    rows, commands, one, one_fresh, one_touched = [], [], None, 1.0, 1.0
    for s in args.stages:
        server = Server(work, {"big": big[s], "small": small[s]}, s, ["--max-loaded", "1"], f"stages{s}")
        try:
            times, per_rank = swap_times(server, "big", "small", args.swaps)
            gb = sum(server.models()["big"]["bytes_per_rank"].values()) / 1e9
            commands.append(shlex.join(server.cmd[2:]))
        finally:
            server.close()
        spread = Spread.of(times)
        rank_s = Spread.of([max(d.values()) for d in per_rank])
        fresh, touched = copy_ceiling(int(gb * 1e9), s)
        one = spread.median if s == 1 else one
        one_fresh, one_touched = (fresh, touched) if s == 1 else (one_fresh, one_touched)
        ratio = spread.median / one if one else None
        rows.append([str(s), f"{gb:.2f}", spread.format(lambda x: f"{x * 1000:.0f}"),
                     rank_s.format(lambda x: f"{x * 1000:.0f}"), f"{gb / spread.median:.2f}",
                     f"{ratio:.2f}" if ratio else "–", f"{1.3 / s:.2f}",
                     f"{fresh * 1000:.0f} ({fresh / one_fresh:.2f})", f"{touched * 1000:.0f} ({touched / one_touched:.2f})"])
    return rows, commands


async def gamma_workload(url: str, names: list[str], examples: dict, n: int, rate: float, shape: float,
                         seed: int) -> list[tuple[str, float, int]]:
    import httpx

    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    picks = rng.integers(0, len(names), size=n)
    results: list[tuple[str, float, int]] = []

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        async def one(name: str) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"/v1/models/{name}/predict", json={"inputs": examples[name]})
                status = r.status_code
            except httpx.HTTPError:
                status = -1
            results.append((name, time.perf_counter() - t0, status))

        tasks = []
        for gap, k in zip(gaps, picks):
            await asyncio.sleep(float(gap))
            tasks.append(asyncio.create_task(one(names[int(k)])))
        await asyncio.gather(*tasks)
    return results


def part_workload(work: Path, args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    stages = packages(work, "work", args.work_width, args.work_depth, [2])[2]
    pkgs = {n: stages for n in ("m1", "m2", "m3")}  # one package, three models (each its own weights)
    rows, commands = [], []
    for mode, k in (("pipelined", 1), ("whole", 1), ("pipelined", 2)):
        server = Server(work, pkgs, 2, ["--max-loaded", str(k), "--swap-in", mode, "--max-batch", "8"],
                        f"work-{mode}-{k}")
        try:
            listed = server.models()
            examples = {n: listed[n]["example"]["inputs"] for n in pkgs}
            for n in pkgs:  # warm every model once
                server.predict(n, examples[n])
            before = server.client.get("/v1/models").json()["swaps"]
            t0 = time.perf_counter()
            results = asyncio.run(gamma_workload(server.url, list(pkgs), examples, args.work_requests, args.rate,
                                                 args.gamma_shape, args.seed))
            wall = time.perf_counter() - t0
            listing = server.client.get("/v1/models").json()
            swap_s = [m["last_swap_in_s"] for m in listing["data"] if m["last_swap_in_s"] is not None]
            commands.append(shlex.join(server.cmd[2:]))
        finally:
            server.close()
        ok = sorted(lat for _, lat, st in results if st == 200)
        statuses: dict[int, int] = {}
        for _, _, st in results:
            statuses[st] = statuses.get(st, 0) + 1
        p50, p99 = (np.percentile(ok, q) * 1000 if ok else float("nan") for q in (50, 99))
        rows.append([mode, str(k), str(len(results)), f"{p50:.0f}", f"{p99:.0f}", f"{max(ok) * 1000:.0f}" if ok else "–",
                     str(listing["swaps"] - before), f"{np.median(swap_s) * 1000:.0f}" if swap_s else "–",
                     f"{wall:.1f}", json.dumps(statuses)])
    return rows, commands


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 0.27 GB model, fewer swaps and requests")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=17, help="with --width 4096: 16 hidden layers ≈ 1.07 GB")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--swaps", type=int, default=5, help="swap-ins measured per stage count")
    p.add_argument("--work-width", type=int, default=2048)
    p.add_argument("--work-depth", type=int, default=6)
    p.add_argument("--work-requests", type=int, default=60)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second, on average")
    p.add_argument("--gamma-shape", type=float, default=0.5, help="< 1: bursts (CV = 1/sqrt(shape))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", choices=["stages", "workload"], default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.swaps, args.work_requests, args.work_width = 4, 3, 30, 1024
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-swap-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = load_average()
    if args.skip != "stages":
        rows, commands = part_stages(work, args)
        print(f"\nSwap-in of an MLP {args.width} x {args.depth} (float32) against the number of stages "
              f"(--max-loaded 1, alternating with a tiny model; {args.swaps} swap-ins each; load average "
              f"{load_before:.1f} before, {load_average():.1f} after)\n")
        print(markdown_table(["stages (ranks)", "GB", "swap-in ms, median (min–max)", "slowest rank's copy ms",
                              "GB/s", "vs 1 stage", "goal ≤ 1.3/S",
                              "machine: S processes copying GB/S each into fresh pages, ms (vs 1)",
                              "the same into touched pages, ms (vs 1)"], rows, right=range(1, 9)))
        print("\nCommands (in the work directory):\n")
        for cmd in commands:
            print(f"* `{cmd}`")
    if args.skip != "workload":
        load_before = load_average()
        rows, commands = part_workload(work, args)
        print(f"\nComputron-like workload: 3 MLPs {args.work_width} x {args.work_depth} on 2 ranks, "
              f"{args.work_requests} requests, Gamma arrivals ({args.rate:g}/s, shape {args.gamma_shape:g}, seed "
              f"{args.seed}); load average {load_before:.1f} before, {load_average():.1f} after\n")
        print(markdown_table(["swap-in", "--max-loaded", "requests", "p50 ms", "p99 ms", "max ms", "swaps", "median swap-in ms",
                              "wall s", "statuses"], rows, right=range(1, 9)))
        print("\nCommands (in the work directory):\n")
        for cmd in commands:
            print(f"* `{cmd}`")
    print(f"\nWork directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
