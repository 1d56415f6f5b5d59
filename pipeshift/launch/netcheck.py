"""Measure latency and bandwidth between every pair of ranks, and write them as a planner topology.

Each pair ``(i, j)`` in turn plays ping-pong over torch.distributed's gloo backend — the same
transport the training ranks use — with a small tensor (latency) and a large one (bandwidth)
while every other rank waits at a barrier, so pairs never compete for the link. Figures are the
median over ``--rounds`` after ``--warmup`` discarded rounds: one-way latency is half the small
round trip; bandwidth is the large tensor's bytes over half its round trip.

Run it as ``--local N`` (N processes on this machine), per host with
``--hosts h1,h2 --rank R --dist-addr h1:PORT``, or under ``torchrun`` (``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT``). Rank 0 prints the matrices and writes topology.json::

    {"version": 1, "kind": "pipeshift.topology", "world_size": N,
     "hosts": [host of rank 0, …],
     "latency_s": N×N one-way seconds (0 on the diagonal),
     "bandwidth_bytes_per_s": N×N (null on the diagonal),
     "levels": [{"workers": w, "bandwidth_bytes_per_s": b, "latency_s": l}, …],
     "method": {"backend": "gloo", "small_bytes": …, "large_bytes": …, "rounds": …, "warmup": …,
                "statistic": "median"},
     "torch_version": "…", "created": "ISO time"}

``levels`` is the matrix summarised the way plan.json's ``topology`` and PipeDream's ``-n``/``-b``
flags describe a machine (innermost first: ranks sharing a host, then hosts), taking the worst
link of each level so the planner never assumes more than was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.jsonfile import read_json_object

DEFAULT_DIST_PORT = 29510


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", type=int, metavar="N", help="start N ranks on this machine (127.0.0.1, a free port)")
    where.add_argument("--hosts", metavar="H1,H2,…|FILE",
                       help="one rank per host, in rank order (a comma list, or a file with one host per line)")
    parser.add_argument("--rank", type=int, default=None, help="this machine's rank (with --hosts)")
    parser.add_argument("--dist-addr", default=None, metavar="HOST:PORT",
                        help=f"rank 0's rendezvous address (with --hosts; default first host:{DEFAULT_DIST_PORT})")
    parser.add_argument("-o", "--output", default="topology.json", help="topology file rank 0 writes (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=10, help="timed ping-pongs per pair and size (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed ping-pongs first (default %(default)s)")
    parser.add_argument("--small-bytes", type=int, default=8, help="latency message size (default %(default)s)")
    parser.add_argument("--large-bytes", type=int, default=8 << 20, help="bandwidth message size (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="give up if a peer does not answer within S seconds (default %(default)s)")
    parser.add_argument("--iface", default=None, metavar="NAME",
                        help="network interface for gloo (default: the one that routes to rank 0)")


# -- measuring ------------------------------------------------------------------------
def _ping_pong(tensor, peer: int, lead: bool, warmup: int, rounds: int) -> list[float]:
    import torch.distributed as dist

    times = []
    for r in range(warmup + rounds):
        start = time.perf_counter()
        if lead:
            dist.send(tensor, peer)
            dist.recv(tensor, peer)
        else:
            dist.recv(tensor, peer)
            dist.send(tensor, peer)
        if r >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(rank: int, world_size: int, init_method: str, config: dict[str, Any],
            hosts: list[str] | None = None) -> dict[str, Any] | None:
    """Join the group, measure every pair, and return the topology on rank 0 (None elsewhere)."""
    import torch
    import torch.distributed as dist

    from pipeshift.runtime.distributed import CONNECT_GRACE_S, watchdog

    torch.set_num_threads(1)
    timer = watchdog(config["timeout_s"] + CONNECT_GRACE_S,
                      f"netcheck: error: rank {rank} could not join the group at {init_method} within "
                      f"{config['timeout_s']:g} s (is every rank started? --iface picks the interface)")
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=config["timeout_s"]))
    finally:
        timer.cancel()
    try:
        small = torch.zeros(max(1, math.ceil(config["small_bytes"] / 4)), dtype=torch.float32)
        large = torch.zeros(max(1, math.ceil(config["large_bytes"] / 4)), dtype=torch.float32)
        latency = torch.zeros(world_size, world_size, dtype=torch.float64)
        bandwidth = torch.zeros(world_size, world_size, dtype=torch.float64)
        for i in range(world_size):
            for j in range(i + 1, world_size):
                if rank in (i, j):
                    peer, lead = (j, True) if rank == i else (i, False)
                    t_small = _ping_pong(small, peer, lead, config["warmup"], config["rounds"])
                    t_large = _ping_pong(large, peer, lead, config["warmup"], config["rounds"])
                    if lead:
                        one_way = statistics.median(t_small) / 2
                        latency[i, j] = latency[j, i] = one_way
                        bandwidth[i, j] = bandwidth[j, i] = large.numel() * 4 / (statistics.median(t_large) / 2)
                dist.barrier()
        dist.all_reduce(latency)
        dist.all_reduce(bandwidth)
        names: list[Any] = [None] * world_size
        dist.all_gather_object(names, socket.gethostname())
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    method = {"backend": "gloo", "small_bytes": small.numel() * 4, "large_bytes": large.numel() * 4,
              "rounds": config["rounds"], "warmup": config["warmup"], "statistic": "median"}
    return build_topology(hosts or names, latency.tolist(), bandwidth.tolist(), method, torch.__version__)


def build_topology(hosts: list[str], latency: list[list[float]], bandwidth: list[list[float]],
                   method: dict[str, Any], torch_version: str) -> dict[str, Any]:
    n = len(hosts)
    bw = [[None if i == j else float(bandwidth[i][j]) for j in range(n)] for i in range(n)]
    lat = [[0.0 if i == j else float(latency[i][j]) for j in range(n)] for i in range(n)]
    return {
        "version": 1, "kind": "pipeshift.topology", "world_size": n, "hosts": list(hosts),
        "latency_s": lat, "bandwidth_bytes_per_s": bw, "levels": summarise_levels(hosts, lat, bw),
        "method": method, "torch_version": torch_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summarise_levels(hosts: list[str], latency: list[list[float]], bandwidth: list[list[float | None]]) -> list[dict[str, Any]]:
    """PipeDream-style levels, innermost first; the worst link of each level.

    Ranks on the same host form level 0, hosts level 1; a level of one worker is left out. When
    hosts hold different numbers of ranks there is no uniform hierarchy, so every rank is
    treated as one flat level.
    """
    n = len(hosts)
    per_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        per_host.setdefault(host, []).append(rank)
    sizes = {len(r) for r in per_host.values()}

    def level(workers: int, pairs: list[tuple[int, int]]) -> dict[str, Any]:
        return {"workers": workers, "bandwidth_bytes_per_s": min(bandwidth[i][j] for i, j in pairs),
                "latency_s": max(latency[i][j] for i, j in pairs)}

    all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(sizes) != 1 or len(per_host) == 1:
        return [level(n, all_pairs)] if all_pairs else []
    (size,) = sizes
    levels = []
    if size > 1:
        levels.append(level(size, [(i, j) for i, j in all_pairs if hosts[i] == hosts[j]]))
    levels.append(level(len(per_host), [(i, j) for i, j in all_pairs if hosts[i] != hosts[j]]))
    return levels


# -- reading it back (for the planner) ------------------------------------------------------
def read_topology(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check a topology.json; problems are reported as ``file:line: …``."""
    p = str(path)
    data = read_json_object(p, "topology file", " (`pipeshift netcheck -o` writes one)")
    validate_topology(data, p)
    return data


def validate_topology(data: Any, path: str = "<topology>") -> None:
    def bad(msg: str) -> InputFileError:
        return InputFileError(path, None, msg)

    if not isinstance(data, dict) or data.get("kind") != "pipeshift.topology":
        raise bad("not a pipeshift topology (expected \"kind\": \"pipeshift.topology\")")
    n = data.get("world_size")
    if not isinstance(n, int) or n < 2:
        raise bad("'world_size' must be an integer >= 2")
    hosts = data.get("hosts")
    if not isinstance(hosts, list) or len(hosts) != n or not all(isinstance(h, str) for h in hosts):
        raise bad(f"'hosts' must list {n} host names")
    for name, diagonal in (("latency_s", 0.0), ("bandwidth_bytes_per_s", None)):
        m = data.get(name)
        if not isinstance(m, list) or len(m) != n or not all(isinstance(row, list) and len(row) == n for row in m):
            raise bad(f"'{name}' must be a {n}x{n} matrix")
        for i in range(n):
            for j in range(n):
                v = m[i][j]
                if i == j:
                    if v != diagonal:
                        raise bad(f"'{name}'[{i}][{i}] must be {json.dumps(diagonal)}")
                elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                        name == "bandwidth_bytes_per_s" and v == 0):
                    raise bad(f"'{name}'[{i}][{j}] must be a positive finite number")
    levels = data.get("levels")
    if not isinstance(levels, list) or not all(
            isinstance(lv, dict) and isinstance(lv.get("workers"), int) and lv["workers"] >= 1 for lv in levels):
        raise bad("'levels' must be a list of {workers, bandwidth_bytes_per_s, latency_s}")


# -- printing ---------------------------------------------------------------------------
def format_matrices(topology: dict[str, Any]) -> str:
    n = topology["world_size"]
    hosts = topology["hosts"]
    label = [f"{r}:{hosts[r]}" for r in range(n)]
    width = max(12, *(len(x) for x in label))

    def table(title: str, matrix: list[list[Any]], fmt) -> list[str]:
        rows = [title, " " * width + "".join(x.rjust(width) for x in label)]
        for i in range(n):
            rows.append(label[i].ljust(width) + "".join(fmt(v).rjust(width) for v in matrix[i]))
        return rows

    lines = table("one-way latency (us):", topology["latency_s"], lambda v: "-" if not v else f"{v * 1e6:.1f}")
    lines += [""] + table("bandwidth (MB/s):", topology["bandwidth_bytes_per_s"],
                          lambda v: "-" if v is None else f"{v / 1e6:.1f}")
    for k, lv in enumerate(topology["levels"]):
        lines.append(f"level {k}: {lv['workers']} workers, {lv['bandwidth_bytes_per_s'] / 1e6:.1f} MB/s, "
                     f"{lv['latency_s'] * 1e6:.1f} us")
    return "\n".join(lines)


def _write(topology: dict[str, Any], output: str) -> None:
    try:
        Path(output).write_text(json.dumps(topology, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise PipeshiftError(f"cannot write {output}: {e.strerror or e}") from None


# -- running ----------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_rank0(host: str, port: int, timeout_s: float) -> None:
    """Wait until rank 0's rendezvous port accepts connections, with a clear error if it never does.

    torch's own store client retries too, but reports failure as a C++ stack dump per attempt.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=min(2.0, timeout_s)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise PipeshiftError(f"netcheck: rank 0 at {host}:{port} is not reachable after {timeout_s:.0f} s "
                                     f"({e.strerror or e}); start rank 0 first, or check --dist-addr") from None
            time.sleep(0.2)


def _spawned(rank: int, world_size: int, init_method: str, config: dict[str, Any], output: str) -> None:
    topology = measure(rank, world_size, init_method, config)
    if topology is not None:
        _write(topology, output)


def run_local(n: int, config: dict[str, Any], output: str) -> dict[str, Any]:
    """Start ``n`` ranks on 127.0.0.1 with torch.multiprocessing; return what rank 0 wrote."""
    import torch.multiprocessing as mp

    if n < 2:
        raise PipeshiftError("--local needs at least 2 ranks")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    set_ifname = "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists()
    if set_ifname:  # keep gloo on loopback whatever the hostname resolves to (children inherit it)
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        context = mp.start_processes(_spawned, args=(n, init_method, config, output), nprocs=n, join=False,
                                     start_method="spawn")
    finally:
        if set_ifname:
            del os.environ["GLOO_SOCKET_IFNAME"]
    deadline = time.monotonic() + config["timeout_s"] + 60  # + process start-up
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise PipeshiftError(f"netcheck: ranks did not finish within {config['timeout_s'] + 60:.0f} s")
    except mp.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        raise PipeshiftError(f"netcheck: a rank failed: {last}") from None
    except mp.ProcessExitedException as e:
        raise PipeshiftError(f"netcheck: a rank died: {e}") from None
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return read_topology(output)


def _parse_hosts(text: str) -> list[str]:
    if os.path.isfile(text):
        lines = Path(text).read_text(encoding="utf-8").splitlines()
        hosts = [line.split("#")[0].strip() for line in lines]
    else:
        hosts = [h.strip() for h in text.split(",")]
    hosts = [h for h in hosts if h]
    if len(hosts) < 2:
        raise PipeshiftError(f"--hosts needs at least 2 hosts, got {hosts}")
    return hosts


def run(args: argparse.Namespace) -> int:
    for name in ("rounds", "small_bytes", "large_bytes"):
        if getattr(args, name) < 1:
            raise PipeshiftError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.timeout <= 0:
        raise PipeshiftError("--warmup must be >= 0 and --timeout positive")
    config = {"rounds": args.rounds, "warmup": args.warmup, "small_bytes": args.small_bytes,
              "large_bytes": args.large_bytes, "timeout_s": args.timeout}
    if args.local is not None:
        topology = run_local(args.local, config, args.output)
    else:
        hosts = _parse_hosts(args.hosts) if args.hosts else None
        if hosts is not None and args.rank is None:
            from pipeshift.launch.protocol import parse_address

            addr = args.dist_addr or f"{hosts[0]}:{DEFAULT_DIST_PORT}"
            parse_address(addr)
            print("run on each host (rank 0 writes the topology):")
            for r, h in enumerate(hosts):
                print(f"  {h}: pipeshift netcheck --hosts {','.join(hosts)} --rank {r} --dist-addr {addr} -o {args.output}")
            return 0
        if hosts is not None:
            from pipeshift.launch.protocol import parse_address

            if not 0 <= args.rank < len(hosts):
                raise PipeshiftError(f"--rank {args.rank} is not in 0..{len(hosts) - 1}")
            host, port = parse_address(args.dist_addr or f"{hosts[0]}:{DEFAULT_DIST_PORT}", DEFAULT_DIST_PORT)
            rank, world, init_method = args.rank, len(hosts), f"tcp://{host}:{port}"
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world, init_method = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://"
        else:
            raise PipeshiftError("say where to run: --local N, --hosts H1,H2 [--rank R], or under torchrun")
        from pipeshift.runtime import netif

        rendezvous = host if hosts is not None else os.environ.get("MASTER_ADDR", "127.0.0.1")
        choice = netif.choose(rendezvous, args.iface)
        netif.apply(choice)
        if choice.iface not in (None, "lo") or args.iface:
            print(f"netcheck rank {rank}: {choice.describe()}", file=sys.stderr)
        if hosts is not None and rank > 0:
            wait_for_rank0(host, port, config["timeout_s"])
        try:
            topology = measure(rank, world, init_method, config, hosts)
        except RuntimeError as e:  # gloo timeouts and refused connections
            raise PipeshiftError(f"netcheck rank {rank}: {str(e).splitlines()[0]}") from None
        if topology is None:
            print(f"netcheck rank {rank}: done (rank 0 writes {args.output})")
            return 0
        _write(topology, args.output)
    print(format_matrices(topology))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
