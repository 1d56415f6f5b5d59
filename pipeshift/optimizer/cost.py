"""pipeshift's own cost model (the default, ``--cost-model pipeshift``).

Units: one *microbatch* is one batch at the profiled batch size (graph.txt's times are per
profiled batch); every time below is seconds per microbatch in steady state.

* **Stage time** on m' replicas: the replicas take microbatches round-robin, so each does a
  ``share`` of the work — 1/m' for the continuous schedules (1f1b, 2bw), ``ceil(M/m')/M`` for
  the flushing ones (flush, gpipe: a minibatch of M microbatches cannot be split finer than
  whole microbatches). Replicas synchronise gradients with a **ring all-reduce**,
  ``2(m'-1)/m' · bytes / bandwidth + 2(m'-1) · latency``, once per ``sync`` microbatches:
  per m' for 1f1b (PipeDream: each replica syncs after each of its microbatches), per M for the
  others. Compute is divided by the slowest replica's speed (``--worker-speeds``).
* **Cuts**: every microbatch sends its activations forward and its gradients back across each
  cut — two messages of the bytes that cross it (every tensor produced before the cut and
  consumed after it, skip connections included), each paying ``latency + bytes/bandwidth`` of the
  level the cut lies on. The link is a resource of its own (transfers overlap compute), so a cut
  bounds the pipeline's pace like a stage does; its traffic is spread over the m' replicas of the
  stage that receives it.
* **Memory** per worker: weights · versions + gradients + optimizer state (``--optimizer-states``
  copies of the weights; 2 for Adam) + stashed activations · microbatches in flight. In flight
  at a stage with D workers after it: ``ceil((D + m')/m')`` for 1f1b and 2bw, at most
  ``ceil(M/m')`` for flush, exactly ``ceil(M/m')`` for gpipe. Weight versions: one per
  microbatch in flight for 1f1b (weight stashing), two for 2bw, one otherwise. In a hierarchy the
  memory check happens at the innermost level, where the workers after a stage outside its own
  machine are not known yet: it assumes all of them (a safe over-estimate for the inner stages;
  exact for one level).

**Tied parameters** (GPT-2's head and embedding, a module called in two stages): a stage
counts a tied weight once however many of its nodes hold it (weights, gradients and optimizer
state are per copy, so every stage holding it pays for one copy). A stage holding *part* of a
tie — some of its holders but not all — sums the tie's gradient with the other holders before
every step (:mod:`pipeshift.runtime.ties`): a ring all-reduce of the tie's bytes over its own
replicas and, as many again, the other holder's (exact for the usual two-holder tie with equal
replica counts), once per ``sync`` microbatches like the replicas' all-reduce, on the link of the
level being solved. In a hierarchy each level whose range splits a tie charges it on that
level's link: an upper bound, as the ring is paced by its slowest link.

A level sees the level below as slots whose time for a range is the lower level's optimum; the
slowest slot type in a replica group sets the group's pace.

**Tensor parallelism** (``plan --tp 1 2 4``, innermost level only): a stage on w workers runs as
``w / t`` replicas of a TP group of ``t`` workers, for the allowed ``t`` dividing w that is
fastest. Per node, a layer the TP plan shards (profile.json's ``tp_plan``) takes
``time / (t · efficiency)`` (its matrix products split evenly; ``--tp-efficiency`` is the
fraction of that ideal reached) and holds ``1/t`` of its weights, gradients and optimizer state;
every other node of the stage is computed whole on each rank of the group. A node that is a
whole block holding sharded layers (a decoder layer kept as one graph node) is split in the
proportion of its weights that are sharded (profile.json's ``tp_plan.leaves``). Activations
held per microbatch in flight are ``1/t`` where they are shards: what a node saves between a
column-parallel layer and its row-parallel partner (and the row-parallel layer's input); a
block's in the proportion of its sharded weights; everything else whole on every rank. Each row-parallel
layer adds its pair's all-reduces of its output (one forward after it, one backward before the
column-parallel layers; serving: forward only), a ring all-reduce over t on the TP link
(``--tp-bandwidth``/``--tp-latency``, default the innermost level's). A TP group crosses a
stage boundary once (its first rank sends), so a cut's traffic is spread over the ``w / t``
groups, and replicas all-reduce the ``1/t`` shards.

**Serving** (``--objective serve``, schedule kind ``serve``): forward times only; batches go
round-robin to a stage's replicas (share 1/m') and replicas never synchronise (replicating a
stage costs memory only); one message per cut per batch (activations forward, no gradients);
memory per worker is the weights once plus the activations of the batches in flight at the
stage (``ceil((D + m')/m')``, as for 1f1b), no gradients, versions or optimizer state.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipeshift.optimizer.dp import slot_pairs
from pipeshift.schedule.registry import ScheduleKind, schedule_kind

INF = np.inf
# a number or an array of them: the formulas are vectorised over ranges and slots, and the same
# formulas price one stage
Num = np.ndarray | np.floating | float | int
SERVE = "serve"  # the forward-only schedule of ``--objective serve``


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The pipeline schedule and microbatch count, as far as the cost model cares."""

    kind: str = "1f1b"
    microbatches: int = 1

    @property
    def spec(self) -> ScheduleKind:
        return schedule_kind(self.kind)

    def share(self, replicas: Num) -> np.ndarray:
        """Fraction of the stage's microbatches one replica runs (a flush waits for the busiest replica)."""
        r = np.asarray(replicas, dtype=np.float64)
        if self.spec.synchronous:
            return np.ceil(self.microbatches / r) / self.microbatches
        return 1.0 / r

    def sync(self, replicas: Num) -> np.ndarray:
        """Stage microbatches per gradient all-reduce."""
        r = np.asarray(replicas, dtype=np.float64)
        if not self.spec.backward:  # replicas never synchronise
            return np.full_like(r, np.inf)
        return r if self.spec.step_every == "replica_group" else np.full_like(r, float(self.microbatches))

    @property
    def directions(self) -> float:
        """Messages per cut per microbatch: activations forward, gradients back (serving: forward only)."""
        return 2.0 if self.spec.backward else 1.0

    def in_flight(self, downstream: Num, replicas: Num) -> np.ndarray:
        """Microbatches one replica holds at most (:func:`pipeshift.schedule.check.replay` checks the bound)."""
        r = np.asarray(replicas, dtype=np.float64)
        depth = np.ceil((np.asarray(downstream, dtype=np.float64) + r) / r)
        per_replica = np.ceil(self.microbatches / r)
        if self.spec.order == "gpipe":
            return np.asarray(per_replica + 0 * depth)
        if self.spec.synchronous:
            return np.minimum(depth, per_replica)
        return depth

    def weight_versions(self, in_flight: Num) -> np.ndarray:
        """Stashed weight copies: one per microbatch in flight (stashing), two (2BW) or none beyond the live one."""
        if not self.spec.backward:
            return np.zeros_like(in_flight)  # the weights themselves: Memory.bytes counts them once
        weights = self.spec.weights
        if weights == "stashed":
            return np.asarray(in_flight, dtype=np.float64)
        return np.full_like(in_flight, 2.0 if weights == "double" else 1.0)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-worker memory limit (None: unlimited) and what the optimizer keeps per weight."""

    limit: float | None = None
    optimizer_states: float = 2.0

    @classmethod
    def for_schedule(cls, schedule: Schedule, limit: float | None, optimizer_states: float) -> Memory:
        """Serving keeps no optimizer state (and no gradients: versions are 0, see weight_versions)."""
        return cls(limit, optimizer_states if schedule.spec.backward else 0.0)

    def bytes(self, params: Num, stash: Num, in_flight: Num, versions: Num) -> np.ndarray:
        return np.asarray(params * (versions + 1.0 + self.optimizer_states) + in_flight * stash)


def ring_allreduce(params: Num, replicas: Num, bandwidth: float, latency: float) -> np.ndarray:
    r = np.asarray(replicas, dtype=np.float64)
    return np.where(r > 1, 2.0 * (r - 1) / r * params / bandwidth + 2.0 * (r - 1) * latency, 0.0)


def tie_allreduce(nbytes: Num, ties: Num, replicas: Num, bandwidth: float, latency: float) -> np.ndarray:
    """Summing ``ties`` tied parameters of ``nbytes`` in all between a stage's replicas and as many
    holders elsewhere: one ring over twice the replicas per tie (see the module docstring)."""
    k = 2.0 * np.asarray(replicas, dtype=np.float64)
    return np.where(np.asarray(ties) > 0, 2.0 * (k - 1) / k * nbytes / bandwidth + 2.0 * (k - 1) * latency * ties, 0.0)


@dataclasses.dataclass(frozen=True)
class TieArrays:
    """(S+1, S) range sums over the ties a range holds only part of: their bytes and their count."""

    split_bytes: np.ndarray
    split_count: np.ndarray


@dataclasses.dataclass(frozen=True)
class TPArrays:
    """Per allowed TP degree: range sums (S+1, S) of node time and of parameter bytes per worker."""

    degrees: tuple[int, ...]
    times: np.ndarray  # (T, S+1, S) seconds per microbatch on one TP group (slowest-worker speed applied)
    params: np.ndarray  # (T, S+1, S) parameter bytes each worker of the group holds
    held: np.ndarray  # (T, S+1, S) activation bytes each worker holds per microbatch in flight


class PipeshiftLevel:
    """:class:`~pipeshift.optimizer.dp.LevelCosts` of one level under pipeshift's model.

    ``times[t, r, j]``: seconds per microbatch of range (r, j) on one slot of type t (inf where
    the range is illegal); ``slot_types[s]``: the type of slot s. ``params``/``stash`` are
    (S+1, S) range sums; ``cut_bytes[k]`` the bytes crossing the cut after state k.
    """

    def __init__(
        self,
        times: np.ndarray,
        slot_types: np.ndarray,
        params: np.ndarray,
        stash: np.ndarray,
        cut_bytes: np.ndarray,
        bandwidth: float,
        latency: float,
        schedule: Schedule,
        straight: bool,
        memory: Memory | None,
        outer_downstream: int,
        tp: TPArrays | None = None,
        ties: TieArrays | None = None,
    ):
        self.times = times
        self.ties = ties if ties is not None and ties.split_count.any() else None
        self.slot_types = np.asarray(slot_types, dtype=np.int64)
        self.params, self.stash, self.cut_bytes = params, stash, cut_bytes
        self.bandwidth, self.latency = bandwidth, latency
        self.schedule = schedule
        self.straight = straight
        self.memory = memory if memory is not None and memory.limit is not None else None
        self.outer_downstream = outer_downstream
        self.tp = tp if tp is not None and tp.degrees != (1,) else None
        N = self.num_slots = len(self.slot_types)
        self.pair_m, self.pair_mp = slot_pairs(N, straight)
        n_types = times.shape[0]
        onehot = np.eye(n_types, dtype=bool)[self.slot_types]  # (N, types)
        cum = np.cumsum(onehot, axis=0)
        self._single_member = cum > 0  # slots 0..m
        lo = self.pair_m + 1 - self.pair_mp
        before = np.where(lo[:, None] > 0, cum[np.maximum(lo - 1, 0)], 0)
        self._pair_member = (cum[self.pair_m] - before) > 0  # slots m+1-m' .. m
        self.homogeneous = n_types == 1
        # homogeneous slots and no memory check: a last stage's cost depends on m' only
        self.by_mp = self.homogeneous and self.memory is None

    # -- pieces ---------------------------------------------------------------------------
    def _stage_time(self, compute: Num, params: Num, replicas: Num, rows: np.ndarray | int | None = None,
                    cols: np.ndarray | int | None = None) -> np.ndarray:
        """Compute share + the replicas' all-reduce + (range ``rows, cols``) the split ties' all-reduce."""
        s = self.schedule
        ar = ring_allreduce(params, replicas, self.bandwidth, self.latency)
        if self.ties is not None and rows is not None:
            nbytes, count = self.ties.split_bytes[rows, cols], self.ties.split_count[rows, cols]
            if np.ndim(params) > np.ndim(nbytes):  # params carry the replica-count axis already
                nbytes, count = nbytes[..., None], count[..., None]
            ar = ar + tie_allreduce(nbytes, count, replicas, self.bandwidth, self.latency)
        return np.asarray(compute * s.share(replicas) + ar / s.sync(replicas))

    def _fits(self, params: np.ndarray, stash: np.ndarray, downstream: np.ndarray | float,
              replicas: np.ndarray | float) -> np.ndarray | bool:
        if self.memory is None:
            return True
        fl = self.schedule.in_flight(downstream + self.outer_downstream, replicas)
        need = self.memory.bytes(params, stash, fl, self.schedule.weight_versions(fl))
        return need <= self.memory.limit

    def _group_time(self, times_t: np.ndarray, member: np.ndarray) -> np.ndarray:
        """Max over the slot types in each group: times_t (types, ...) , member (G, types) → (..., G)."""
        t = np.moveaxis(times_t, 0, -1)[..., None, :]  # (..., 1, types)
        return np.asarray(np.where(member, t, -INF).max(axis=-1))

    def _tp_time(self, k: int, rows: np.ndarray, cols: np.ndarray, workers: np.ndarray, downstream: np.ndarray,
                 cut: np.ndarray | None) -> np.ndarray:
        """Stage time at TP degree ``tp.degrees[k]`` on ``workers`` (inf where it does not divide them)."""
        tp = self.tp
        assert tp is not None
        t = tp.degrees[k]
        ok = workers % t == 0
        groups = np.where(ok, workers / t, 1.0)
        par = tp.params[k][rows, cols][..., None]
        time = self._stage_time(tp.times[k][rows, cols][..., None], par, groups, rows, cols)
        if cut is not None:
            time = np.maximum(time, self.schedule.directions * (self.latency + cut / self.bandwidth)[..., None] / groups)
        fits = self._fits(par, tp.held[k][rows, cols][..., None], downstream, groups)
        return np.where(ok & fits, time, INF)

    def best_tp(self, row: int, end: int, slots: int, first: bool) -> int:
        """The TP degree the level's cost took for the stage (row, end) on ``slots`` workers."""
        if self.tp is None:
            return 1
        w = np.array([float(slots)])
        cut = None if first else np.array([float(self.cut_bytes[row - 1])])
        times = [float(self._tp_time(k, np.array([row]), np.array([end]), w, self.num_slots - w, cut)[0, 0])
                 for k in range(len(self.tp.degrees))]
        return self.tp.degrees[int(np.argmin(times))]

    # -- LevelCosts -----------------------------------------------------------------------
    def single(self, rows: np.ndarray) -> np.ndarray:
        if self.tp is not None:
            N = self.num_slots
            w = np.arange(1, N + 1, dtype=np.float64)
            rr, cc = rows[:, None], np.arange(self.params.shape[1])[None, :]
            return np.asarray(np.min([self._tp_time(k, rr, cc, w, N - w, None) for k in range(len(self.tp.degrees))], axis=0))
        N = self.num_slots
        m = np.arange(N)
        replicas = (m + 1).astype(np.float64)
        if self.homogeneous:
            comp = self.times[0][rows][:, :, None]
        else:
            comp = self._group_time(self.times[:, rows], self._single_member)
        par = self.params[rows][:, :, None]
        t = self._stage_time(comp, par, replicas, rows[:, None], np.arange(self.params.shape[1])[None, :])
        fits = self._fits(par, self.stash[rows][:, :, None], N - (m + 1), replicas)
        t = np.where(fits, t, INF)
        if self.straight:
            t[:, :, 1:] = INF
        return t

    def last(self, ks: np.ndarray, js: np.ndarray) -> np.ndarray:
        N = self.num_slots
        rows = ks + 1
        if self.tp is not None:
            mp = np.arange(1, N, dtype=np.float64) if self.by_mp else self.pair_mp.astype(np.float64)
            down = np.zeros_like(mp) if self.by_mp else N - (self.pair_m + 1.0)
            cut = self.cut_bytes[ks][:, None]
            return np.asarray(np.min([self._tp_time(k, rows[:, None], js[None, :], mp, down, cut)
                                      for k in range(len(self.tp.degrees))], axis=0))
        par = self.params[np.ix_(rows, js)][:, :, None]
        if self.homogeneous:
            mp = np.arange(1, (2 if self.straight else N), dtype=np.float64)
            comp = self.times[0][np.ix_(rows, js)][:, :, None]
            t = self._stage_time(comp, par, mp, rows[:, None], js[None, :])
            link = self.schedule.directions * (self.latency + self.cut_bytes[ks] / self.bandwidth)[:, None, None] / mp
            t = np.maximum(t, link)
            if self.by_mp:
                return np.asarray(t)
            t = t[:, :, self.pair_mp - 1]
        else:
            mp = self.pair_mp.astype(np.float64)
            comp = self._group_time(self.times[:, rows][:, :, js], self._pair_member)
            t = self._stage_time(comp, par, mp, rows[:, None], js[None, :])
            link = self.schedule.directions * (self.latency + self.cut_bytes[ks] / self.bandwidth)[:, None, None] / mp
            t = np.maximum(t, link)
        if self.memory is not None:
            stash = self.stash[np.ix_(rows, js)][:, :, None]
            fits = self._fits(par, stash, N - (self.pair_m + 1), self.pair_mp.astype(np.float64))
            t = np.where(fits, t, INF)
        return t


    def charge(self, value: float, row: int, end: int, slots: int, first: bool) -> float:
        """What this level charges a range whose inner time is ``value`` (the DP's formula)."""
        t = float(self._stage_time(np.float64(value), np.float64(self.params[row, end]), np.float64(slots), row, end))
        if not first:
            t = max(t, self.schedule.directions * (self.latency + float(self.cut_bytes[row - 1]) / self.bandwidth)
                    / slots)
        return t


def data_parallel_time(
    total_compute_s: float, total_params: float, levels: list[tuple[int, float, float]], schedule: Schedule
) -> float:
    """One stage replicated over every worker, level by level (slots of a level run the level below)."""
    t = total_compute_s
    for n, bw, lat in levels:
        r = np.float64(n)
        t = float(t * schedule.share(r) + ring_allreduce(np.float64(total_params), r, bw, lat) / schedule.sync(r))
    return t


def stage_memory(schedule: Schedule, memory: Memory, params: float, stash: float, downstream: int, replicas: int) -> float:
    fl = schedule.in_flight(downstream, replicas)
    return float(memory.bytes(params, stash, fl, schedule.weight_versions(fl)))


def describe_in_flight(schedule: Schedule, downstream: int, replicas: int) -> int:
    return int(math.ceil(float(schedule.in_flight(downstream, replicas))))
