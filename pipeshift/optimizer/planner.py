"""The planner: profiled graph + topology → pipeline stages, replication and rank lists.

:func:`make_plan` runs the hierarchical dynamic program of :mod:`pipeshift.optimizer.dp`
level by level, innermost first: for every stage range the inner level's optimum becomes the
range's compute time one level up, and the outermost level's optimum is the plan. It then walks
the optimal choices back down and flattens them into one list of stages in pipeline order, each
with its nodes, its replication factor (the product over levels) and the workers it runs on.

Two cost models share this machinery: pipeshift's own (:mod:`pipeshift.optimizer.cost`) and
PipeDream's, quirks included (:mod:`pipeshift.optimizer.pipedream_cost`). The state space is
exact when it is small and prefixes of topological orders otherwise (:mod:`.states`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
import dataclasses
import itertools
import math

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.graph import Graph
from pipeshift.optimizer import cost as ps_cost
from pipeshift.optimizer import pipedream_cost as pd_cost
from pipeshift.optimizer import placement
from pipeshift.optimizer.dp import LevelCosts, LevelSolution, TracedStage, solve_level, trace
from pipeshift.optimizer.states import (
    GraphArrays,
    StateSpace,
    TooManyStates,
    all_downsets,
    frontier_bytes,
    pipedream_states,
    prefix_orders,
    prefix_states,
    zero_cost_glue,
)
from pipeshift.optimizer.topology import Level, Topology

COST_MODELS = ("pipeshift", "pipedream")
SEARCHES = ("auto", "exact", "prefix")


@dataclasses.dataclass(frozen=True)
class TPOptions:
    """Tensor parallelism the planner may choose (``--tp``), and what it costs (cost.py's docstring)."""

    degrees: tuple[int, ...] = (1,)
    modules: Mapping[str, str] = dataclasses.field(default_factory=dict)  # profile.json's tp_plan: FQN -> style
    # profile.json's tp_plan "leaves": a graph node that is a whole module holding sharded layers
    # (a decoder block kept as one node) -> {"sharded_fraction": of its weights, "row_parallel": layers}
    leaves: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    bandwidth: float | None = None  # bytes/s of a TP group's link (None: the innermost level's)
    latency: float | None = None
    efficiency: float = 1.0  # fraction of the ideal 1/t a sharded node reaches
    # per planning-graph node, filled by the planner: the fraction of its weights and work that is
    # sharded, the fraction of its held activations that is, bytes all-reduced per microbatch
    shard: np.ndarray | None = dataclasses.field(default=None, compare=False)
    held_shard: np.ndarray | None = dataclasses.field(default=None, compare=False)
    allreduce_bytes: np.ndarray | None = dataclasses.field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return any(t > 1 for t in self.degrees)

    @staticmethod
    def _split(values: np.ndarray, fraction: np.ndarray | None, divisor: float) -> np.ndarray:
        if fraction is None:
            return values
        return np.asarray(values * (1.0 - fraction) + values * fraction / divisor)

    def node_time_s(self, base_s: np.ndarray, t: int, level_bw: float, level_lat: float,
                    ids: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Seconds per microbatch of nodes ``ids`` at degree t: shards' share plus their all-reduces."""
        if t == 1:
            return base_s
        assert self.shard is not None and self.allreduce_bytes is not None
        bw = self.bandwidth or level_bw
        lat = level_lat if self.latency is None else self.latency
        nbytes = self.allreduce_bytes[ids]
        ring = 2.0 * (t - 1) / t * nbytes / bw + np.where(nbytes > 0, 2.0 * (t - 1) * lat, 0.0)
        return self.node_compute(base_s, t, ids) + ring

    def node_compute(self, base_s: np.ndarray, t: int, ids: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The compute alone: the sharded share of each node at ``1 / (t · efficiency)``."""
        return self._split(base_s, None if self.shard is None else self.shard[ids], t * self.efficiency)

    def node_params(self, params: np.ndarray, t: int, ids: np.ndarray | slice = slice(None)) -> np.ndarray:
        return self._split(params, None if self.shard is None else self.shard[ids], t) if t > 1 else params

    def node_held(self, held: np.ndarray, t: int, ids: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Bytes a microbatch in flight holds per rank of the group: a shard's share where activations are split."""
        return self._split(held, None if self.held_shard is None else self.held_shard[ids], t) if t > 1 else held


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    cost_model: str = "pipeshift"
    straight: bool = False
    fewer_machines: bool = False
    memory_limit: float | None = None  # bytes per worker; None = unconstrained
    compression: float | None = None  # activation compression ratio
    schedule: ps_cost.Schedule = ps_cost.Schedule()
    optimizer_states: float = 2.0
    search: str = "auto"
    max_states: int = 2000  # exact search only below this many states
    work_budget: float = 2.5e8  # … and only while the DP's estimated element operations stay below this
    latency_slo_s: float | None = None  # serving: a batch's predicted latency at most this
    tp: TPOptions = TPOptions()

    @property
    def serving(self) -> bool:
        return self.schedule.kind == ps_cost.SERVE

    def compute_ms(self, g: GraphArrays) -> np.ndarray:
        """Per-node time the stages pay: forward + backward, or forward alone when serving."""
        return g.forward_ms if self.serving else g.compute_ms

    def held_bytes(self, g: GraphArrays) -> np.ndarray:
        """Per-node bytes a microbatch in flight holds: saved for backward, or (serving) its activations."""
        return g.activation if self.serving else g.stash

    def memory(self) -> ps_cost.Memory:
        return ps_cost.Memory.for_schedule(self.schedule, self.memory_limit, self.optimizer_states)


@dataclasses.dataclass
class Stage:
    """One stage of the flattened plan, in pipeline order."""

    nodes: list[str]
    replicas: int
    workers: list[int]
    slots: list[tuple[int, int]]  # (first slot, slot count) per level, outermost first
    cut_level: int | None  # topology level of the cut before this stage
    dp_value: float  # the stage's time per microbatch as the DP charged it (all levels applied)
    row: int
    end: int
    placed: bool = False  # chosen by the placement search on the measured link matrix
    tp: int = 1  # tensor-parallel degree: the stage's workers are replicas × tp


@dataclasses.dataclass
class PlanResult:
    optimum: float
    stages: list[Stage]
    states: StateSpace
    arrays: GraphArrays
    level_splits: list[list[tuple[int, int, float, int]]]  # PipeDream-style printout, outermost first
    notes: list[str]
    search_candidates: dict[str, float]


# -- helpers ---------------------------------------------------------------------------
def _valid_rows(states: StateSpace) -> np.ndarray:
    """(S+1, S): range (row r, state j) is a legal stage (state r-1 ⊂ state j)."""
    S = states.size
    valid = np.zeros((S + 1, S), dtype=bool)
    valid[0] = True
    valid[1:] = states.pred
    return valid


def _range_sums(per_state: np.ndarray, valid: np.ndarray, fill: float) -> np.ndarray:
    rows = pd_cost.range_rows(per_state, fill)
    return np.where(valid, rows, fill)


def _tie_ranges(g: GraphArrays, states: StateSpace, valid: np.ndarray, degrees: tuple[int, ...] = (1,),
                shard: np.ndarray | None = None) -> tuple[list[np.ndarray], ps_cost.TieArrays]:
    """Per TP degree, the (S+1, S) bytes a range counts more than once (a tied parameter several of
    its nodes hold: node sums count it per node, the stage holds it once), and the ties a range
    splits with other stages (cost.py's docstring). At degree t a tie with a sharded holder is
    counted at 1/t, the smaller copy."""
    S = states.size
    dups = [np.zeros((S + 1, S)) for _ in degrees]
    split_bytes, split_count = np.zeros((S + 1, S)), np.zeros((S + 1, S))
    if g.tie_bytes.size:
        counts = states.members.astype(np.float64) @ g.tie_nodes.T.astype(np.float64)  # (S, T)
        for t, nbytes in enumerate(g.tie_bytes):
            c = _range_sums(counts[:, t], valid, 0.0)
            extra = np.maximum(c - 1.0, 0.0)
            for i, d in enumerate(degrees):
                sharded = shard is not None and d > 1 and bool(shard[g.tie_nodes[t]].any())
                dups[i] += extra * (nbytes / d if sharded else nbytes)
            split = (c > 0) & (c < g.tie_nodes[t].sum())
            split_bytes += split * nbytes
            split_count += split
    return dups, ps_cost.TieArrays(split_bytes, split_count)


def _estimated_work(S: int, topology: Topology, straight: bool) -> float:
    work = 0.0
    for i, level in enumerate(topology.levels):
        n = level.workers
        pairs = (n - 1) if straight else n * (n - 1) / 2
        rows = 1 if i == len(topology.levels) - 1 else S / 3
        work += rows * S * S / 2 * max(pairs, 1)
    return work


# -- solving ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Solved:
    """Per level: signature → (costs, solution); per level ≥ 1: signature → inner signature of each slot."""

    levels: list[dict[int, tuple[LevelCosts, LevelSolution]]]
    slot_sigs: list[dict[int, tuple[int, ...]]]
    final_sig: int

    def optimum(self, S: int) -> float:
        costs, sol = self.levels[-1][self.final_sig]
        return float(sol.table[0, S - 1, costs.num_slots - 1])


def _solve_pipedream(g: GraphArrays, states: StateSpace, topo: Topology, opt: PlanOptions,
                     closure: np.ndarray) -> _Solved:
    members = states.members.astype(np.float64)
    comp = members @ (g.compute_ms / 1000.0)
    act = members @ g.activation
    par = members @ g.parameter
    out = pd_cost.augmented_output_bytes(g, states.members, closure)
    C = pd_cost.range_rows(comp, np.inf)
    Aa = pd_cost.range_rows(act, 0.0)
    P = pd_cost.range_rows(par, 0.0)
    if states.mode == "prefix":  # prefixes are always nested: no quirky pairs to keep
        pass
    succ = states.successors()
    within = 1
    levels: list[dict[int, tuple[LevelCosts, LevelSolution]]] = []
    slot_sigs: list[dict[int, tuple[int, ...]]] = []
    for i, level in enumerate(topo.levels):
        final = i == len(topo.levels) - 1
        costs = pd_cost.PipeDreamLevel(
            C, Aa, P, out, level.workers, level.bandwidth, within, opt.straight, opt.memory_limit, opt.compression
        )
        sol = solve_level(costs, succ, all_rows=not final, fewer=opt.fewer_machines)
        levels.append({0: (costs, sol)})
        slot_sigs.append({0: (0,) * level.workers})
        C = np.ascontiguousarray(sol.table[:, :, -1])
        within = level.workers
    return _Solved(levels, slot_sigs, 0)


def _tp_arrays(g: GraphArrays, states: StateSpace, valid: np.ndarray, opt: PlanOptions, level: Level, speed: float,
               dups: list[np.ndarray]) -> ps_cost.TPArrays:
    """Range sums of node time, per-worker parameters and held activations at every allowed TP
    degree (innermost level); ``dups``: per degree, the tied bytes a range's node sums count twice."""
    members = states.members.astype(np.float64)
    base = opt.compute_ms(g) / 1000.0
    times, params, held = [], [], []
    for t, dup in zip(opt.tp.degrees, dups):
        times.append(_range_sums(members @ opt.tp.node_time_s(base, t, level.bandwidth, level.latency), valid,
                                 np.inf) / speed)
        params.append(_range_sums(members @ opt.tp.node_params(g.parameter, t), valid, 0.0) - dup)
        held.append(_range_sums(members @ opt.tp.node_held(opt.held_bytes(g), t), valid, 0.0))
    return ps_cost.TPArrays(tuple(opt.tp.degrees), np.stack(times), np.stack(params), np.stack(held))


def _sharded_activations(g: GraphArrays, styles: list[str | None], serving: bool) -> np.ndarray:
    """Which nodes' held activations are shards (1) on a TP rank, from the graph's column/row pairs.

    A column-parallel layer's output is a shard, and so is everything computed from it before a
    row-parallel layer (activations, attention per head): those nodes save shards. A
    row-parallel layer saves its (sharded) input and outputs a whole tensor again; a
    column-parallel one saves its whole input. Training holds what a node saves, serving its
    output: the column-parallel layer's output counts there, the row-parallel one's does not.
    """
    col = np.array([s is not None and s.startswith("colwise") and s not in ("colwise_rep", "colwise_gather_output")
                    for s in styles])
    row = np.array([s is not None and s.startswith("rowwise") for s in styles])
    inside = np.zeros(g.n, dtype=bool)
    todo = list(np.flatnonzero(col))
    while todo:
        for b in np.flatnonzero(g.adj[todo.pop()]):
            if not inside[b] and not row[b] and not col[b]:
                inside[b] = True
                todo.append(b)
    return np.asarray((inside | (col if serving else row)).astype(np.float64))


def with_tp_nodes(graph: Graph, g: GraphArrays, opt: PlanOptions) -> PlanOptions:
    """``opt`` with the per-node TP arrays for the planning graph; checks what TP planning supports."""
    tp = opt.tp
    if not tp.active or tp.shard is not None:
        return opt
    # tp_plan imports torch (seconds); a plan without --tp must not pay for it
    from pipeshift.tp_plan import SHARDING_STYLES

    if opt.cost_model != "pipeshift":
        raise PipeshiftError("--tp needs --cost-model pipeshift (PipeDream's model has no tensor parallelism)")
    if opt.straight:
        raise PipeshiftError("--tp with --straight-pipeline: a TP stage has several workers; drop one of them")
    if not tp.modules:
        raise PipeshiftError("--tp: profile.json records no TP plan (nothing to shard); re-run `pipeshift profile` "
                             "(it records the model's own plan or the generic rule; --tp-plan sets one)")
    shard = np.zeros(g.n)
    allreduce = np.zeros(g.n)
    directions = 1.0 if opt.serving else 2.0
    styles: list[str | None] = []
    leaf = np.zeros(g.n)
    for i, nid in enumerate(g.node_ids):
        fqn = str((graph[nid].meta or {}).get("fqn", ""))
        style = tp.modules.get(fqn)
        styles.append(style if style in SHARDING_STYLES else None)
        if style in SHARDING_STYLES:
            shard[i] = 1.0
            if not style.startswith("colwise") or style in ("colwise_rep", "colwise_gather_output"):
                # the pair's all-reduce (or the gather) of this node's whole output
                allreduce[i] = g.activation[i] * directions
        elif fqn in tp.leaves:
            # a block kept whole: its sharded layers' share of its weights (and so of its matrix
            # work and, as a model, of what it holds); each row-parallel layer inside all-reduces
            # a tensor the size of the block's output (a residual stream)
            share = tp.leaves[fqn]
            shard[i] = leaf[i] = min(max(float(share.get("sharded_fraction", 0.0)), 0.0), 1.0)
            allreduce[i] = g.activation[i] * directions * float(share.get("row_parallel", 0))
    if not shard.any():
        raise PipeshiftError("--tp: none of the graph's nodes is a module the TP plan shards")
    held = np.maximum(_sharded_activations(g, styles, opt.serving), leaf)
    return dataclasses.replace(opt, tp=dataclasses.replace(tp, shard=shard, held_shard=held, allreduce_bytes=allreduce))


def _solve_pipeshift(g: GraphArrays, states: StateSpace, topo: Topology, opt: PlanOptions,
                     cut_limit: float | None = None) -> _Solved:
    valid = _valid_rows(states)
    members = states.members.astype(np.float64)
    comp = _range_sums(members @ (opt.compute_ms(g) / 1000.0), valid, np.inf)
    tp_degrees = opt.tp.degrees if opt.tp.active else ()
    dups, ties = _tie_ranges(g, states, valid, (1, *tp_degrees), opt.tp.shard)
    par = _range_sums(members @ g.parameter, valid, 0.0) - dups[0]
    stash = _range_sums(members @ opt.held_bytes(g), valid, 0.0)
    cut = frontier_bytes(g, states.members)
    if opt.compression is not None:
        cut = cut / opt.compression
    if cut_limit is not None:  # the latency search: cuts this heavy are not allowed
        cut = np.where(cut > cut_limit, np.inf, cut)
    memory = opt.memory()
    succ = states.successors()
    speeds = np.array(topo.speeds if topo.speeds is not None else [1.0] * topo.num_workers)
    n_levels = len(topo.levels)
    # level 0 groups: signature = the speeds of their workers
    g0 = topo.levels[0].workers
    unit_sigs = [tuple(speeds[i : i + g0]) for i in range(0, topo.num_workers, g0)]
    levels: list[dict[int, tuple[LevelCosts, LevelSolution]]] = []
    slot_sigs: list[dict[int, tuple[int, ...]]] = []
    prev_tables: dict[int, np.ndarray] = {}
    sig_ids: dict[tuple[int, ...], int] = {}
    group_sig: list[int] = []
    for sig in unit_sigs:
        group_sig.append(sig_ids.setdefault(sig, len(sig_ids)))
    for i, level in enumerate(topo.levels):
        final = i == n_levels - 1
        solved_here: dict[int, tuple[LevelCosts, LevelSolution]] = {}
        slots_here: dict[int, tuple[int, ...]] = {}
        for sig, sid in sig_ids.items():
            if i == 0:
                type_values = sorted(set(sig))
                slot_types = np.array([type_values.index(s) for s in sig])
                times = np.stack([comp / v for v in type_values])
                slots_here[sid] = tuple(slot_types)
                tp = _tp_arrays(g, states, valid, opt, level, type_values[0], dups[1:]) if opt.tp.active else None
            else:
                type_values = sorted(set(sig))
                slot_types = np.array([type_values.index(s) for s in sig])
                times = np.stack([prev_tables[s] for s in type_values])
                slots_here[sid] = tuple(sig)
                tp = None
            costs = ps_cost.PipeshiftLevel(
                times,
                slot_types,
                par,
                stash,
                cut,
                level.bandwidth,
                level.latency,
                opt.schedule,
                opt.straight,
                memory if i == 0 else None,
                topo.num_workers - g0 if (i == 0 and n_levels > 1) else 0,
                tp,
                ties,
            )
            sol = solve_level(costs, succ, all_rows=not final, fewer=opt.fewer_machines)
            solved_here[sid] = (costs, sol)
        levels.append(solved_here)
        slot_sigs.append(slots_here)
        if final:
            break
        prev_tables = {sid: np.ascontiguousarray(sol.table[:, :, -1]) for sid, (_, sol) in solved_here.items()}
        # next level's groups: signature = the inner signatures of their slots
        n_next = topo.levels[i + 1].workers
        new_ids: dict[tuple[int, ...], int] = {}
        new_group_sig = []
        for start in range(0, len(group_sig), n_next):
            sig = tuple(group_sig[start : start + n_next])
            new_group_sig.append(new_ids.setdefault(sig, len(new_ids)))
        sig_ids, group_sig = new_ids, new_group_sig
    return _Solved(levels, slot_sigs, 0)


def _flatten(solved: _Solved, states: StateSpace, topo: Topology) -> list[Stage]:
    """Walk the optimal choices from the outermost level down; one :class:`Stage` per innermost stage."""
    pred = states.pred
    S = states.size
    out: list[Stage] = []

    def walk(level: int, sig: int, r: int, j: int, m: int, chain: list[tuple[int, int, TracedStage, bool]],
             cut_first: int | None) -> None:
        costs, sol = solved.levels[level][sig]
        traced = trace(costs, pred, sol, r, j, m)
        for idx, st in enumerate(traced):
            here = chain + [(level, sig, st, idx == 0)]
            cut = cut_first if idx == 0 else level
            if level == 0:
                # the stage's time as each enclosing level charges it, innermost first
                t = st.value
                for lv, sg, outer, first in reversed(chain):
                    t = solved.levels[lv][sg][0].charge(t, outer.row, outer.end, outer.slots, first)
                slots = [(x.slot_start, x.slots) for _, _, x, _ in here]
                tp = solved.levels[0][sig][0].best_tp(st.row, st.end, st.slots, idx == 0)
                out.append(Stage([], 0, [], slots, cut, t, st.row, st.end, tp=tp))
                continue
            inner = solved.slot_sigs[level][sig][st.slot_start : st.slot_start + st.slots]
            inner_n = topo.levels[level - 1].workers
            # the slowest inner group type sets the pace; all replicas run its split
            chosen = max(set(inner), key=lambda s: solved.levels[level - 1][s][1].table[st.row, st.end, inner_n - 1])
            walk(level - 1, chosen, st.row, st.end, inner_n - 1, here, cut)

    top = len(topo.levels) - 1
    walk(top, solved.final_sig, 0, S - 1, topo.levels[top].workers - 1, [], None)
    n_levels = len(topo.levels)
    strides = [topo.stride(n_levels - 1 - i) for i in range(n_levels)]
    for st in out:
        ranges = [range(a, a + c) for a, c in st.slots]
        st.workers = sorted(sum(s * k for s, k in zip(combo, strides)) for combo in itertools.product(*ranges))
        st.replicas = len(st.workers) // st.tp
    return out


def _level_splits(solved: _Solved, states: StateSpace, topo: Topology,
                  comp_state: np.ndarray) -> list[list[tuple[int, int, float, int]]]:
    """PipeDream's printout: per level (outermost first), (start, end, compute_s, replicas)."""
    result = []
    S = states.size
    spans = [(0, S - 1)]
    for level in range(len(topo.levels) - 1, -1, -1):
        rows = []
        next_spans = []
        n = topo.levels[level].workers
        for r, j in spans:
            costs, sol = solved.levels[level][0] if 0 in solved.levels[level] else next(iter(solved.levels[level].values()))
            for st in trace(costs, states.pred, sol, r, j, n - 1):
                before = comp_state[st.row - 1] if st.row > 0 else 0.0
                rows.append((st.row, st.end + 1, float(comp_state[st.end] - before), st.slots))
                next_spans.append((st.row, st.end))
        result.append(rows)
        spans = next_spans
    return result


# -- node assignment -------------------------------------------------------------------
def _assign(graph: Graph, stages: list[Stage], states: StateSpace, g: GraphArrays, notes: list[str]) -> list[Stage]:
    stage_of: dict[str, int] = {}
    for i, st in enumerate(stages):
        for idx in np.flatnonzero(states.members[st.end]):
            nid = g.node_ids[idx]
            if nid not in stage_of:
                stage_of[nid] = i
    order = graph.topological_order()
    for nid in order:  # pinned inputs, dropped sinks, anything no state reached
        if nid in stage_of:
            continue
        preds = [stage_of[p] for p in graph.predecessors(nid) if p in stage_of]
        if graph[nid].is_input and not graph.predecessors(nid):
            stage_of[nid] = 0
        elif preds:
            stage_of[nid] = max(preds)
        else:
            stage_of[nid] = 0
    for nid in order:
        stages[stage_of[nid]].nodes.append(nid)
    kept = [st for st in stages if st.nodes]
    if len(kept) < len(stages):
        notes.append(
            f"{len(stages) - len(kept)} stage(s) of the optimum were empty once nodes were assigned "
            "(a PipeDream quirk: it solves inner levels over non-nested state pairs); their workers stay idle"
        )
    return kept


# -- entry point -----------------------------------------------------------------------
def _state_spaces(g: GraphArrays, topo: Topology, opt: PlanOptions, closure: np.ndarray) -> list[StateSpace]:
    """Candidate state spaces: the exact one if affordable, else prefixes of several orders."""
    if opt.search in ("auto", "exact"):
        try:
            if int((~g.base).sum()) > opt.max_states:  # every prefix of a topological order is a state
                raise TooManyStates(int((~g.base).sum()))
            if opt.cost_model == "pipedream":
                exact = pipedream_states(g, opt.max_states, closure)
            else:
                try:
                    exact = all_downsets(g, opt.max_states)
                except TooManyStates:  # zero-cost views and sinks multiply states for nothing
                    if not any(mask.any() for mask in zero_cost_glue(g)):
                        raise
                    exact = all_downsets(g, opt.max_states, glue=True)
        except TooManyStates:
            if opt.search == "exact":
                raise PipeshiftError(
                    f"exact search: more than {opt.max_states} states (branchy graph); "
                    "use --search auto or prefix, or raise --max-states"
                ) from None
            exact = None
        if exact is not None:
            if opt.search == "exact" or _estimated_work(exact.size, topo, opt.straight) <= opt.work_budget:
                return [exact]
    spaces = []
    orders = prefix_orders(g)
    # the orders share the work budget: past it, each keeps fewer (the cheapest) cut points
    cap = max(16, int(min(opt.max_states, _prefix_cap(topo, opt.work_budget / max(1, len(orders)), opt.straight))))
    for name, order in orders.items():
        if opt.cost_model == "pipedream":
            # PipeDream's states start from its first source alone
            first = int(np.flatnonzero(g.adj.sum(axis=0) == 0)[0])
            if order and order[0] != first:
                continue
        spaces.append(prefix_states(g, order, name, cap))
    if not spaces:
        spaces.append(prefix_states(g, next(iter(orders.values())), "profile", cap))
    return spaces


def _prefix_cap(topo: Topology, budget: float, straight: bool) -> float:
    """Largest state count whose DP fits the work budget."""
    lo, hi = 16, 1 << 16
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _estimated_work(mid, topo, straight) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def planning_graph(graph: Graph, cost_model: str) -> GraphArrays:
    if cost_model == "pipedream":
        nodes, _inputs, _dropped = pd_cost.planning_nodes(graph)
        return GraphArrays.from_graph(graph, nodes)
    inputs = [nid for nid in graph.sources() if graph[nid].is_input]
    return GraphArrays.from_graph(graph, list(graph.nodes), base=inputs)


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """The planner's matrix products are small: a multi-threaded BLAS only fights for the cores
    (a 177×177 product took 10–20 ms instead of 0.1 ms on a loaded 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # it comes with scikit-learn; without it, run as numpy is configured
        return contextlib.nullcontext()
    limits: contextlib.AbstractContextManager[object] = threadpool_limits(1, "blas")
    return limits


def make_plan(graph: Graph, topo: Topology, opt: PlanOptions) -> PlanResult:
    """Plan ``graph`` on ``topo``; raises :class:`PipeshiftError` when no plan exists."""
    with _one_blas_thread():
        return _make_plan(graph, topo, opt)


def _make_plan(graph: Graph, topo: Topology, opt: PlanOptions) -> PlanResult:
    if opt.cost_model not in COST_MODELS:
        raise PipeshiftError(f"unknown cost model {opt.cost_model!r}; choose from {', '.join(COST_MODELS)}")
    if opt.search not in SEARCHES:
        raise PipeshiftError(f"unknown search {opt.search!r}; choose from {', '.join(SEARCHES)}")
    if opt.cost_model == "pipedream" and topo.speeds is not None and len(set(topo.speeds)) > 1:
        raise PipeshiftError("--worker-speeds needs --cost-model pipeshift (PipeDream's model has no per-worker speeds)")
    if len(graph) == 0:
        raise PipeshiftError("the graph has no nodes")
    g = planning_graph(graph, opt.cost_model)
    if g.n == 0 or not (~g.base).any():
        raise PipeshiftError("the graph has no layers to place (only raw inputs)")
    if opt.serving and opt.cost_model != "pipeshift":
        raise PipeshiftError("--objective serve needs --cost-model pipeshift (PipeDream's model is for training)")
    if opt.tp.active and topo.speeds is not None and len(set(topo.speeds)) > 1:
        raise PipeshiftError("--tp with --worker-speeds is not supported: TP groups assume equal workers")
    opt = with_tp_nodes(graph, g, opt)
    closure = g.closure()
    notes: list[str] = []
    candidates: dict[str, float] = {}
    spaces = [st for st in _state_spaces(g, topo, opt, closure) if st.size]
    value, states, solved = _solve_spaces(g, spaces, topo, opt, closure, candidates)
    if opt.latency_slo_s is not None:
        if not math.isfinite(value):
            raise PipeshiftError(_why_infeasible(g, states, topo, opt))
        value, states, solved = _within_latency(graph, g, spaces, topo, opt, closure, candidates, notes,
                                                (value, states, solved))
        stages = _assign(graph, _flatten(solved, states, topo), states, g, notes)
        return PlanResult(value, stages, states, g, [], notes, candidates)
    placed = _best_placement(g, topo, opt, closure, notes, candidates)
    if placed is not None and placed[0] < value * (1 - 1e-9):
        # the levels' worst links over-charge this topology: a placed straight pipeline is faster
        p_value, p_states, p_stages = placed
        stages = _assign(graph, p_stages, p_states, g, notes)
        return PlanResult(p_value, stages, p_states, g, [], notes, candidates)
    if not math.isfinite(value):
        raise PipeshiftError(_why_infeasible(g, states, topo, opt))
    stages = _flatten(solved, states, topo)
    stages = _assign(graph, stages, states, g, notes)
    comp_state = states.members.astype(np.float64) @ (opt.compute_ms(g) / 1000.0)
    splits = _level_splits(solved, states, topo, comp_state) if len(solved.levels[0]) == 1 else []
    return PlanResult(value, stages, states, g, splits, notes, candidates)


def _solve_spaces(g: GraphArrays, spaces: list[StateSpace], topo: Topology, opt: PlanOptions, closure: np.ndarray,
                  candidates: dict[str, float], cut_limit: float | None = None) -> tuple[float, StateSpace, _Solved]:
    """The best of the DP's optima over the candidate state spaces."""
    best: tuple[float, StateSpace, _Solved] | None = None
    for states in spaces:
        if opt.cost_model == "pipedream":
            solved = _solve_pipedream(g, states, topo, opt, closure)
        else:
            solved = _solve_pipeshift(g, states, topo, opt, cut_limit)
        value = solved.optimum(states.size)
        if cut_limit is None:
            candidates[states.order_name or states.mode] = value
        if best is None or value < best[0]:
            best = (value, states, solved)
    if best is None:
        raise PipeshiftError("the graph has no places to cut")
    return best


def predicted_latency_s(graph: Graph, stages: list[Stage], states: StateSpace, g: GraphArrays, topo: Topology,
                        opt: PlanOptions) -> float:
    """A batch's way through the pipeline: every stage's compute on one replica, one transfer per cut."""
    index = {nid: i for i, nid in enumerate(g.node_ids)}
    cut = frontier_bytes(g, states.members) / (opt.compression or 1.0)
    times = opt.compute_ms(g)
    total = 0.0
    for k, st in enumerate(stages):
        idx = [index[n] for n in st.nodes if n in index]
        total += float(times[idx].sum()) / 1000.0 / min(topo.speed_of(w) for w in st.workers)
        if k:
            level = topo.levels[st.cut_level if st.cut_level is not None else 0]
            total += level.latency + float(cut[stages[k - 1].end]) / level.bandwidth
    return total


def _within_latency(graph: Graph, g: GraphArrays, spaces: list[StateSpace], topo: Topology, opt: PlanOptions,
                    closure: np.ndarray, candidates: dict[str, float], notes: list[str],
                    best: tuple[float, StateSpace, _Solved]) -> tuple[float, StateSpace, _Solved]:
    """The fastest plan whose batch latency meets ``opt.latency_slo_s``.

    A batch's latency is the whole forward plus one transfer per cut, so with equal workers
    only the cuts make it grow: when the throughput optimum is too slow, the DP is solved again
    with ever fewer cuts allowed (every cut heavier than a threshold forbidden, thresholds from
    the heaviest cut down to none: one stage, replicated), and the first plan that meets the
    objective is kept — the fastest of that sequence, not a proof of the constrained optimum.
    """
    slo = float(opt.latency_slo_s or 0.0)

    def latency(candidate: tuple[float, StateSpace, _Solved]) -> float:
        value, states, solved = candidate
        if not math.isfinite(value):
            return math.inf
        return predicted_latency_s(graph, _assign(graph, _flatten(solved, states, topo), states, g, []), states, g,
                                   topo, opt)

    seen = latency(best)
    if seen <= slo:
        notes.append(f"predicted batch latency {seen * 1000:.4g} ms meets --latency-slo {slo * 1000:g} ms")
        return best
    cuts = np.unique(np.concatenate([frontier_bytes(g, st.members) for st in spaces]))
    cuts = cuts[np.isfinite(cuts)][::-1]
    if len(cuts) > 16:
        cuts = np.unique(np.quantile(cuts, np.linspace(0.0, 1.0, 16)))[::-1]
    lowest = seen
    for limit in [*cuts[1:], -1.0]:
        candidate = _solve_spaces(g, spaces, topo, opt, closure, candidates, cut_limit=float(limit))
        seen = latency(candidate)
        lowest = min(lowest, seen)
        if seen <= slo:
            notes.append(f"--latency-slo {slo * 1000:g} ms: cuts above {max(limit, 0):.4g} bytes forbidden; "
                         f"predicted batch latency {seen * 1000:.4g} ms, throughput {best[0] / candidate[0]:.3g}x "
                         "the unconstrained optimum")
            return candidate
    one = float(opt.compute_ms(g).sum()) / 1000.0 / max(topo.speed_of(w) for w in range(topo.num_workers))
    raise PipeshiftError(f"no plan meets --latency-slo {slo * 1000:g} ms: the lowest predicted batch latency found "
                         f"is {lowest * 1000:.4g} ms (the whole forward on one worker takes {one * 1000:.4g} ms)")


def _best_placement(g: GraphArrays, topo: Topology, opt: PlanOptions, closure: np.ndarray, notes: list[str],
                    candidates: dict[str, float]) -> tuple[float, StateSpace, list[Stage]] | None:
    """The straight pipeline placed on the measured link matrix, when the topology has one."""
    links = topo.links
    if links is None or links.num_workers < 2:
        return None
    if opt.cost_model != "pipeshift":
        notes.append("the measured link matrix is summarised to its levels' worst links: "
                     "PipeDream's cost model has one bandwidth per level (use --cost-model pipeshift to place ranks)")
        return None
    if links.num_workers > placement.MAX_WORKERS:
        notes.append(f"rank placement is searched for up to {placement.MAX_WORKERS} workers; "
                     f"{links.num_workers} were planned on the levels' worst links")
        return None
    speeds = np.array(topo.speeds if topo.speeds is not None else [1.0] * topo.num_workers)
    memory = opt.memory()
    best: tuple[float, StateSpace, list[Stage]] | None = None
    for states in _state_spaces(g, topo, opt, closure):
        if states.size == 0:
            continue
        if placement.estimated_work(states.size, links.num_workers) > 4 * opt.work_budget:
            notes.append(f"rank placement skipped for {states.size} states (over the work budget)")
            continue
        valid = _valid_rows(states)
        members = states.members.astype(np.float64)
        cut = frontier_bytes(g, states.members)
        if opt.compression is not None:
            cut = cut / opt.compression
        dups, ties = _tie_ranges(g, states, valid)
        # a split tie's ring, priced on the matrix's slowest link (which pair holds its other copy
        # is not known until the placement is)
        off = ~np.eye(links.num_workers, dtype=bool)
        tie_s = ps_cost.tie_allreduce(ties.split_bytes, ties.split_count, 1.0, float(links.bandwidth[off].min()),
                                      float(links.latency[off].max())) / opt.schedule.sync(1.0)
        found = placement.solve(
            _range_sums(members @ (opt.compute_ms(g) / 1000.0), valid, np.inf),
            _range_sums(members @ g.parameter, valid, 0.0) - dups[0],
            _range_sums(members @ opt.held_bytes(g), valid, 0.0),
            cut, states.successors(), links, speeds, opt.schedule, memory, opt.fewer_machines, extra=tie_s,
        )
        if found is None:
            continue
        candidates[f"placement:{states.order_name or states.mode}"] = found.value
        if best is None or found.value < best[0]:
            stages = [Stage([], 1, [st.worker], [(st.worker, 1)] * len(topo.levels), None, st.value, st.row, st.end,
                            placed=True) for st in found.stages]
            best = (found.value, states, stages)
    return best


def _why_infeasible(g: GraphArrays, states: StateSpace, topo: Topology, opt: PlanOptions) -> str:
    n = topo.num_workers
    if opt.straight and not opt.fewer_machines and states.size < n:
        return (
            f"a straight pipeline on {n} workers needs {n} stages but the graph has only {states.size} "
            f"places to cut ({g.n} nodes); use fewer workers, --use_fewer_machines, or allow replication"
        )
    if opt.memory_limit is not None:
        return (
            f"no plan fits in {opt.memory_limit:.4g} bytes per worker "
            f"(the model's parameters alone are {g.parameter.sum():.4g} bytes); "
            "raise the memory size, add workers, or use a schedule with fewer microbatches in flight"
        )
    if opt.straight and not opt.fewer_machines:
        return f"no straight pipeline of exactly {n} stages exists for this graph; try --use_fewer_machines"
    return "no feasible plan for this graph and topology"
