"""Joining the process group: under torchrun, with explicit ranks, or alone.

* **torchrun** (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment,
  single node or multi-node through its c10d rendezvous): ``env://``.
* **explicit** (``--rank R --world-size W --dist-addr HOST:PORT``, the seed's per-machine
  launch): rank 0 hosts the rendezvous store on exactly HOST:PORT. torch's own ``tcp://``
  store listens on every interface whatever host it is given, which would expose a
  ``127.0.0.1`` job to the network; so rank 0 binds the listening socket itself and hands it over.
* **alone**: a one-rank group on a free port of 127.0.0.1, for single-stage packages.

The backend is NCCL when the ranks use CUDA devices and gloo otherwise (``--backend``
overrides). The group's timeout is the run's ``--timeout``, so even a collective the runtime
does not poll itself gives up on a dead peer in bounded time. Joining is bounded too: the
backends' socket interface is the one that routes to the rendezvous host
(:mod:`pipeshift.runtime.netif`, ``--iface`` to override), and a watchdog ends a rank whose
connect outlives ``--timeout`` (gloo's full-mesh connect does not always honour it) with one line
naming the address and the interface, instead of a silent hang.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # public, but not in its __all__

from pipeshift.errors import PipeshiftError


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    how: str  # "torchrun", "explicit" or "alone"
    iface: str | None = None  # the socket interface the backend was told to use


def parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6)."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PipeshiftError(f"--dist-addr {text!r}: expected HOST:PORT, e.g. 10.0.0.1:29500")
    return host, int(port)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise PipeshiftError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device == "cpu":
        return torch.device("cpu")
    raise PipeshiftError(f"--device {device!r}: one of auto, cpu, cuda")


CONNECT_GRACE_S = 10.0  # beyond --timeout, before the watchdog ends a rank stuck joining the group


def watchdog(seconds: float, message: str) -> threading.Timer:
    """End the process with ``message`` unless cancelled within ``seconds``."""
    def fire() -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def init_distributed(*, rank: int | None, world_size: int | None, dist_addr: str | None, backend: str = "auto",
                     device: str = "auto", timeout_s: float = 60.0, expected_world: int | None = None,
                     iface: str | None = None, who: str = "pipeshift train") -> DistInfo:
    explicit = [x is not None for x in (rank, world_size, dist_addr)]
    if any(explicit):
        if rank is None or world_size is None or dist_addr is None:
            raise PipeshiftError("explicit launch needs all of --rank, --world-size and --dist-addr")
        if world_size < 1 or not 0 <= rank < world_size:
            raise PipeshiftError(f"--rank {rank} --world-size {world_size}: need 0 <= rank < world size")
        host, port = parse_addr(dist_addr)
        init_method, how, local_rank = None, "explicit", int(os.environ.get("LOCAL_RANK", 0))
        where, rendezvous = f"{host}:{port}", host
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        except ValueError:
            raise PipeshiftError("RANK/WORLD_SIZE/LOCAL_RANK in the environment are not integers") from None
        init_method, how = "env://", "torchrun"
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        rendezvous = os.environ.get("MASTER_ADDR", "127.0.0.1")
    else:
        if expected_world not in (None, 1):
            raise PipeshiftError(
                f"this package needs {expected_world} ranks: run it with `pipeshift launch --local {expected_world} …`, "
                "under torchrun, or with --rank/--world-size/--dist-addr on each rank"
            )
        rank, world_size, local_rank, how = 0, 1, 0, "alone"
        host, port, init_method = "127.0.0.1", 0, None
        where, rendezvous = "127.0.0.1", "127.0.0.1"
    dev = choose_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise PipeshiftError(f"--backend {backend!r}: one of auto, gloo, nccl")
    if backend == "nccl" and dev.type != "cuda":
        raise PipeshiftError("--backend nccl needs CUDA devices (use gloo on CPU)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    from pipeshift.runtime import netif

    one_machine = how != "explicit" and os.environ.get("LOCAL_WORLD_SIZE", str(world_size)) == str(world_size)
    choice = netif.choose(rendezvous, iface, one_machine=one_machine)
    netif.apply(choice)
    if choice.iface not in (None, "lo") or iface:
        print(f"{who}: rank {rank}: {choice.describe()}", file=sys.stderr, flush=True)
    kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
    over = f" over {choice.iface}" if choice.iface else ""
    failed = (f"rank {rank} of {world_size} could not join the process group at {where}{over} "
              f"within {timeout_s:g} s")
    timer = watchdog(timeout_s + CONNECT_GRACE_S,
                      f"{who}: error: {failed} (a peer never connected: is every rank started, and does "
                      f"{where} reach this machine? --iface picks the interface)")
    try:
        if init_method is None:
            store = _store(host, port, rank, world_size, timedelta(seconds=timeout_s))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s), **kwargs)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, ValueError, dist.DistError) as e:
        text = " ".join(str(e).split())[:300]
        raise PipeshiftError(f"{failed} ({text})") from None
    finally:
        timer.cancel()
    return DistInfo(rank, world_size, local_rank, backend, dev, how, choice.iface)


def _store(host: str, port: int, rank: int, world_size: int, timeout: timedelta) -> TCPStore:
    """The rendezvous store, served by rank 0 on exactly ``host:port`` (port 0: any free one)."""
    if rank != 0:
        return TCPStore(host, port, world_size, False, timeout=timeout)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(max(128, world_size))
    except OSError as e:
        raise PipeshiftError(f"rank 0 cannot listen on {host}:{port} for the other ranks: {e.strerror or e}") from None
    # the store owns the socket from here on; this process keeps it open until it exits
    _listeners.append(listener)
    return TCPStore(host, listener.getsockname()[1], world_size, True, timeout=timeout,
                         master_listen_fd=listener.fileno())


_listeners: list[socket.socket] = []
