"""What the HTTP front end costs per request: `python -m benchmarks.bench_frontend [--quick]`.

Serves a model that costs nothing (the zoo MLP with 1024 inputs, one hidden layer of 64: a
request is the same 1024 floats of JSON as bench_serve's) in one process, with uvicorn's
pure-Python stack (``serve --http h11 --loop asyncio``) and with its compiled one (httptools and
uvloop, what ``--http auto --loop auto`` picks when the ``serve`` extra is installed), and drives
each with the same closed loop, alternately. Prints the saturation throughput and the CPU seconds
per request of the server's processes and of the load generator (from /proc), then the parse of
one request body by the standard library's json and by orjson. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

from benchmarks.bench_serve import Served, mlp_packages
from benchmarks.common import Spread, load_average, markdown_table
from pipeshift.serve.loadtest import load

STACKS = {"h11 + asyncio (pure Python)": ("--http", "h11", "--loop", "asyncio"),
          "httptools + uvloop (default with the serve extra)": ("--http", "auto", "--loop", "auto")}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (their own, not their children's)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def server_pids(root: int) -> list[int]:
    """The server's process and all its descendants (the launcher, torchrun, the ranks)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1000 requests, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.repeats = 1000, 1
    work = Path(tempfile.mkdtemp(prefix="bench-frontend-"))
    pkg = mlp_packages(work, in_features=1024, width=64, depth=1, batch=8, plans={"one": ["-n", "1"]})["one"]
    load_before = load_average()
    serving = argparse.Namespace(max_batch=8, max_delay_ms=2.0)
    servers = {}
    rate: dict[str, list[float]] = {k: [] for k in STACKS}
    server_cpu: dict[str, list[float]] = {k: [] for k in STACKS}
    client_cpu: dict[str, list[float]] = {k: [] for k in STACKS}
    try:
        for name, flags in STACKS.items():
            servers[name] = Served(work, pkg, 1, 1, serving, extra=flags)
            load(servers[name].url, concurrency=args.concurrency, requests=200)  # warm-up
        for _ in range(args.repeats):
            for name, served in servers.items():
                pids = server_pids(served.proc.pid)
                s0, c0 = cpu_seconds(pids), time.process_time()
                summary, _ = load(served.url, concurrency=args.concurrency, requests=args.requests)
                n = summary.statuses.get("200", 0) or args.requests
                server_cpu[name].append((cpu_seconds(pids) - s0) / n)
                client_cpu[name].append((time.process_time() - c0) / n)
                rate[name].append(summary.throughput)
        import httpx

        body = json.dumps(httpx.get(next(iter(servers.values())).url + "/v1/models").json()["data"][0]
                          ["example"]).encode()
    finally:
        for served in servers.values():
            served.close()
    print(f"One-process server of a model that costs nothing; closed loop of {args.concurrency} clients, "
          f"{args.requests} requests × {args.repeats} per stack, alternately; load average {load_before:.1f} before, "
          f"{load_average():.1f} after.\n")
    ms = lambda x: f"{x * 1000:.2f}"
    print(markdown_table(["HTTP stack", "req/s, median (min–max)", "server CPU ms per request",
                          "load generator CPU ms per request"],
                         [[n, Spread.of(rate[n]).format(lambda x: f"{x:.0f}"), Spread.of(server_cpu[n]).format(ms),
                           Spread.of(client_cpu[n]).format(ms)] for n in STACKS], right=(1, 2, 3)))
    rows = [["json (standard library)", f"{min(timeit.repeat(lambda: json.loads(body), number=200, repeat=5)) / 200 * 1e6:.0f}"]]
    try:
        import orjson

        rows.append(["orjson", f"{min(timeit.repeat(lambda: orjson.loads(body), number=200, repeat=5)) / 200 * 1e6:.0f}"])
        from pipeshift.serve.http import loads

        rows.append(["serve's parse (orjson, after the check for integers past 64 bits)",
                     f"{min(timeit.repeat(lambda: loads(body), number=200, repeat=5)) / 200 * 1e6:.0f}"])
    except ImportError:
        rows.append(["orjson", "not installed"])
    print(f"\nParsing one request body ({len(body)} bytes, the model's example: 1024 floats), best of 5 × 200:\n")
    print(markdown_table(["parser", "µs per body"], rows, right=(1,)))
    print(f"\nCommands: `pipeshift serve {pkg} --local 1 --threads 1 --max-batch 8 --max-delay-ms 2 "
          f"--http h11 --loop asyncio` (and `--http auto --loop auto`), `pipeshift loadtest URL --concurrency "
          f"{args.concurrency} --requests {args.requests}`. Work directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
