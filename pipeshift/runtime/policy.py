"""When to repartition: measured stage times in, a logged yes/no (and a new split) out.

This module is pure logic — numbers in, numbers out, no processes, no sockets — so every rule can
be unit-tested and every decision replayed from its log line. The rules:

* **Speed factors.** Worker ``k`` runs stage ``k``. Its speed factor is its measured compute time
  per minibatch divided by the profiled time of the nodes it runs; a worker twice as slow as the
  profile has factor 2. Re-planning multiplies each node's profiled time by the factor of the
  worker that would run it.
* **Detection with hysteresis.** A window's *imbalance* is the largest relative deviation of a
  stage's measured time from what the policy expects of it (the profile scaled by the speed
  factors last accepted). Above ``threshold`` the streak grows; below ``clear_threshold`` it
  resets; in between it holds. Only a streak of ``persist_windows`` leads to a re-plan, so a
  single noisy window never does, and a signal hovering at the threshold does not flap.
* **Worth it, beyond the noise?** The re-plan uses the speed factors averaged over the windows
  of the streak, and each of those windows also prices the gain on its own: the new split's
  time saved per minibatch under that window's speeds. The gain counted is a *lower confidence
  bound*, mean − ``confidence_z`` × standard error over those windows, so a gain that noise alone
  could produce (windows disagreeing about who is slow, or by how much) is no gain. It must
  exceed ``min_relative_gain`` of the current time, and times the remaining minibatches it must
  repay the migration: bytes that change owner / bandwidth + a fixed pause, or the pause last
  measured when that was longer (:meth:`RepartitionPolicy.record_pause`). After a repartition,
  ``cooldown_windows`` windows are ignored: they measure a pipeline that is still switching.
  After a re-plan that is not worth it, the measured speeds become the new expectation, so the
  same finding is not re-examined every window.

The cost model is PipeDream's straight-pipeline bottleneck: the time per minibatch is the
slowest of the stages' compute times and the boundaries' communication times (activation
forward plus gradient backward over the link). The built-in re-planner is the exact dynamic
programme for that model over a topological order of the graph; the real planner can be injected
as any callable taking a :class:`ReplanRequest`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.graph.ir import Graph
from pipeshift.plan import NodeLists, Plan

# Optimizer state held per parameter byte: SGD none, momentum one buffer, Adam two moments.
OPTIMIZER_STATE_FACTOR: dict[str, float] = {"sgd": 0.0, "momentum": 1.0, "adam": 2.0, "adamw": 2.0}


class PlanFormatError(PipeshiftError):
    """A plan whose stages are not a partition of the graph's nodes."""


# -- plans as node lists ----------------------------------------------------------------

def stages_of(plan: Plan | Sequence[Sequence[str]]) -> NodeLists:
    """The node lists of a :class:`Plan`, or node lists a re-planner returned, checked.

    A plan was checked when it was parsed; bare node lists must be non-empty lists of strings
    with no node twice.
    """
    if isinstance(plan, Plan):
        return plan.node_lists
    if not isinstance(plan, Sequence) or isinstance(plan, str) or not plan:
        raise PlanFormatError("a plan must be a JSON object with 'stages'")
    seen: dict[str, int] = {}
    for k, nodes in enumerate(plan):
        if not isinstance(nodes, (list, tuple)) or not nodes:
            raise PlanFormatError(f"stage {k} has no nodes (every stage needs at least one node)")
        for node in nodes:
            if not isinstance(node, str):
                raise PlanFormatError(f"stage {k}: node ids must be strings, got {node!r}")
            if node in seen:
                raise PlanFormatError(f"node {node} is in stage {seen[node]} and stage {k}")
            seen[node] = k
    return [list(nodes) for nodes in plan]


def stage_of_node(stages: NodeLists) -> dict[str, int]:
    return {node: k for k, nodes in enumerate(stages) for node in nodes}


@dataclasses.dataclass(frozen=True)
class Move:
    """One node whose state changes owner: its parameters, buffers and optimizer state."""

    node: str
    fqn: str | None
    from_stage: int
    to_stage: int
    bytes: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def diff_plans(
    old: Plan | Sequence[Sequence[str]], new: Plan | Sequence[Sequence[str]], node_bytes: Mapping[str, float], node_fqns: Mapping[str, str] | None = None
) -> list[Move]:
    """The nodes that change stage between two plans, in the new plan's order, with their bytes.

    Both plans must cover the same nodes. Nodes that keep their stage are not listed; a node with
    no entry in ``node_bytes`` moves nothing (a parameter-free op still changes owner).
    """
    old_of, new_of = stage_of_node(stages_of(old)), stage_of_node(stages_of(new))
    if set(old_of) != set(new_of):
        only_old = sorted(set(old_of) - set(new_of))[:3]
        only_new = sorted(set(new_of) - set(old_of))[:3]
        raise PlanFormatError(f"plans cover different nodes (only in old: {only_old}, only in new: {only_new})")
    fqns = node_fqns or {}
    return [
        Move(node, fqns.get(node), old_of[node], k, float(node_bytes.get(node, 0.0)))
        for k, nodes in enumerate(stages_of(new))
        for node in nodes
        if old_of[node] != k
    ]


# -- the chain: a graph flattened to one execution order --------------------------------
@dataclasses.dataclass
class Chain:
    """A graph's nodes in a topological order, with the per-node numbers the policy uses.

    ``edges`` are (producer position, consumer position) pairs; ``activation_bytes[i]`` is what
    node ``i`` sends to each later stage that consumes it.
    """

    node_ids: list[str]
    node_times_s: np.ndarray  # (n,) profiled forward + backward seconds per minibatch
    activation_bytes: np.ndarray  # (n,)
    state_bytes: np.ndarray  # (n,) parameters + buffers + optimizer state
    edges: np.ndarray  # (e, 2) int positions
    fqns: list[str | None]
    # (n,) bool: the node must share a stage with the next one (a raw input: a stage holding only
    # inputs has no operation to run, and codegen refuses it). None: no such node.
    glued: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.position = {node: i for i, node in enumerate(self.node_ids)}

    def __len__(self) -> int:
        return len(self.node_ids)

    @property
    def node_bytes(self) -> dict[str, float]:
        return dict(zip(self.node_ids, self.state_bytes.tolist()))

    @property
    def node_fqns(self) -> dict[str, str]:
        return {node: fqn for node, fqn in zip(self.node_ids, self.fqns) if fqn}

    def cut_bytes(self) -> np.ndarray:
        """(n+1,): bytes crossing a cut placed before position j of the chain (0 at both ends).

        A node's output crosses every cut between it and its last consumer, because a straight
        pipeline forwards a tensor through the stages in between.
        """
        n = len(self)
        last = np.arange(n)
        if len(self.edges):
            np.maximum.at(last, self.edges[:, 0], self.edges[:, 1])
        diff = np.zeros(n + 2)
        np.add.at(diff, np.arange(n) + 1, self.activation_bytes)
        np.add.at(diff, last + 1, -self.activation_bytes)
        crossing = np.cumsum(diff)[: n + 1]
        crossing[0] = crossing[n] = 0.0
        return crossing

    def assignment(self, stages: NodeLists) -> np.ndarray:
        """(n,) stage index of each chain position; the stages must cover exactly the chain."""
        of = stage_of_node(stages)
        missing = [node for node in self.node_ids if node not in of]
        extra = [node for node in of if node not in self.position]
        if missing or extra:
            raise PlanFormatError(f"plan does not match the graph (not in plan: {missing[:3]}, not in graph: {extra[:3]})")
        return np.array([of[node] for node in self.node_ids], dtype=np.int64)


def chain_from_graph(graph: Graph, optimizer: str = "adam") -> Chain:
    """Flatten a profiled graph (graph.txt + profile.json metadata) into a :class:`Chain`."""
    if optimizer not in OPTIMIZER_STATE_FACTOR:
        raise PipeshiftError(f"unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZER_STATE_FACTOR)})")
    order = graph.topological_order()
    position = {node: i for i, node in enumerate(order)}
    nodes = [graph[node] for node in order]
    params = np.array([n.parameter_size for n in nodes], dtype=float)
    buffers = np.array([float(n.meta.get("buffer_bytes", 0) or 0) for n in nodes])
    edges = np.array([(position[a], position[b]) for a, b in graph.edges], dtype=np.int64).reshape(-1, 2)
    fqns = [n.meta.get("fqn") if isinstance(n.meta.get("fqn"), str) else None for n in nodes]
    return Chain(
        node_ids=order,
        node_times_s=np.array([(n.forward_ms + n.backward_ms) / 1e3 for n in nodes]),
        activation_bytes=np.array([n.activation_bytes for n in nodes]),
        state_bytes=params * (1.0 + OPTIMIZER_STATE_FACTOR[optimizer]) + buffers,
        edges=edges,
        fqns=fqns,
        glued=np.array([n.is_input or n.meta.get("op") == "placeholder" for n in nodes], dtype=bool),
    )


# -- cost model -------------------------------------------------------------------------
def stage_compute_s(chain: Chain, assignment: np.ndarray, num_stages: int, speed: np.ndarray | None = None) -> np.ndarray:
    """(K,) compute seconds per minibatch of each stage, each scaled by its worker's speed factor."""
    profiled = np.bincount(assignment, weights=chain.node_times_s, minlength=num_stages)
    return profiled if speed is None else profiled * speed


def boundary_bytes(chain: Chain, assignment: np.ndarray, num_stages: int) -> np.ndarray:
    """(K-1,) bytes crossing each stage boundary: outputs of stages ≤ k consumed by stages > k."""
    furthest = assignment.copy()
    if len(chain.edges):
        np.maximum.at(furthest, chain.edges[:, 0], assignment[chain.edges[:, 1]])
    diff = np.zeros(num_stages + 1)
    np.add.at(diff, assignment, chain.activation_bytes)
    np.add.at(diff, furthest, -chain.activation_bytes)
    return np.cumsum(diff)[: num_stages - 1]


def pipeline_time_s(chain: Chain, assignment: np.ndarray, num_stages: int, speed: np.ndarray, bandwidth: float) -> float:
    """Bottleneck time per minibatch: the slowest stage or boundary (activation + gradient)."""
    compute = stage_compute_s(chain, assignment, num_stages, speed)
    comm = 2.0 * boundary_bytes(chain, assignment, num_stages) / bandwidth
    return float(max(compute.max(), comm.max(initial=0.0)))


# -- the built-in re-planner ------------------------------------------------------------
def straight_pipeline_dp(stage_node_times: np.ndarray, cut_cost: np.ndarray | None = None) -> tuple[list[int], float]:
    """Split a chain into K contiguous non-empty stages minimising the bottleneck, exactly.

    ``stage_node_times[k, i]`` is node ``i``'s time on worker ``k`` (stage ``k``); ``cut_cost[j]``
    the cost of a boundary before position ``j``. The objective is
    ``max(max_k sum(stage k's times on worker k), max over boundaries of cut_cost)``.
    Returns the K+1 boundaries ``[0, b1, …, n]`` and the objective. O(K·n²) time, vectorised
    over the (start, end) matrix of each stage.
    """
    times = np.asarray(stage_node_times, dtype=float)
    if times.ndim != 2:
        raise ValueError("stage_node_times must be a (workers, nodes) matrix")
    workers, n = times.shape
    if workers < 1 or n < workers:
        raise PipeshiftError(f"cannot split {n} nodes into {workers} non-empty stages")
    cut = np.zeros(n + 1) if cut_cost is None else np.asarray(cut_cost, dtype=float)
    prefix = np.concatenate([np.zeros((workers, 1)), np.cumsum(times, axis=1)], axis=1)  # (K, n+1)
    start, end = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    invalid = start >= end
    best = np.full((workers, n + 1), np.inf)
    best[0, 1:] = prefix[0, 1:]
    choice = np.zeros((workers, n + 1), dtype=np.int64)
    for k in range(1, workers):
        span = prefix[k][None, :] - prefix[k][:, None]  # [i, j] = time of nodes i..j-1 on worker k
        candidate = np.maximum(np.maximum(best[k - 1], cut)[:, None], span)
        candidate[invalid] = np.inf
        choice[k] = np.argmin(candidate, axis=0)
        best[k] = candidate[choice[k], np.arange(n + 1)]
    bounds = [n]
    for k in range(workers - 1, 0, -1):
        bounds.append(int(choice[k, bounds[-1]]))
    bounds.append(0)
    return bounds[::-1], float(best[workers - 1, n])


def brute_force_straight_pipeline(stage_node_times: np.ndarray, cut_cost: np.ndarray | None = None) -> float:
    """The same objective by enumerating every split; for tests on small chains only."""
    times = np.asarray(stage_node_times, dtype=float)
    workers, n = times.shape
    cut = np.zeros(n + 1) if cut_cost is None else np.asarray(cut_cost, dtype=float)
    best = np.inf
    for inner in itertools.combinations(range(1, n), workers - 1):
        bounds = (0, *inner, n)
        value = max(times[k, bounds[k] : bounds[k + 1]].sum() for k in range(workers))
        value = max([value, *(cut[b] for b in inner)])
        best = min(best, value)
    return float(best)


@dataclasses.dataclass
class ReplanRequest:
    """What a re-planner gets: the chain and each worker's view of each node's time."""

    node_ids: list[str]
    node_times_s: np.ndarray  # (workers, nodes): profiled time × that worker's speed factor
    speed_factors: np.ndarray  # (workers,)
    cut_comm_s: np.ndarray  # (nodes+1,): time of a boundary before position j
    current_stages: NodeLists
    glued: np.ndarray | None = None  # (nodes,) bool: must share a stage with the next node


Replanner = Callable[[ReplanRequest], NodeLists]


def builtin_replan(request: ReplanRequest) -> NodeLists:
    """The exact straight-pipeline DP; a glued node is fused with its successor first."""
    n = len(request.node_ids)
    glued = np.zeros(n, dtype=bool) if request.glued is None else np.asarray(request.glued, dtype=bool)
    starts = [0] + [i + 1 for i in range(n - 1) if not glued[i]]  # first position of each fused group
    times = np.add.reduceat(np.asarray(request.node_times_s, dtype=float), starts, axis=1)
    cut = np.asarray(request.cut_comm_s, dtype=float)[starts + [n]]
    bounds, _ = straight_pipeline_dp(times, cut)
    positions = [(starts + [n])[b] for b in bounds]
    return [request.node_ids[positions[k] : positions[k + 1]] for k in range(len(positions) - 1)]


# -- the policy -------------------------------------------------------------------------
@dataclasses.dataclass
class PolicyConfig:
    threshold: float = 0.15  # imbalance that counts toward a repartition
    clear_threshold: float = 0.05  # imbalance below which the streak resets
    persist_windows: int = 3  # consecutive windows above threshold before re-planning
    cooldown_windows: int = 3  # windows ignored after a repartition
    min_relative_gain: float = 0.02  # smaller predicted gains are within the model's error
    bandwidth_bytes_per_s: float = 1.0e9  # link used for both activations and migration
    fixed_pause_s: float = 0.5  # per-migration cost beyond the bytes (sync, regenerate stages)
    default_horizon_steps: int = 1000  # remaining steps when the job does not say
    confidence_z: float = 2.0  # the gain counted is mean - z x standard error over the streak's windows
    warmup_windows: int = 1  # windows ignored at the start (PolicyDriver), before calibrating

    def __post_init__(self) -> None:
        if not 0 <= self.clear_threshold <= self.threshold:
            raise PipeshiftError("policy: need 0 <= clear_threshold <= threshold")
        if self.persist_windows < 1 or self.cooldown_windows < 0:
            raise PipeshiftError("policy: persist_windows must be >= 1 and cooldown_windows >= 0")
        if self.bandwidth_bytes_per_s <= 0:
            raise PipeshiftError("policy: bandwidth must be positive")
        if self.confidence_z < 0 or self.warmup_windows < 0:
            raise PipeshiftError("policy: confidence_z and warmup_windows must be >= 0")


@dataclasses.dataclass
class Decision:
    """One window's verdict with every number that led to it (a JSON line in the decisions log)."""

    window: int
    step: int | None
    repartition: bool
    reason: str
    imbalance: float
    streak: int
    measured_s: list[float]
    expected_s: list[float]
    speed_factors: list[float]
    current_time_s: float | None = None
    new_time_s: float | None = None
    gain_per_step_s: float | None = None
    remaining_steps: int | None = None
    total_gain_s: float | None = None
    migration_bytes: float | None = None
    migration_cost_s: float | None = None
    moves: list[dict[str, Any]] | None = None
    new_stages: NodeLists | None = None
    new_predicted_s: list[float] | None = None
    gain_lower_bound_s: float | None = None  # mean gain - z x standard error over the windows judged
    gain_noise_s: float | None = None  # that standard error
    windows_judged: int | None = None
    event: str = "policy_decision"  # or policy_warmup / policy_calibrated (PolicyDriver)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {"event": out.pop("event"), **out}


class RepartitionPolicy:
    """Stateful wrapper around the rules above: feed it one window at a time via :meth:`observe`."""

    def __init__(
        self, chain: Chain, stages: Plan | Sequence[Sequence[str]], config: PolicyConfig | None = None, replan: Replanner | None = None
    ) -> None:
        self.chain = chain
        self.config = config or PolicyConfig()
        self.replan = replan or builtin_replan
        self.window = 0
        self.streak = 0
        self.cooldown_left = 0
        self.recent: list[np.ndarray] = []  # measured windows of the current streak
        self.measured_pause_s: float | None = None
        self.expected_speed = np.ones(0)
        self.adopt(stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def adopt(self, stages: Plan | Sequence[Sequence[str]], speed_factors: Sequence[float] | np.ndarray | None = None) -> None:
        """Make ``stages`` the current split (after our own decision or an operator's).

        Without ``speed_factors`` each worker keeps the speed expected of it (worker k runs stage k
        whatever its nodes), or 1 when the number of stages changed.
        """
        self.stages = stages_of(stages)
        self.assignment = self.chain.assignment(self.stages)
        k = self.num_stages
        if speed_factors is not None:
            self.expected_speed = np.asarray(speed_factors, dtype=float)
        elif self.expected_speed.shape != (k,):
            self.expected_speed = np.ones(k)
        if self.expected_speed.shape != (k,):
            raise PipeshiftError(f"policy: {len(self.expected_speed)} speed factors for {k} stages")
        self.streak = 0
        self.recent = []

    def record_pause(self, seconds: float) -> None:
        """The pause a migration of this job really took: later decisions charge at least that."""
        if seconds >= 0:
            self.measured_pause_s = float(seconds)

    def expected_s(self) -> np.ndarray:
        return stage_compute_s(self.chain, self.assignment, self.num_stages, self.expected_speed)

    def speed_factors(self, measured_s: np.ndarray) -> np.ndarray:
        profiled = stage_compute_s(self.chain, self.assignment, self.num_stages)
        return np.where(profiled > 0, measured_s / np.where(profiled > 0, profiled, 1.0), self.expected_speed)

    def observe(self, measured_s: Sequence[float] | np.ndarray, step: int | None = None,
                remaining_steps: int | None = None) -> Decision:
        """Judge one window of measured per-stage compute seconds per minibatch."""
        cfg = self.config
        measured = np.asarray(measured_s, dtype=float)
        if measured.shape != (self.num_stages,) or not np.all(np.isfinite(measured)) or np.any(measured < 0):
            raise PipeshiftError(f"policy: need {self.num_stages} finite non-negative stage times, got {list(measured_s)}")
        self.window += 1
        expected = self.expected_s()
        ratio = np.where(expected > 0, measured / np.where(expected > 0, expected, 1.0), 1.0)
        imbalance = float(np.abs(ratio - 1.0).max())
        speed = self.speed_factors(measured)

        def decide(repartition: bool, reason: str, **numbers: Any) -> Decision:
            return Decision(
                window=self.window, step=step, repartition=repartition, reason=reason, imbalance=imbalance,
                streak=self.streak, measured_s=measured.tolist(), expected_s=expected.tolist(),
                speed_factors=speed.tolist(), **numbers,
            )

        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.streak = 0
            return decide(False, f"cool-down after a repartition ({self.cooldown_left} windows left)")
        if imbalance > cfg.threshold:
            self.streak += 1
            self.recent = [*self.recent, measured][-cfg.persist_windows:]
        elif imbalance < cfg.clear_threshold:
            self.streak = 0
            self.recent = []
        if self.streak < cfg.persist_windows:
            state = "balanced" if self.streak == 0 else f"imbalance persisting {self.streak}/{cfg.persist_windows}"
            return decide(False, state)
        return self._evaluate(speed, step, remaining_steps, decide)

    def _evaluate(self, speed: np.ndarray, step: int | None, remaining_steps: int | None,
                  decide: Callable[..., Decision]) -> Decision:
        cfg, chain, k = self.config, self.chain, self.num_stages
        windows = [self.speed_factors(m) for m in self.recent] or [speed]
        speed = np.mean(windows, axis=0)  # the streak's average: one window's noise moves it less
        cut_comm = 2.0 * chain.cut_bytes() / cfg.bandwidth_bytes_per_s
        request = ReplanRequest(
            node_ids=list(chain.node_ids), node_times_s=np.outer(speed, chain.node_times_s),
            speed_factors=speed.copy(), cut_comm_s=cut_comm, current_stages=[list(s) for s in self.stages],
            glued=None if chain.glued is None else chain.glued.copy(),
        )
        new_stages = stages_of(self.replan(request))
        if len(new_stages) != k:
            raise PipeshiftError(f"policy: the re-planner returned {len(new_stages)} stages for {k} workers")
        new_assignment = chain.assignment(new_stages)
        bw = cfg.bandwidth_bytes_per_s
        current = pipeline_time_s(chain, self.assignment, k, speed, bw)
        new = pipeline_time_s(chain, new_assignment, k, speed, bw)
        gains = np.array([pipeline_time_s(chain, self.assignment, k, w, bw) - pipeline_time_s(chain, new_assignment, k, w, bw)
                          for w in windows])
        gain = float(gains.mean())
        noise = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
        bound = gain - cfg.confidence_z * noise
        remaining = cfg.default_horizon_steps if remaining_steps is None else max(int(remaining_steps), 0)
        moves = diff_plans(self.stages, new_stages, chain.node_bytes, chain.node_fqns)
        moved = float(sum(m.bytes for m in moves))
        cost = moved / bw + cfg.fixed_pause_s
        if self.measured_pause_s is not None:
            cost = max(cost, self.measured_pause_s)
        numbers = dict(
            current_time_s=current, new_time_s=new, gain_per_step_s=gain, remaining_steps=remaining,
            total_gain_s=bound * remaining, migration_bytes=moved, migration_cost_s=cost,
            moves=[m.to_json() for m in moves], new_stages=new_stages,
            new_predicted_s=stage_compute_s(chain, new_assignment, k, speed).tolist(),
            gain_lower_bound_s=bound, gain_noise_s=noise, windows_judged=len(gains),
        )
        if not moves or gain <= cfg.min_relative_gain * current:
            reason = "the re-plan gains too little per step"
        elif bound <= cfg.min_relative_gain * current:
            reason = (f"the gain ({gain:.3g} s/step) is within the windows' noise (lower bound {bound:.3g} s/step "
                      f"at z={cfg.confidence_z:g} over {len(gains)} windows)")
        elif bound * remaining <= cost:
            reason = (f"gain x remaining steps ({bound:.3g} s x {remaining} = {bound * remaining:.3g} s, lower bound) "
                      f"does not pay for the migration ({cost:.3g} s)")
        else:
            decision = decide(True, "imbalance persisted and the gain pays for the migration", **numbers)
            self.adopt(new_stages, speed)
            self.cooldown_left = cfg.cooldown_windows
            return decision
        # Not worth it: expect what we measured, so the same finding is not re-examined each window.
        decision = decide(False, reason, **numbers)
        self.expected_speed = speed
        self.streak = 0
        return decision


# -- writing the new split back as a plan.json ------------------------------------------
def replace_stages(
    plan: Plan, new_stages: NodeLists, predicted_compute_s: Sequence[float] | None = None,
    node_fqns: Mapping[str, str] | None = None,
) -> Plan:
    """``plan`` with new node lists; ranks and replicas stay with the stage."""
    return plan.with_stages(new_stages, predicted_compute_s, node_fqns)
