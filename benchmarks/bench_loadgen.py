"""What the load generator costs: `python -m benchmarks.bench_loadgen [--requests N]`.

``pipeshift loadtest`` runs on the cores of the server it measures, so every CPU second it spends
per request is one the server does not get. This serves a small MLP in one process and sends the
same closed loop through httpx's and aiohttp's async clients, alternately, and prints the client
process's CPU time per request (``time.process_time``: what load on the machine inflates least)
and the throughput seen. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_serve import Served, mlp_packages
from benchmarks.common import Spread, load_average, markdown_table


async def with_httpx(url: str, body: bytes, n: int, c: int) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=c)) as client:
        todo = iter(range(n))

        async def loop() -> None:
            for _ in todo:
                r = await client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
                r.raise_for_status()

        await asyncio.gather(*(loop() for _ in range(c)))


async def with_aiohttp(url: str, body: bytes, n: int, c: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c)) as session:
        todo = iter(range(n))

        async def loop() -> None:
            for _ in todo:
                async with session.post(url + "/v1/predict", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    r.raise_for_status()

        await asyncio.gather(*(loop() for _ in range(c)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="200 requests, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.repeats = 200, 1
    work = Path(tempfile.mkdtemp(prefix="bench-loadgen-"))
    pkg = mlp_packages(work, in_features=1024, width=1024, depth=8, batch=8, plans={"one": ["-n", "1"]})["one"]
    load_before = load_average()
    serving = argparse.Namespace(max_batch=8, max_delay_ms=2.0)
    served = Served(work, pkg, 1, 1, serving)
    cpu: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
    rate: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
    try:
        import httpx

        body = json.dumps(httpx.get(served.url + "/v1/models").json()["data"][0]["example"]).encode()
        for _ in range(args.repeats):
            for name, fn in (("httpx", with_httpx), ("aiohttp", with_aiohttp)):
                c0, w0 = time.process_time(), time.perf_counter()
                asyncio.run(fn(served.url, body, args.requests, args.concurrency))
                cpu[name].append((time.process_time() - c0) / args.requests)
                rate[name].append(args.requests / (time.perf_counter() - w0))
    finally:
        served.close()
    print(f"Closed loop of {args.concurrency} clients, {args.requests} requests x {args.repeats} per client "
          f"library, against `{' '.join(served.cmd[2:4])} …`; load average {load_before:.1f} before, "
          f"{load_average():.1f} after.\n")
    print(markdown_table(["client", "client CPU ms per request, median (min–max)", "req/s, median (min–max)"],
                         [[n, Spread.of(cpu[n]).format(lambda x: f"{x * 1000:.2f}"),
                           Spread.of(rate[n]).format(lambda x: f"{x:.0f}")] for n in cpu], right=(1, 2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
