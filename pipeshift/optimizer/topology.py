"""The machines a plan runs on: a hierarchy of levels, innermost first.

PipeDream describes a cluster as ``-n 4 4 -b 10e9 1.25e9``: level 0 is 4 workers (GPUs) joined by
10 GB/s links inside a machine, level 1 is 4 such machines joined by 1.25 GB/s. The planner
splits the model across the outermost level first; every group of the level below is one
worker of the level above. :class:`Topology` holds exactly that, plus what PipeDream cannot say:
a per-message latency per level and a relative speed per worker (``--worker-speeds``).

A topology can also come from a file (``--topology FILE``), for example the JSON written by
``pipeshift netcheck``. Two shapes are accepted::

    {"levels": [{"workers": 4, "bandwidth_bytes_per_s": 1e10, "latency_s": 5e-6},
                {"workers": 2, "bandwidth_bytes_per_s": 1.25e9, "latency_s": 5e-5}],
     "worker_speeds": [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]}

    {"hosts": ["a", "b"],
     "bandwidth_bytes_per_s": [[0, 1.2e9], [1.1e9, 0]],   # measured host-to-host matrix
     "latency_s": [[0, 4e-5], [5e-5, 0]],
     "workers_per_host": 4,                                 # optional, default 1
     "intra_host": {"bandwidth_bytes_per_s": 1e10, "latency_s": 5e-6}}   # needed if workers_per_host > 1

The JSON ``pipeshift netcheck`` writes is the second shape with one entry per *worker* (rank):
``hosts`` names each worker's machine (repeats allowed), the matrices are worker × worker, and
its ``levels`` summarise them.

A matrix is kept whole (:attr:`Topology.links`, worker × worker; a host matrix is expanded with
``intra_host`` for the pairs inside a host): the planner places stages on workers so that a slow
link carries the smallest activation or nothing (:mod:`pipeshift.optimizer.placement`). It is
also summarised to levels — the given ``levels``, or one level of hosts at its slowest link and
largest latency (off the diagonal) — for the hierarchical dynamic program, whose cost model has
one bandwidth per level; the summary never assumes more than was measured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.jsonfile import read_json_object
from pipeshift.optimizer.placement import Links

DEFAULT_BANDWIDTH = 1e9  # PipeDream's default for -b


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of the hierarchy: ``workers`` units joined by links of this bandwidth/latency."""

    workers: int
    bandwidth: float
    latency: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"workers": self.workers, "bandwidth_bytes_per_s": self.bandwidth, "latency_s": self.latency}


@dataclasses.dataclass(frozen=True)
class Topology:
    """Levels innermost first; ``speeds`` is one relative speed per worker (machine-major order)."""

    levels: tuple[Level, ...]
    speeds: tuple[float, ...] | None = None
    links: Links | None = dataclasses.field(default=None, compare=False)  # measured, worker × worker
    hosts: tuple[str, ...] | None = None  # the machine of each worker, where known

    @property
    def num_workers(self) -> int:
        return math.prod(level.workers for level in self.levels)

    def stride(self, level: int) -> int:
        """How many workers one unit of ``level`` holds (1 for level 0)."""
        return math.prod(lv.workers for lv in self.levels[:level])

    def speed_of(self, worker: int) -> float:
        return 1.0 if self.speeds is None else self.speeds[worker]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"levels": [lv.to_json() for lv in self.levels]}
        if self.speeds is not None:
            out["worker_speeds"] = list(self.speeds)
        if self.hosts is not None:
            out["hosts"] = list(self.hosts)
        if self.links is not None:
            n = self.links.num_workers
            out["bandwidth_bytes_per_s"] = [[None if i == j else float(self.links.bandwidth[i, j]) for j in range(n)]
                                            for i in range(n)]
            out["latency_s"] = [[0.0 if i == j else float(self.links.latency[i, j]) for j in range(n)]
                                for i in range(n)]
        return out

    def worker_name(self, worker: int) -> str:
        return f"{worker}" if self.hosts is None else f"{worker}:{self.hosts[worker]}"


def _positive(value: Any, what: str, integer: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise PipeshiftError(f"{what} must be {kind}, got {value!r}")
    return float(value)


def from_flags(
    num_workers: Sequence[int] | None,
    bandwidths: Sequence[float] | None,
    latencies: Sequence[float] | None = None,
    speeds: Sequence[float] | None = None,
) -> Topology:
    """PipeDream's ``-n``/``-b`` lists (innermost first), plus optional latencies and speeds."""
    if not num_workers:
        raise PipeshiftError("give the number of workers per level, e.g. -n 4 or -n 4 4 (innermost first)")
    counts = [int(_positive(n, f"-n value {n!r}", integer=True)) for n in num_workers]
    if bandwidths is None:
        if len(counts) > 1:
            raise PipeshiftError(f"-n has {len(counts)} levels: give one bandwidth per level with -b (innermost first)")
        bandwidths = [DEFAULT_BANDWIDTH]
    if len(bandwidths) != len(counts):
        raise PipeshiftError(
            f"-n has {len(counts)} levels but -b has {len(bandwidths)} bandwidths; give one bandwidth per level"
        )
    bws = [float(_positive(b, f"-b value {b!r} (bytes/s)")) for b in bandwidths]
    if latencies is None:
        lats = [0.0] * len(counts)
    else:
        if len(latencies) != len(counts):
            raise PipeshiftError(f"-n has {len(counts)} levels but --latencies has {len(latencies)} values")
        lats = []
        for x in latencies:
            if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0):
                raise PipeshiftError(f"--latencies value {x!r} must be a non-negative number of seconds")
            lats.append(float(x))
    topo = Topology(tuple(Level(n, b, lt) for n, b, lt in zip(counts, bws, lats)))
    return with_speeds(topo, speeds)


def with_speeds(topo: Topology, speeds: Sequence[float] | None) -> Topology:
    if speeds is None:
        return topo
    if len(speeds) == 1:
        speeds = list(speeds) * topo.num_workers
    if len(speeds) != topo.num_workers:
        raise PipeshiftError(
            f"--worker-speeds has {len(speeds)} values but the topology has {topo.num_workers} workers"
        )
    vals = tuple(float(_positive(s, f"worker speed {s!r}")) for s in speeds)
    return dataclasses.replace(topo, speeds=vals)


def read_topology(path: str | Path) -> Topology:
    """Parse a topology JSON file (either shape in the module docstring)."""
    p = Path(path)
    data = read_json_object(p, "topology file", " (`pipeshift netcheck -o` writes one)")
    try:
        return parse_topology(data)
    except PipeshiftError as e:
        raise InputFileError(str(p), None, str(e)) from None


def _level(obj: Any, where: str) -> Level:
    if not isinstance(obj, dict):
        raise PipeshiftError(f"{where} must be an object with 'workers' and 'bandwidth_bytes_per_s'")
    workers = int(_positive(obj.get("workers"), f"{where}.workers", integer=True))
    bw = float(_positive(obj.get("bandwidth_bytes_per_s"), f"{where}.bandwidth_bytes_per_s"))
    lat = obj.get("latency_s", 0.0)
    if not (isinstance(lat, (int, float)) and not isinstance(lat, bool) and math.isfinite(lat) and lat >= 0):
        raise PipeshiftError(f"{where}.latency_s must be a non-negative number, got {lat!r}")
    return Level(workers, bw, float(lat))


def _matrix(obj: Any, n: int, what: str, positive: bool) -> list[list[float]]:
    if not isinstance(obj, list) or len(obj) != n or not all(isinstance(r, list) and len(r) == n for r in obj):
        raise PipeshiftError(f"'{what}' must be a {n}x{n} matrix (one row per host)")
    for i, row in enumerate(obj):
        for j, v in enumerate(row):
            if i == j:
                continue
            good = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not good or v < 0 or (positive and v == 0):
                raise PipeshiftError(f"'{what}'[{i}][{j}] = {v!r} is not a {'positive' if positive else 'non-negative'} number")
    return obj


def _expand(host_matrix: list[list[float]], per_host: int, intra: float) -> np.ndarray:
    """A host × host matrix as worker × worker (machine-major); pairs inside a host get ``intra``."""
    m = np.array([[0.0 if v is None else float(v) for v in row] for row in host_matrix], dtype=np.float64)
    out = np.kron(m, np.ones((per_host, per_host)))
    host = np.arange(out.shape[0]) // per_host
    return np.where(host[:, None] == host[None, :], intra, out)


def parse_topology(data: Any) -> Topology:
    if not isinstance(data, dict):
        raise PipeshiftError("a topology must be a JSON object with 'levels' or a 'hosts' matrix")
    levels: tuple[Level, ...] | None = None
    if "levels" in data:
        raw = data["levels"]
        if not isinstance(raw, list) or (not raw and "hosts" not in data):
            raise PipeshiftError("'levels' must be a non-empty list, innermost level first")
        levels = tuple(_level(lv, f"levels[{i}]") for i, lv in enumerate(raw)) or None
    links = None
    names = None
    if "hosts" in data and "bandwidth_bytes_per_s" in data:
        hosts = data["hosts"]
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise PipeshiftError("'hosts' must be a non-empty list of host names")
        n = len(hosts)
        bw = _matrix(data.get("bandwidth_bytes_per_s"), n, "bandwidth_bytes_per_s", positive=True)
        lat = _matrix(data.get("latency_s", [[0.0] * n for _ in range(n)]), n, "latency_s", positive=False)
        off = [(i, j) for i in range(n) for j in range(n) if i != j]
        host_bw = min((bw[i][j] for i, j in off), default=DEFAULT_BANDWIDTH)
        host_lat = max((lat[i][j] for i, j in off), default=0.0)
        per_host = int(_positive(data.get("workers_per_host", 1), "workers_per_host", integer=True))
        intra_level = None
        if per_host > 1:
            intra = data.get("intra_host")
            if not isinstance(intra, dict):
                raise PipeshiftError("workers_per_host > 1 needs 'intra_host': {bandwidth_bytes_per_s, latency_s}")
            intra_level = _level({"workers": per_host, **intra}, "intra_host")
        if levels is None:
            levels = (() if intra_level is None else (intra_level,)) + (Level(n, float(host_bw), float(host_lat)),)
        if n * per_host > 1:
            links = Links(_expand(bw, per_host, intra_level.bandwidth if intra_level else np.inf),
                          _expand(lat, per_host, intra_level.latency if intra_level else 0.0))
            names = tuple(h for h in hosts for _ in range(per_host))
    elif "hosts" in data and levels is None:
        raise PipeshiftError("a 'hosts' topology needs its 'bandwidth_bytes_per_s' matrix")
    if levels is None:
        raise PipeshiftError("a topology needs 'levels' (list, innermost first) or 'hosts' with a bandwidth matrix")
    topo = Topology(levels, links=links, hosts=names)
    if links is not None and links.num_workers != topo.num_workers:
        raise PipeshiftError(f"'levels' describe {topo.num_workers} workers but the matrix has {links.num_workers}")
    speeds = data.get("worker_speeds")
    if speeds is not None:
        if not isinstance(speeds, list):
            raise PipeshiftError("'worker_speeds' must be a list of numbers")
        topo = with_speeds(topo, speeds)
    return topo
