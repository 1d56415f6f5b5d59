"""Load-test a serving endpoint: ``pipeshift loadtest URL --concurrency C --requests N`` or ``--rate R --duration S``.

* **closed loop** (``--concurrency C --requests N``): C clients, each sending its next request
  as soon as the last one is answered, N requests in all — the throughput at saturation.
* **open loop** (``--rate R --duration S``): requests arrive as a Poisson process of R per
  second for S seconds whatever the server does (seeded, ``--seed``), so queueing shows in the
  latency — p99 at a chosen fraction of the saturation throughput.

The body is ``--body FILE`` (JSON, or safetensors with ``--content-type``), else the example
request the server lists in ``GET /v1/models``. Prints requests, seconds, throughput (answers
with status 200 per second), p50/p90/p99 latency of the 200s and the count of every status
(``error``: no HTTP answer at all); ``--csv`` writes one row per request. Only loopback
addresses unless ``--allow-remote``; everything is bounded (``--max-outstanding``, ``--timeout``).
The requests go out through aiohttp: a generator on the server's own cores must cost little, and
httpx's async client spent six times aiohttp's CPU per request here (benchmarks/bench_loadgen.py).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import ipaddress
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from pipeshift.errors import PipeshiftError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="server (http://127.0.0.1:8000) or an endpoint URL (…/v1/predict)")
    p.add_argument("--concurrency", "-c", type=int, default=None, help="closed loop: clients at once")
    p.add_argument("--requests", "-n", type=int, default=None, help="closed loop: requests in all")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests per second (Poisson arrivals)")
    p.add_argument("--duration", type=float, default=None, help="open loop: seconds of arrivals")
    p.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrival times")
    p.add_argument("--body", default=None, help="request body file (default: the server's example request)")
    p.add_argument("--content-type", default="application/json", help="of --body (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="per request, seconds (default %(default)s)")
    p.add_argument("--max-outstanding", type=int, default=1024, help="open loop: requests in flight at most")
    p.add_argument("--token-file", default=None, help="bearer token file (default $PIPESHIFT_SERVE_TOKEN)")
    p.add_argument("--csv", default=None, help="write one row per request: index, start_s, latency_s, status")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback server")


@dataclasses.dataclass
class Result:
    index: int
    start_s: float
    latency_s: float
    status: int | str


@dataclasses.dataclass
class Summary:
    requests: int
    seconds: float
    throughput: float  # status-200 answers per second
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None
    statuses: dict[str, int]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def text(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.1f} ms"
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.requests} requests in {self.seconds:.2f} s: {self.throughput:.1f} ok/s; latency of the "
                f"200s p50 {ms(self.p50_s)}, p90 {ms(self.p90_s)}, p99 {ms(self.p99_s)}; statuses {counts}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100.0 * (len(s) - 1)))))
    return s[k]


def summarise(results: list[Result], seconds: float) -> Summary:
    ok = [r.latency_s for r in results if r.status == 200]
    statuses = Counter(str(r.status) for r in results)
    return Summary(len(results), seconds, len(ok) / seconds if seconds > 0 else 0.0, percentile(ok, 50),
                   percentile(ok, 90), percentile(ok, 99), dict(statuses))


def endpoint(url: str, allow_remote: bool) -> tuple[str, str]:
    """(base URL, path) — the path defaults to /v1/predict."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PipeshiftError(f"{url!r}: expected http://HOST:PORT[/path]")
    if not allow_remote:
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise PipeshiftError(f"{host}: not a loopback address (pass --allow-remote to load-test another host)")
    base = f"{parts.scheme}://{parts.netloc}"
    path = parts.path if parts.path not in ("", "/") else "/v1/predict"
    return base, path


async def _one(session, url: str, body: bytes, headers: dict[str, str], index: int, t0: float) -> Result:
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            status: int | str = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        status = "error"
    return Result(index, start - t0, time.perf_counter() - start, status)


def _session(connections: int, timeout: float):
    """An aiohttp client: its per-request work is a fraction of httpx's, and the load generator shares the
    server's cores, so every cycle it spends is one the server under test does not get."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def closed_loop(base: str, path: str, body: bytes, headers: dict[str, str], concurrency: int,
                      requests: int, timeout: float) -> tuple[list[Result], float]:
    results: list[Result] = []
    counter = iter(range(requests))
    async with _session(concurrency, timeout) as session:
        t0 = time.perf_counter()

        async def client_loop() -> None:
            for index in counter:
                results.append(await _one(session, base + path, body, headers, index, t0))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


async def open_loop(base: str, path: str, body: bytes, headers: dict[str, str], rate: float, duration: float,
                    seed: int, timeout: float, max_outstanding: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    gate = asyncio.Semaphore(max_outstanding)
    async with _session(max_outstanding, timeout) as session:
        t0 = time.perf_counter()

        async def fire(index: int, at: float) -> Result:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                return await _one(session, base + path, body, headers, index, t0)

        results = await asyncio.gather(*(fire(i, at) for i, at in enumerate(arrivals)))
        return list(results), time.perf_counter() - t0


def default_body(base: str, headers: dict[str, str], timeout: float) -> bytes:
    import httpx

    try:
        r = httpx.get(base + "/v1/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise PipeshiftError(f"{base}/v1/models: {e}") from None
    if r.status_code != 200:
        raise PipeshiftError(f"{base}/v1/models answered {r.status_code}: {r.text[:200]}")
    try:
        return json.dumps(r.json()["data"][0]["example"]).encode()
    except (ValueError, KeyError, IndexError, TypeError):
        raise PipeshiftError(f"{base}/v1/models lists no example request: give --body") from None


def _run(main):
    """Run the generator's event loop on uvloop when installed (the ``serve`` extra), as the server
    does: the generator shares its cores with the server it measures, and uvloop's loop is compiled."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the extra is installed by the Makefile
        return asyncio.run(main)
    return uvloop.run(main)


def load(url: str, *, concurrency: int | None = None, requests: int | None = None, rate: float | None = None,
         duration: float | None = None, body: bytes | None = None, content_type: str = "application/json",
         token: str | None = None, timeout: float = 60.0, seed: int = 0, max_outstanding: int = 1024,
         allow_remote: bool = False) -> tuple[Summary, list[Result]]:
    """Run one load test (closed loop with concurrency+requests, open loop with rate+duration)."""
    base, path = endpoint(url, allow_remote)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is None:
        body = default_body(base, headers, timeout)
    headers["Content-Type"] = content_type
    if rate is not None:
        results, seconds = _run(open_loop(base, path, body, headers, rate, duration or 0.0, seed, timeout,
                                          max_outstanding))
    else:
        results, seconds = _run(closed_loop(base, path, body, headers, concurrency or 1, requests or 1,
                                            timeout))
    results.sort(key=lambda r: r.index)
    return summarise(results, seconds), results


def run(args: argparse.Namespace) -> int:
    closed = args.concurrency is not None or args.requests is not None
    opened = args.rate is not None or args.duration is not None
    if closed == opened:
        raise PipeshiftError("give either --concurrency C --requests N (closed loop) or --rate R --duration S")
    if closed and not (args.concurrency and args.requests and args.concurrency > 0 and args.requests > 0):
        raise PipeshiftError("a closed loop needs --concurrency C and --requests N, both >= 1")
    if opened and not (args.rate and args.duration and args.rate > 0 and 0 < args.duration <= 3600):
        raise PipeshiftError("an open loop needs --rate R > 0 and --duration S in (0, 3600]")
    if args.max_outstanding < 1 or not args.timeout > 0:
        raise PipeshiftError("--max-outstanding must be >= 1 and --timeout positive")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise PipeshiftError(f"--token-file {args.token_file}: {e.strerror or e}") from None
    token = token or os.environ.get("PIPESHIFT_SERVE_TOKEN") or None
    body = None
    if args.body:
        try:
            body = Path(args.body).read_bytes()
        except OSError as e:
            raise PipeshiftError(f"--body {args.body}: {e.strerror or e}") from None
    summary, results = load(args.url, concurrency=args.concurrency, requests=args.requests, rate=args.rate,
                            duration=args.duration, body=body, content_type=args.content_type, token=token,
                            timeout=args.timeout, seed=args.seed, max_outstanding=args.max_outstanding,
                            allow_remote=args.allow_remote)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "start_s", "latency_s", "status"])
            for r in results:
                w.writerow([r.index, f"{r.start_s:.6f}", f"{r.latency_s:.6f}", r.status])
    print(json.dumps(summary.to_json()) if args.json else summary.text())
    return 0
