"""Serving throughput and tail latency: `python -m benchmarks.bench_serve [--quick]`.

One model (``--model``: the zoo MLP, ``--width`` × ``--depth``, by default 1024 × 32, whose forward
costs several times a request's HTTP work, so that there is a model to split, as the compute
ceiling below and bench_frontend say; or ``vgg16``, VGG-16 on 32 × 32 images, whose convolutions
are bound by arithmetic where the MLP's batches of 8 are bound by memory), profiled and planned
with ``pipeshift plan --objective serve``, served these ways with the same front end and the
same batching (``--max-batch``, ``--max-delay-ms``):

* **one process, 1 thread** and **one process, 2 threads**: the unsplit model (a one-stage plan,
  ``-n 1``) on one rank;
* **pipelined, --local 2**: the DP's best straight pipeline on two workers
  (``-n 2 --straight-pipeline``), one thread per rank; once with serve's default batches in
  flight (one per stage rank and one that fills up before it is sent) and once with
  ``--inflight 2`` (one per stage rank, nothing waits to fill);
* **--local 2, replicated**: the DP's own choice on two workers (``-n 2``): serving replicates
  for free, so one stage on both ranks — data-parallel serving.
* each layout again with the front end on a rank of its own (``--local N+1 --frontend-rank N``):
  the HTTP server and batcher in a process without a stage, so no stage's forward waits for the
  interpreter lock the HTTP thread holds. "one stage + front-end rank" is the one-process model
  with only that change, so the pipeline's own gain reads off the rows below it.

Before them, the compute ceiling: the unsplit model's forward in one process, then in two at once
(no HTTP): what two ranks of this machine can deliver at most. All servers are up together and
the saturation throughput (closed loop, ``--concurrency`` clients) is measured in rounds that
visit every layout, so each ratio is also given per round. Then an open loop
(Poisson arrivals, ``pipeshift loadtest --rate``) at 50 % and 90 % of that throughput for
``--duration`` seconds: p50 and p99 latency. The load generator runs on the same two cores, as
a client beside the server would. Prints markdown tables and the commands; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Spread, at_once, load_average, markdown_table, sh
from pipeshift.serve.loadtest import load

REPO = Path(__file__).resolve().parents[1]

PY = sys.executable


def zoo_packages(work: Path, model: list[str], *, batch: int, plans: dict[str, list[str]]) -> dict[str, Path]:
    """Profile a zoo model (``model``: the spec and its ``--model-arg`` flags) once, one thread,
    batch ``batch``; then plan for serving and generate a stage package per entry of ``plans``
    (name -> ``pipeshift plan`` flags): name -> package."""
    sh([PY, "-m", "pipeshift", "profile", *model, "-b", str(batch), "--threads", "1", "-o", "prof"], work)
    out = {}
    for name, flags in plans.items():
        sh([PY, "-m", "pipeshift", "plan", "prof/graph.txt", *flags, "--objective", "serve", "-q", "-o",
            f"plan-{name}"], work)
        sh([PY, "-m", "pipeshift", "codegen", f"plan-{name}", "-o", f"stages-{name}"], work)
        out[name] = work / f"stages-{name}"
    return out


def zoo_spec(name: str, knobs: dict) -> list[str]:
    """The ``pipeshift profile`` spec of zoo entry ``name`` with its size knobs."""
    return [f"pipeshift.models:{name}", *[x for k, v in knobs.items() for x in ("--model-arg", f"{k}={v}")]]


def mlp_packages(work: Path, *, in_features: int, width: int, depth: int, batch: int,
                 plans: dict[str, list[str]]) -> dict[str, Path]:
    """:func:`zoo_packages` of the zoo MLP."""
    knobs = {"in_features": in_features, "width": width, "depth": depth}
    return zoo_packages(work, zoo_spec("mlp", knobs), batch=batch, plans=plans)


# The models --model chooses from: the zoo entry and its size knobs.
MODELS = {
    # memory-bound at --max-batch 8: every batch streams 128 MB of weights, whatever its size
    "mlp": lambda a: ("mlp", {"in_features": a.in_features or a.width, "width": a.width, "depth": a.depth}),
    # compute-bound: convolutions on 32 x 32 images, a batch's cost grows with its size
    "vgg16": lambda a: ("vgg16", {"image_size": 32, "num_classes": 10, "hidden": 512}),
}


def describe(args: argparse.Namespace) -> str:
    name, knobs = MODELS[args.model](args)
    return f"{name} ({', '.join(f'{k}={v}' for k, v in knobs.items())})"


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    plans = {"one": ["-n", "1"], "pipelined": ["-n", "2", "--straight-pipeline"], "replicated": ["-n", "2"]}
    return zoo_packages(work, zoo_spec(*MODELS[args.model](args)), batch=args.max_batch, plans=plans)


class Served:
    def __init__(self, work: Path, pkg: Path, ranks: int, threads: int, args: argparse.Namespace,
                 own_frontend: bool = False, extra: tuple[str, ...] = ()):
        label = f"{pkg.name}-{threads}{'-fe' if own_frontend else ''}{''.join(extra).replace('-', '')}"
        port_file = work / f"port-{label}.txt"
        port_file.unlink(missing_ok=True)
        # a front end of its own: one rank more than the package's, numbered after its last
        placement = ["--local", str(ranks + 1), "--frontend-rank", str(ranks)] if own_frontend else \
            ["--local", str(ranks)]
        self.cmd = [PY, "-m", "pipeshift", "serve", str(pkg), *placement, "--threads", str(threads),
                    "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms),
                    "--queue", "4096", "--port", "0", "--port-file", str(port_file), *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.log = open(work / f"serve-{label}.log", "w")
        self.proc = subprocess.Popen(self.cmd, cwd=work, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"server did not start: {shlex.join(self.cmd)}")
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        import httpx

        while httpx.get(self.url + "/ready").status_code != 200:
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def mean_batch(url: str) -> float:
    """Samples per batch so far, from the server's own histogram (how well requests were batched)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
              for s in f.samples if s.name.startswith("pipeshift_serve_batch_size")}
    count = values.get("pipeshift_serve_batch_size_count", 0.0)
    return values.get("pipeshift_serve_batch_size_sum", 0.0) / count if count else float("nan")


def measure(servers: list[Served], args: argparse.Namespace) -> list[dict]:
    """Saturation in interleaved rounds (every layout once per round), then the open loops.

    All servers are up at once (idle ones cost a ping a second), so each round measures every
    layout within a minute of the others: this machine's speed drifts by ±20 % over minutes, and
    a ratio taken within a round is steadier than one across rows measured far apart.
    """
    for served in servers:
        load(served.url, concurrency=args.concurrency, requests=args.warmup)
    sats: list[list[float]] = [[] for _ in servers]
    for _ in range(args.repeats):
        for k, served in enumerate(servers):
            summary, _ = load(served.url, concurrency=args.concurrency, requests=args.requests)
            sats[k].append(summary.throughput)
    out = []
    for k, served in enumerate(servers):
        saturation = Spread.of(sats[k])
        r: dict = {"saturation": saturation, "rounds": sats[k], "batch": mean_batch(served.url)}
        for frac in (0.5, 0.9):
            summary, _ = load(served.url, rate=frac * saturation.median, duration=args.duration, seed=1)
            r[frac] = summary
        out.append(r)
    return out


def _forward_loop(start, out, name: str, knobs: dict, batch: int, seconds: float) -> None:
    """One process computing the unsplit model's forward on one thread for ``seconds``: samples/s."""
    import torch

    from pipeshift.models import ZOO

    torch.set_num_threads(1)
    bundle = ZOO[name](**knobs)
    model = bundle.model.eval()
    x = bundle.example_inputs(batch)
    with torch.no_grad():
        for _ in range(3):
            model(*x)
        start.wait()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(*x)
            n += batch
    out.put(n / (time.perf_counter() - t0))


def compute_ceiling(args: argparse.Namespace, seconds: float = 4.0) -> dict[int, float]:
    """Samples/s of the model's forward alone, with 1 and with 2 processes computing at once.

    No HTTP, no batching, no messages: what this machine's cores deliver to any layout over one
    or two ranks. Two processes reach 2x one only on two cores of their own; a virtual machine
    whose two cores share a physical one (or a busy host) gives less, and no pipeline can beat it.
    """
    name, knobs = MODELS[args.model](args)
    return {k: sum(at_once(_forward_loop, (name, knobs, args.max_batch, seconds), k)) for k in (1, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer requests, shorter open loops")
    p.add_argument("--model", choices=sorted(MODELS), default="mlp",
                   help="the zoo MLP (memory-bound; --width, --depth, --in-features) or VGG-16 on 32 x 32 "
                        "images (compute-bound); default %(default)s")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--in-features", type=int, default=None, help="inputs per sample (default: --width)")
    p.add_argument("--only", default=None, help="comma-separated row numbers to run (1-based; default all)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=None, help="per layout and round (default 1500; vgg16 400)")
    p.add_argument("--warmup", type=int, default=None, help="per layout (default 200; vgg16 64)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    slow = args.model == "vgg16"  # a few dozen requests per second: fewer of them take as long
    args.requests = args.requests or (400 if slow else 1500)
    args.warmup = args.warmup or (64 if slow else 200)
    if args.quick:
        args.requests, args.warmup, args.duration, args.repeats = 400, 100, 4.0, 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    pkgs = prepare(work, args)
    ceiling = compute_ceiling(args)
    runs = [("one process, 1 thread", pkgs["one"], 1, 1, False, ()),
            ("one process, 2 threads", pkgs["one"], 1, 2, False, ()),
            ("one stage + front-end rank", pkgs["one"], 1, 1, True, ()),
            ("pipelined, --local 2", pkgs["pipelined"], 2, 1, False, ()),
            ("pipelined, --local 2 --inflight 2", pkgs["pipelined"], 2, 1, False, ("--inflight", "2")),
            ("pipelined + front-end rank", pkgs["pipelined"], 2, 1, True, ()),
            ("--local 2, replicated", pkgs["replicated"], 2, 1, False, ()),
            ("replicated + front-end rank", pkgs["replicated"], 2, 1, True, ())]
    if args.only:
        keep = {int(k) for k in args.only.split(",")}
        runs = [r for i, r in enumerate(runs, 1) if i in keep]
    servers: list[Served] = []
    try:
        for _label, pkg, ranks, threads, own, extra in runs:
            servers.append(Served(work, pkg, ranks, threads, args, own_frontend=own, extra=extra))
        measured = measure(servers, args)
    finally:
        for served in servers:
            served.close()
    results = [(run[0], r) for run, r in zip(runs, measured)]
    commands = [(run[0], shlex.join(served.cmd[2:])) for run, served in zip(runs, servers)]
    # per round: each layout against the best one-process layout of the same round
    one_rows = [k for k, run in enumerate(runs) if run[0].startswith("one process")]
    per_round = [[r["rounds"][i] / max(measured[k]["rounds"][i] for k in one_rows) for i in range(len(r["rounds"]))]
                 for r in measured] if one_rows else [[] for _ in measured]
    best_one = max((r["saturation"].median for label, r in results if label.startswith("one process")),
                   default=float("nan"))
    one_p50 = next((r[0.5].p50_s for label, r in results if label == "one process, 1 thread"), None)

    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v * 1000:.1f}"

    rows = []
    for (label, r), ratios in zip(results, per_round):
        sat = r["saturation"]
        rows.append([label, sat.format(lambda x: f"{x:.0f}"), f"{sat.median / best_one:.2f}x",
                     Spread.of(ratios).format(lambda x: f"{x:.2f}x"), f"{r['batch']:.1f}",
                     ms(r[0.5].p50_s), ms(r[0.5].p99_s), ms(r[0.9].p50_s), ms(r[0.9].p99_s),
                     f"{r[0.5].p99_s / one_p50:.2f}x" if r[0.5].p99_s and one_p50 else "–"])
    print(f"{describe(args)}; --max-batch {args.max_batch} --max-delay-ms "
          f"{args.max_delay_ms}; saturation: closed loop of {args.concurrency} clients, {args.requests} requests "
          f"× {args.repeats}; 50 %/90 %: Poisson arrivals for {args.duration:g} s. Load average {load_before:.1f} "
          f"before, {load_average():.1f} after.\n")
    print(markdown_table(["served as", "saturation req/s, median (min–max)", "vs best one-process",
                          "per round: vs that round's best one-process", "samples per batch", "p50 ms @50%", "p99 ms @50%", "p50 ms @90%", "p99 ms @90%",
                          "p99 @50% / one-process p50 @50%"], rows, right=range(1, 10)))
    pipelined = next((r for label, r in results if label == "pipelined, --local 2"), None)
    if pipelined is not None and one_p50 and pipelined[0.5].p50_s and pipelined[0.5].p99_s:
        print(f"\nThe latency goal's ratio, taken apart: the pipelined p50 at 50 % is "
              f"{pipelined[0.5].p50_s / one_p50:.2f}x the one-process p50, and its own p99 is "
              f"{pipelined[0.5].p99_s / pipelined[0.5].p50_s:.2f}x its p50; the product is the goal's ratio.")
    print(f"\nCompute ceiling (the model's forward at batch {args.max_batch}, one thread per process, no HTTP): "
          f"one process {ceiling[1]:.0f} samples/s, two at once {ceiling[2]:.0f} samples/s = "
          f"{ceiling[2] / ceiling[1]:.2f}x one. No layout on two ranks can exceed the second figure.")
    print("\nCommands (in the work directory):\n")
    for label, cmd in commands:
        print(f"* {label}: `{cmd}`")
    print(f"\nGoals (issue #13): pipelined ≥ 1.3× the best one-process throughput; p99 at 50 % load ≤ 2× "
          f"the one-process p50. Work directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
