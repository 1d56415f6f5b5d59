"""PipeDream's cost model (``--cost-model pipedream``), reproduced quirks included.

This is the arithmetic of PipeDream's ``optimizer_graph_hierarchical.py`` so that its published
configurations and printed optima can be reproduced number for number; its search is replaced by
the vectorised sweep of :mod:`pipeshift.optimizer.dp`. What it does, and what is odd about it:

* Raw inputs (sources described ``Input…``) are removed before planning and pinned to stage 0;
  sinks described ``__getitem__`` are dropped too (we put them back with their producer).
* Stage time on m' replicas is ``(compute + 4·(m'-1)·params / (bandwidth·m')) / m'`` — the
  all-reduce is divided by the replica count like the compute. For a range that is the first
  stage of its pipeline, the all-reduce term is further divided by the worker count of the level
  below (``num_machines_within_machine``); for later stages it is not.
* Activation transfers count only when ``--activation_compression_ratio`` is given:
  ``2·bytes / (bandwidth·m') / ratio`` for the stage's input and, unless it is the last state,
  its output, where "bytes" of a state is the activation size of its *augmented* antichain
  (the antichain plus every predecessor with an edge leaving that member's ancestor set) —
  more than the tensors that cross the cut on many graphs.
* Memory: a stage fits if ``ceil((N - used)/m') · (activations + params) ≤ memory_size``, with
  ``used`` the workers of the pipeline up to and including it, and only with
  ``--use_memory_constraint``.
* Inner levels are solved for *every* pair of states with row index ≤ end index, including pairs
  whose downsets are not nested (their "compute" is a difference of two unrelated sums). Those
  entries can feed an inner optimum; they are kept, because PipeDream keeps them.
* ``--use_fewer_machines`` lets A[r, j, m] take A[r, j, m-1], except on the diagonal r == j.
"""

from __future__ import annotations

import math

import numpy as np

from pipeshift.graph import Graph
from pipeshift.optimizer.dp import slot_pairs
from pipeshift.optimizer.states import GraphArrays

INF = np.inf


def planning_nodes(graph: Graph) -> tuple[list[str], list[str], list[str]]:
    """(nodes PipeDream plans, removed raw inputs, removed ``__getitem__`` sinks)."""
    inputs = [nid for nid in graph.sources() if graph[nid].is_input]
    gone = set(inputs)
    dropped = []
    for nid in graph.nodes:
        if nid in gone:
            continue
        if not any(s not in gone for s in graph.successors(nid)) and graph[nid].desc.startswith("__getitem__"):
            dropped.append(nid)
    gone |= set(dropped)
    return [nid for nid in graph.nodes if nid not in gone], inputs, dropped


def augmented_output_bytes(g: GraphArrays, members: np.ndarray, closure: np.ndarray) -> np.ndarray:
    """PipeDream's ``output_activation_size`` of each state (see the module docstring)."""
    anc = closure & ~np.eye(g.n, dtype=bool)  # anc[a, p]: p is a strict ancestor of a
    leaves_t = g.any_succ_in(~closure)  # [a, p]: p has a successor outside closure(a)
    extra = anc & leaves_t  # extra[a, p]
    maximal = members & ~g.any_succ_in(members)
    aug = maximal.copy()
    s_idx, a_idx = np.nonzero(maximal)  # row-major: grouped by state
    if s_idx.size:
        states, starts = np.unique(s_idx, return_index=True)
        aug[states] |= np.logical_or.reduceat(extra[a_idx], starts, axis=0)
    return np.asarray(aug.astype(np.float64) @ g.activation)


def range_rows(per_state: np.ndarray, fill: float) -> np.ndarray:
    """(S+1, S): row 0 = the state's total, row r = state j minus state r-1 where j ≥ r."""
    S = per_state.shape[0]
    out = np.full((S + 1, S), fill, dtype=np.float64)
    out[0] = per_state
    if S:
        diff = per_state[None, :] - per_state[:, None]  # diff[r-1, j]
        upper = np.triu(np.ones((S, S), dtype=bool))  # j ≥ r  <=>  j > r-1
        out[1:] = np.where(upper, diff, fill)
    return out


class PipeDreamLevel:
    """:class:`~pipeshift.optimizer.dp.LevelCosts` for one level of PipeDream's hierarchy."""

    def __init__(
        self,
        compute: np.ndarray,
        activation: np.ndarray,
        parameter: np.ndarray,
        output_bytes: np.ndarray,
        num_slots: int,
        bandwidth: float,
        within: int,
        straight: bool,
        memory_limit: float | None,
        compression: float | None,
    ):
        self.compute, self.activation, self.parameter = compute, activation, parameter
        self.output_bytes = output_bytes
        self.num_slots = num_slots
        self.bandwidth = bandwidth
        self.within = within
        self.straight = straight
        self.memory_limit = memory_limit
        self.compression = compression
        self.pair_m, self.pair_mp = slot_pairs(num_slots, straight)
        self._stash_factor = np.ceil((num_slots - (self.pair_m + 1)) / self.pair_mp)
        self._transfer_cache: np.ndarray | None = None
        self.by_mp = memory_limit is None  # without the memory check, a last stage's cost depends on m' only

    def single(self, rows: np.ndarray) -> np.ndarray:
        N, bw = self.num_slots, self.bandwidth
        m = np.arange(N, dtype=np.float64)
        comp = self.compute[rows][:, :, None]
        par = self.parameter[rows][:, :, None]
        dp = (4 * m * par) / (bw * (m + 1))
        dp = dp / self.within
        t = (comp + dp) / (m + 1)
        if self.memory_limit is not None:
            stash = np.ceil((N - (m + 1)) / (m + 1)) * (self.activation[rows][:, :, None] + par)
            t = np.where(stash > self.memory_limit, INF, t)
        if self.straight:
            t[:, :, 1:] = INF
        return np.asarray(t)

    def _transfer(self) -> np.ndarray:
        """(S, N) time to move a state's output (twice: activations and gradients) to m' replicas."""
        if self._transfer_cache is None:
            assert self.compression is not None  # asked for only when the transfers are costed
            mp = np.arange(1, self.num_slots + 1, dtype=np.float64)
            x = (2.0 * self.output_bytes)[:, None] / (self.bandwidth * mp) / self.compression
            self._transfer_cache = np.concatenate([np.full((x.shape[0], 1), INF), x], axis=1)
        return self._transfer_cache

    def last(self, ks: np.ndarray, js: np.ndarray) -> np.ndarray:
        N, bw = self.num_slots, self.bandwidth
        # Everything but the memory check depends on m' only: evaluate per m', then gather pairs.
        mp = np.arange(1, (2 if self.straight else N), dtype=np.float64)
        rows = ks + 1
        comp = self.compute[np.ix_(rows, js)][:, :, None]
        par = self.parameter[np.ix_(rows, js)][:, :, None]
        t = (comp + (4 * (mp - 1) * par) / (bw * mp)) / mp
        if self.compression is not None:
            x = self._transfer()
            t_in = x[ks][:, None, 1 : mp.size + 1]
            t_out = x[js][None, :, 1 : mp.size + 1]
            last_state = js == self.output_bytes.shape[0] - 1
            if last_state.any():
                t_out = np.where(last_state[None, :, None], -INF, t_out)
            t = np.maximum(np.maximum(t, t_in), t_out)
        if self.by_mp:
            return np.asarray(t)
        t = t[:, :, self.pair_mp - 1]
        if self.memory_limit is not None:
            act = self.activation[np.ix_(rows, js)][:, :, None]
            stash = (act + par) * self._stash_factor
            t = np.where(stash > self.memory_limit, INF, t)
        return np.asarray(t)


    def best_tp(self, row: int, end: int, slots: int, first: bool) -> int:
        """PipeDream's model has no tensor parallelism: every stage is TP 1."""
        return 1

    def charge(self, value: float, row: int, end: int, slots: int, first: bool) -> float:
        """What this level charges a range whose inner time is ``value`` (the DP's formula)."""
        bw, par = self.bandwidth, float(self.parameter[row, end])
        if first:
            m = slots - 1
            return (value + (4 * m * par) / (bw * (m + 1)) / self.within) / (m + 1)
        t = (value + (4 * (slots - 1) * par) / (bw * slots)) / slots
        if self.compression is not None:
            x = self._transfer()
            t = max(t, float(x[row - 1, slots]))
            if end != self.output_bytes.shape[0] - 1:
                t = max(t, float(x[end, slots]))
        return t


def data_parallel_time(total_compute_s: float, total_params: float, levels: list[tuple[int, float]]) -> float:
    """PipeDream's data-parallel baseline over all levels (its ``data_parallel_total_time``)."""
    t = total_compute_s
    within = 1
    for n, bw in levels:
        comm = ((4 * (n - 1) * total_params) / (bw * n)) / within
        t = (t + comm) / n
        within = n
    return t


def stage_memory(activation: float, parameter: float, downstream: int, replicas: int) -> float:
    """PipeDream's stashed-data estimate for one stage: ``ceil(downstream/m') · (act + params)``."""
    return math.ceil(downstream / replicas) * (activation + parameter)
