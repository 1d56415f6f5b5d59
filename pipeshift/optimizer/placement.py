"""Rank placement on a measured link matrix: which worker runs which stage, chosen with the split.

A hierarchy of levels (``-n 4 4 -b …``) says every link of a level is alike. A matrix measured by
``pipeshift netcheck`` says more: one machine may sit behind a slow link while the others are
well connected. Summarised to its worst link, one slow machine makes every cut slow; used whole,
the slow link can carry the pipeline's smallest activation — or carry nothing, when
``--use-fewer-machines`` lets the planner leave that machine out.

This module solves the straight pipeline (one worker per stage) exactly over both the split and
the placement, with a dynamic program over *which workers are used so far* and *which worker
runs the last stage*::

    B[j, U, h] = best pace of a pipeline covering state j on the workers of set U, last stage on h

    B[j, U ∪ {h'}, h'] = min over k ∈ pred(j), h ∈ U:
                         max(B[k, U, h], link(h, h', cut after k), compute(k+1 .. j) / speed(h'))

The link of a cut is the time of the activations forward plus the gradients back over the
measured pair (latency + bytes / bandwidth each way, both directions of the matrix), as in
:mod:`pipeshift.optimizer.cost`; a link is a resource of its own, so it bounds the pace like a
stage does. For a split state k the inner minimum over h does not depend on the end state j, so
each sweep step is one (sets × workers × workers) reduction plus one broadcast over the
successors — numpy throughout, no Python loop over sets, workers or successors. The table has
2^N · N entries per state, so placement is searched for up to :data:`MAX_WORKERS` workers.

Memory is checked per stage as the pipeshift cost model does, with the stages after it counted
as every worker not used yet: exact when every worker runs a stage, a safe over-estimate when
some stay idle.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeshift.optimizer import cost as ps_cost

MAX_WORKERS = 10


@dataclasses.dataclass(frozen=True)
class Links:
    """Per worker pair: bandwidth (bytes/s) and one-way latency (s); the diagonal is unused."""

    bandwidth: np.ndarray  # (N, N)
    latency: np.ndarray  # (N, N)

    @property
    def num_workers(self) -> int:
        return int(self.bandwidth.shape[0])

    def cut_time(self, nbytes: np.ndarray | float) -> np.ndarray:
        """(..., N, N): seconds per microbatch to send ``nbytes`` from h to h' and its gradient back."""
        b = np.asarray(nbytes, dtype=np.float64)[..., None, None]
        bw, lat = self.bandwidth, self.latency
        t = lat + lat.T + b / bw + b / bw.T
        n = self.num_workers
        return np.where(np.eye(n, dtype=bool), np.inf, t)


@dataclasses.dataclass
class PlacedStage:
    row: int  # the stage runs states (row-1, end]
    end: int
    worker: int
    value: float  # its pace: max(compute, the link of the cut before it)
    link_from: int | None  # the worker the cut before it comes from


@dataclasses.dataclass
class Placement:
    value: float
    stages: list[PlacedStage]


def estimated_work(num_states: int, num_workers: int) -> float:
    """Element operations of :func:`solve`, to keep it inside the planner's work budget."""
    m = 1 << num_workers
    return num_states * (m * num_workers * num_workers + num_states / 2 * m * num_workers / 2)


def solve(
    comp: np.ndarray,
    params: np.ndarray,
    stash: np.ndarray,
    cut: np.ndarray,
    successors: list[np.ndarray],
    links: Links,
    speeds: np.ndarray,
    schedule: ps_cost.Schedule,
    memory: ps_cost.Memory,
    fewer: bool,
    extra: np.ndarray | None = None,
) -> Placement | None:
    """The best straight pipeline and placement; None when none exists.

    ``comp``/``params``/``stash`` are (S+1, S) range sums (row r: after state r-1; inf/0 where
    illegal), ``cut[k]`` the bytes crossing the cut after state k, ``speeds`` one per worker;
    ``extra`` (S+1, S): seconds a stage pays besides its compute, whatever its worker's speed
    (the all-reduce of tied parameters it shares with other stages).
    """
    add = extra if extra is not None else np.zeros_like(comp)
    S = len(successors)
    N = links.num_workers
    M = 1 << N
    bit = 1 << np.arange(N)
    popcount = np.array([bin(u).count("1") for u in range(M)])
    speeds = np.asarray(speeds, dtype=np.float64)

    def fits(rows: np.ndarray, js: np.ndarray, before: np.ndarray) -> np.ndarray:
        """(len(js), len(before)) for one row, or broadcast: the stage fits with ``before`` stages ahead."""
        if memory.limit is None:
            return np.ones((len(js), len(before)), dtype=bool)
        downstream = np.maximum(N - 1 - before, 0).astype(np.float64)
        in_flight = schedule.in_flight(downstream, 1.0)
        need = memory.bytes(params[rows, js][:, None], stash[rows, js][:, None], in_flight[None, :],
                            schedule.weight_versions(in_flight)[None, :])
        return need <= memory.limit

    B = np.full((S, M, N), np.inf)
    came_k = np.full((S, M, N), -1, dtype=np.int32)
    came_h = np.full((S, M, N), -1, dtype=np.int8)
    first = comp[0][:, None] / speeds[None, :] + add[0][:, None]  # (S, N): the first stage, on one worker
    ok = fits(np.zeros(S, dtype=np.int64), np.arange(S), np.zeros(1, dtype=np.int64))[:, 0]
    B[:, bit, np.arange(N)] = np.where(ok[:, None], first, np.inf)
    # every (used set, next worker) pair with the worker not yet in the set
    pair_u, pair_h = np.nonzero((np.arange(M)[:, None] & bit[None, :]) == 0)
    pair_target = pair_u | bit[pair_h]
    pair_before = popcount[pair_u]
    for k in range(S):
        js = successors[k]
        X = B[k]  # (M, N)
        if js.size == 0 or not np.isfinite(X).any():
            continue
        L = links.cut_time(cut[k])  # (N, N)
        via = np.maximum(X[:, :, None], L[None, :, :])  # (M, h, h')
        best_h = via.argmin(axis=1)  # (M, h')
        Y = np.take_along_axis(via, best_h[:, None, :], axis=1)[:, 0, :]
        y = Y[pair_u, pair_h]  # (P,)
        live = np.isfinite(y)
        if not live.any():
            continue
        pu, ph, pt, pb, y = pair_u[live], pair_h[live], pair_target[live], pair_before[live], y[live]
        stage = comp[k + 1, js][:, None] / speeds[ph][None, :] + add[k + 1, js][:, None]  # (J, P)
        new = np.maximum(y[None, :], stage)
        if memory.limit is not None:
            before = np.unique(pb)
            table = fits(np.full(js.size, k + 1), js, before)  # (J, len(before))
            new = np.where(table[:, np.searchsorted(before, pb)], new, np.inf)
        cur = B[js[:, None], pt[None, :], ph[None, :]]
        better = new < cur
        if not better.any():
            continue
        jj, pp = np.nonzero(better)
        B[js[jj], pt[pp], ph[pp]] = new[jj, pp]
        came_k[js[jj], pt[pp], ph[pp]] = k
        came_h[js[jj], pt[pp], ph[pp]] = best_h[pu[pp], ph[pp]]
    final = B[S - 1]
    if not fewer:
        final = np.where(np.arange(M)[:, None] == M - 1, final, np.inf)
    flat = int(np.argmin(final))
    u, h = divmod(flat, N)
    value = float(final[u, h])
    if not np.isfinite(value):
        return None
    stages: list[PlacedStage] = []
    j = S - 1
    while True:
        k = int(came_k[j, u, h])
        if k < 0:
            stages.append(PlacedStage(0, j, h, float(comp[0, j] / speeds[h] + add[0, j]), None))
            break
        prev = int(came_h[j, u, h])
        pace = max(float(comp[k + 1, j] / speeds[h] + add[k + 1, j]), float(links.cut_time(cut[k])[prev, h]))
        stages.append(PlacedStage(k + 1, j, h, pace, prev))
        j, u, h = k, u & ~(1 << h), prev
    stages.reverse()
    return Placement(value, stages)
