"""The pipeline dynamic program of one topology level, vectorised with numpy.

``A[r, j, m]`` is the best time per microbatch of a pipeline that runs the stage range
(row r, state j) — the nodes of state j not in state r-1, row 0 meaning "from the start" — on
the first m+1 workers (slots) of this level. Either the range is one stage replicated over all
m+1 slots (``costs.single``), or a shorter pipeline A[r, k, m-m'] is followed by a last stage
(k+1 .. j) on m' slots (``costs.last``), and the pipeline runs at the pace of its slowest part::

    A[r, j, m] = min( single(r, j, m),
                      min_{k ∈ pred(j), 1 ≤ m' ≤ m}  max(A[r, k, m-m'], last(k, j, m, m')) )

(optionally also ``A[r, j, m-1]``: leave a slot idle). Since m' ≥ 1, row m only reads rows
< m, and A[·, k, ·] is final once every split before k has been applied. So the sweep runs over
the split state k in topological order and, for each k, updates every (row, later state,
slot count) at once: one broadcast ``max`` over (rows × successors × (m, m') pairs) and a
segmented ``min`` over m' — no Python loop over rows, successors or slot counts.

The outermost level only needs row 0; inner levels fill every row, because the level above
asks for the inner optimum of every range it considers. Best splits are not stored: the few
entries on the optimal path are re-derived afterwards (:func:`trace`) by recomputing their
candidates, which keeps the sweep lean.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # cap on one broadcast temporary (32 MiB of float64)


class LevelCosts(Protocol):
    """What a cost model supplies for one level (see :mod:`pipeshift.optimizer.pipedream_cost`)."""

    num_slots: int
    pair_m: np.ndarray  # (P,) total slot index m of each (m, m') pair, sorted by m
    pair_mp: np.ndarray  # (P,) slots m' of the last stage

    def single(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), S, N): the range as one stage replicated over slots 0..m; inf if illegal."""
        ...

    def last(self, ks: np.ndarray, js: np.ndarray) -> np.ndarray:
        """(len(ks), len(js), P): last stage (k+1 .. j) on m' slots ending at slot m, with its links.

        If the costs object has ``by_mp = True``, the cost does not depend on m and the last axis
        is m' - 1 instead (length N-1 or 1), which saves materialising every (m, m') pair.
        """
        ...

    def charge(self, value: float, row: int, end: int, slots: int, first: bool) -> float:
        """A stage's time (``value``, from an inner level) as this level charges it."""
        ...

    def best_tp(self, row: int, end: int, slots: int, first: bool) -> int:
        """The tensor-parallel degree the stage's optimum uses (1 without TP)."""
        ...


def slot_pairs(N: int, straight: bool) -> tuple[np.ndarray, np.ndarray]:
    """:attr:`LevelCosts.pair_m` and ``pair_mp`` for N slots: every (m, m') with 1 ≤ m' ≤ m < N.

    Sorted by m, as the sweep expects; ``straight`` (no replicated stages) keeps m' = 1 only.
    """
    ms, mps = [], []
    for m in range(1, N):
        for mp in range(1, 2 if straight else m + 1):
            ms.append(m)
            mps.append(mp)
    return np.array(ms, dtype=np.int64), np.array(mps, dtype=np.int64)


def pair_costs(costs: LevelCosts, C: np.ndarray) -> np.ndarray:
    """``costs.last`` output indexed by (m, m') pair, whatever its native layout."""
    return C[..., costs.pair_mp - 1] if getattr(costs, "by_mp", False) else C


@dataclasses.dataclass
class LevelSolution:
    table: np.ndarray  # A[r, j, m], rows 0..R-1
    fewer: bool

    def value(self, r: int, j: int, m: int) -> float:
        return float(self.table[r, j, m])


def solve_level(costs: LevelCosts, successors: list[np.ndarray], all_rows: bool, fewer: bool) -> LevelSolution:
    """Fill A for every row (``all_rows``) or row 0 only."""
    S = len(successors)
    N = costs.num_slots
    R = S + 1 if all_rows else 1
    # Work on T[j, m, r] (state, slots, row): the successors of a split are gathered and scattered
    # as whole (slots × rows) blocks, and (m, m') pairs sit on the leading axis of the temporaries
    # so the segmented min over m' reduces contiguous slabs. A[r, j, m] is a transposed view.
    T = np.ascontiguousarray(np.asarray(costs.single(np.arange(R)), dtype=np.float64).transpose(1, 2, 0))
    pm, pmp = costs.pair_m, costs.pair_mp
    by_mp = bool(getattr(costs, "by_mp", False))
    if N > 1 and pm.size:
        src = pm - pmp
        starts = np.flatnonzero(np.r_[True, pm[1:] != pm[:-1]])
        ms = pm[starts]  # the slot count each segment of pairs belongs to
        contiguous_ms = bool(np.array_equal(ms, np.arange(1, N)))
    # Last-stage costs do not depend on the table: get them for a block of split states at once.
    block = max(1, CHUNK_ELEMENTS // max(1, S * max(pm.size, 1)))
    C_block, block_lo = None, -1
    for k in range(S):
        if fewer and k >= 1:
            upto = min(k, R)  # rows r < k: the diagonal (r == k) keeps its single-stage value
            np.minimum.accumulate(T[k, :, :upto], axis=0, out=T[k, :, :upto])
        js = successors[k]
        if N == 1 or js.size == 0 or not pm.size:
            continue
        nrows = min(k + 1, R)
        col = T[k, :, :nrows]  # (N, rows)
        live = np.flatnonzero(np.isfinite(col).any(axis=0))
        if live.size == 0:
            continue
        if C_block is None or k >= block_lo + C_block.shape[0]:
            block_lo = k
            ks = np.arange(k, min(S, k + block))
            C_block = costs.last(ks, np.arange(k + 1, S))  # (K, S-k-1, P or N-1)
        C = C_block[k - block_lo][js - (block_lo + 1)]  # (J, P) or (J, N-1) by m'
        Ct = (C[:, pmp - 1] if by_mp else C).T[:, :, None]  # (P, J, 1)
        lo_row, hi_row = int(live[0]), int(live[-1]) + 1
        step = max(1, CHUNK_ELEMENTS // max(1, js.size * pm.size))
        for lo in range(lo_row, hi_row, step):
            hi = min(hi_row, lo + step)
            val = np.maximum(col[src, None, lo:hi], Ct)  # (P, J, rows)
            best = np.minimum.reduceat(val, starts, axis=0)  # (len(ms), J, rows)
            if contiguous_ms:
                cur = T[js, 1:, lo:hi]
                T[js, 1:, lo:hi] = np.minimum(cur, best.transpose(1, 0, 2))
            else:
                where = (js[:, None, None], ms[None, :, None], np.arange(lo, hi)[None, None, :])
                T[where] = np.minimum(T[where], best.transpose(1, 0, 2))
    return LevelSolution(T.transpose(2, 0, 1), fewer)


@dataclasses.dataclass(frozen=True)
class TracedStage:
    row: int  # the stage runs states (row-1, end]
    end: int
    slot_start: int
    slots: int
    value: float  # its cost in this level's terms (single or last)


def trace(costs: LevelCosts, pred: np.ndarray, sol: LevelSolution, r: int, j: int, m: int) -> list[TracedStage]:
    """The stages on the optimal path of A[r, j, m], in pipeline order.

    Ties are broken as PipeDream breaks them: the single-stage value first, then "one slot
    fewer", then the first split that matches.
    """
    A = sol.table
    stages: list[TracedStage] = []
    while True:
        v = A[r, j, m]
        if not np.isfinite(v):
            raise ValueError(f"trace of an infeasible entry A[{r}, {j}, {m}]")
        single = costs.single(np.array([r]))[0, j, m]
        if single == v:
            stages.append(TracedStage(r, j, 0, m + 1, float(v)))
            break
        if sol.fewer and m > 0 and j > r and A[r, j, m - 1] == v:
            m -= 1
            continue
        ks = np.flatnonzero(pred[:, j])
        ks = ks[ks >= r]
        sel = np.flatnonzero(costs.pair_m == m)
        C = pair_costs(costs, costs.last(ks, np.array([j])))[:, 0, :][:, sel]  # (K, pairs of m)
        mps = costs.pair_mp[sel]
        cand = np.maximum(A[r, ks][:, m - mps], C)
        hit = np.argwhere(cand == v)
        if hit.size == 0:  # float noise: take the closest candidate
            flat = int(np.argmin(np.abs(cand - v)))
            hit = np.array([np.unravel_index(flat, cand.shape)])
        ki, pi = hit[0]
        k, mp = int(ks[ki]), int(mps[pi])
        stages.append(TracedStage(k + 1, j, m + 1 - mp, mp, float(C[ki, pi])))
        j, m = k, m - mp
    stages.reverse()
    return stages
