"""The plan: which graph nodes each pipeline stage runs, on which ranks, and what it is predicted to cost.

A plan arrives from outside — plan.json written by ``pipeshift plan``, a file an operator hands
``pipeshift ctl repartition``, a control-plane message — so it is parsed and checked here, once,
at the edge, and everything after takes a :class:`Plan`. A wrong field is one
:class:`~pipeshift.errors.InputFileError` that names the file, the line the field stands on and
the field (``plan.json:41: stages[2].ranks must be …``). Consumers that need more than every plan
has (codegen needs the model spec, the simulator needs costs) raise through :meth:`Plan.error`,
so their messages point at the same place.

A stage is stage × replicas × tensor-parallel degree: ``ranks`` lists its
``replicas * tp`` ranks; the ranks of all stages are exactly ``0 .. world_size-1``.

This module imports nothing heavy (no torch, numpy or pandas): the planner, the simulator and
the control plane read plans without paying for the runtime.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeshift.errors import InputFileError
from pipeshift.jsonfile import JsonPath, line_of, read_json_text

PLAN_VERSION = 1
# A split as the policy and the re-planners see it: each stage's node ids, in pipeline order
# (:attr:`Plan.node_lists`; :meth:`Plan.with_stages` turns one back into a plan).
NodeLists = list[list[str]]
# Node ids are graph.txt's ``nodeN``; anything word-like is accepted (hand-written plans), nothing
# that could be mistaken for code when codegen writes it into a file.
NODE_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


# Sanity bounds: beyond them a plan is a typo or an attack, and would make codegen or the
# simulator build rank lists, example batches or timelines of tens of gigabytes first.
MAX_RANKS = 1 << 16
MAX_BATCH_SIZE = 1 << 20
MAX_MICROBATCHES = 1 << 16


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to one short line: a hostile value must not become a megabyte of message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class RankLayout:
    """What follows from each stage's ranks, for the runtime's views of a partition (its routing
    and its migration view), which hold ``stage_ranks``; a :class:`Plan` answers from its stages."""

    stage_ranks: Sequence[Sequence[int]]

    @property
    def num_stages(self) -> int:
        return len(self.stage_ranks)

    @property
    def world_size(self) -> int:
        return sum(len(r) for r in self.stage_ranks)


@dataclasses.dataclass(frozen=True)
class StageCosts:
    """The planner's cost-model terms for one stage (what the simulator replays), seconds and bytes."""

    forward_s: float
    backward_s: float
    output_bytes: float = 0.0
    link_bandwidth: float = math.inf  # bytes/s of the link to the next stage
    link_latency: float = 0.0
    allreduce_s: float = 0.0
    tie_allreduce_s: float = 0.0  # summing the tied parameters it shares with other stages, per step
    parameter_bytes: float = 0.0
    stash_bytes: float = 0.0  # activations kept per microbatch in flight


@dataclasses.dataclass(frozen=True)
class PlanStage:
    """One pipeline stage: its nodes (in graph order), ranks, module names and predictions."""

    stage_id: int
    nodes: tuple[str, ...]
    ranks: tuple[int, ...]
    replicas: int
    tp: int = 1
    fqns: tuple[str, ...] = ()
    compute_s: float | None = None  # predicted compute time per minibatch
    costs: StageCosts | None = None
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update(stage_id=self.stage_id, nodes=list(self.nodes), ranks=list(self.ranks))
        if self.replicas != 1 or "replicas" in out:
            out["replicas"] = self.replicas
        if self.fqns or "fqns" in out:
            out["fqns"] = list(self.fqns)
        if self.tp != 1 or "tp" in out:
            out["tp"] = self.tp
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked plan. ``doc`` is the whole document as read (unknown fields pass through)."""

    stages: tuple[PlanStage, ...]
    doc: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    source: str = "<plan>"
    text: str | None = dataclasses.field(default=None, compare=False, repr=False)
    batch_size: int | None = None
    schedule: str | None = None
    microbatches: int | None = None
    optimizer_states: float = 2.0

    # -- shape ------------------------------------------------------------------------------
    @property
    def node_lists(self) -> NodeLists:
        return [list(st.nodes) for st in self.stages]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def world_size(self) -> int:
        return sum(len(st.ranks) for st in self.stages)

    @property
    def stage_ranks(self) -> list[list[int]]:
        return [list(st.ranks) for st in self.stages]

    def stage_of_rank(self, rank: int) -> int:
        for st in self.stages:
            if rank in st.ranks:
                return st.stage_id
        raise self.error(("stages",), f"rank {rank} is in no stage (the plan has ranks 0..{self.world_size - 1})")

    # -- what the document carries besides the split ------------------------------------------
    @property
    def model(self) -> Mapping[str, Any] | None:
        """The model spec as JSON (``pipeshift.spec.ModelSpec.from_json`` builds it)."""
        m = self.doc.get("model")
        return m if isinstance(m, Mapping) else None

    @property
    def graph(self) -> str | None:
        """The graph.txt the plan was made from, as written in the plan (relative to the plan)."""
        g = self.doc.get("graph")
        return g if isinstance(g, str) and g else None

    @property
    def predicted(self) -> Mapping[str, Any]:
        p = self.doc.get("predicted")
        return p if isinstance(p, Mapping) else {}

    # -- errors that point into the file ----------------------------------------------------
    def error(self, where: JsonPath, message: str) -> InputFileError:
        """An error about the value at ``where``, naming ``file:line`` when the plan came from text."""
        line = line_of(self.text, where) if self.text is not None else None
        return InputFileError(self.source, line, _at(where, message))

    # -- writing ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The plan.json document (a fresh dict; the stages as they are in this plan)."""
        out = dict(self.doc)
        out["stages"] = [st.to_json() for st in self.stages]
        return out

    def with_stages(self, node_lists: Sequence[Sequence[str]], predicted_compute_s: Sequence[float] | None = None,
                    node_fqns: Mapping[str, str] | None = None) -> Plan:
        """This plan with new node lists; ranks and replicas stay with their stage.

        A stage's ``fqns`` follow its nodes: from ``node_fqns`` where given, else from this
        plan's stages whose fqns line up one-to-one with their nodes.
        """
        if len(node_lists) != self.num_stages:
            raise self.error(("stages",), f"the new split has {len(node_lists)} stages, the plan {self.num_stages}")
        fqn_of = dict(node_fqns or {})
        for st in self.stages:
            if len(st.fqns) == len(st.nodes):
                fqn_of.update({n: f for n, f in zip(st.nodes, st.fqns) if n not in fqn_of})
        stages = []
        for st, nodes in zip(self.stages, node_lists):
            raw = dict(st.raw)
            compute_s = st.compute_s
            if predicted_compute_s is not None:
                compute_s = float(predicted_compute_s[st.stage_id])
                raw["predicted"] = {**(raw.get("predicted") or {}), "compute_s": compute_s, "time_s": compute_s}
            fqns = tuple(dict.fromkeys(fqn_of[n] for n in nodes if n in fqn_of))
            stages.append(dataclasses.replace(st, nodes=tuple(nodes), fqns=fqns, compute_s=compute_s, raw=raw))
        doc = dict(self.doc)
        if predicted_compute_s is not None:
            doc["predicted"] = {**self.predicted, "time_per_minibatch_s": float(max(predicted_compute_s))}
        new = dataclasses.replace(self, stages=tuple(stages), doc=doc, text=None)
        return parse_plan(new.to_json(), self.source)  # the same checks as any plan

    def with_ranks(self, stage_ranks: Sequence[Sequence[int]]) -> Plan:
        """This plan on other ranks (a resized or re-placed job); replicas follow the rank counts."""
        if len(stage_ranks) != self.num_stages:
            raise self.error(("stages",), f"{len(stage_ranks)} rank lists for {self.num_stages} stages")
        doc = self.to_json()
        for st, ranks in zip(doc["stages"], stage_ranks):
            st["ranks"] = list(ranks)
            st["replicas"] = len(ranks) // int(st.get("tp", 1))
        return parse_plan(doc, self.source)


def _at(where: JsonPath, message: str) -> str:
    """``stages[2].ranks must be …`` / ``stages[2].nodes[0]: 'x' is not …``: the field, then what is wrong."""
    path = ""
    for part in where:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    if not path:
        return message
    return f"{path} {message}" if message.startswith(("must ", "is ", "has ")) else f"{path}: {message}"


# -- reading -------------------------------------------------------------------------------------
def plan_file(path: str | Path) -> Path:
    """``PLAN_DIR`` or ``PLAN_DIR/plan.json`` → the plan.json file."""
    p = Path(path)
    return p / "plan.json" if p.is_dir() else p


def read_plan(path: str | Path) -> Plan:
    """Read and check plan.json (``path`` is the file or the directory holding it)."""
    file = plan_file(path)
    data, text = read_json_text(file, "plan file", " (expected the directory `pipeshift plan -o` wrote)")
    return parse_plan(data, str(file), text)


def as_plan(plan: Plan | Mapping[str, Any] | str | Path, source: str = "<plan>") -> Plan:
    """A :class:`Plan` from a plan, a decoded plan.json, or a path to one (file or directory)."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return parse_plan(plan, source)
    return read_plan(plan)


def parse_plan(data: Any, source: str = "<plan>", text: str | None = None) -> Plan:
    """Check a decoded plan.json; errors name ``source`` (and the line, given the ``text``)."""
    probe = Plan(stages=(), doc=data if isinstance(data, Mapping) else {}, source=source, text=text)

    def bad(where: JsonPath, msg: str) -> InputFileError:
        return probe.error(where, msg)

    if not isinstance(data, Mapping):
        raise InputFileError(source, None, f"a plan must be a JSON object with 'stages', got {type(data).__name__}")
    if data.get("version", PLAN_VERSION) != PLAN_VERSION:
        raise bad(("version",), f"unsupported plan version {data.get('version')!r} (this pipeshift reads version 1)")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise bad(("stages",), "no 'stages' list: a plan needs at least one stage")
    stages = []
    next_rank = 0
    seen_node: dict[str, int] = {}
    seen_rank: dict[int, int] = {}
    for i, st in enumerate(raw_stages):
        at: JsonPath = ("stages", i)
        if not isinstance(st, Mapping):
            raise bad(at, "must be an object")
        if st.get("stage_id", i) != i:
            raise bad((*at, "stage_id"), f"is {st.get('stage_id')!r}; stages must be listed in pipeline order 0, 1, ...")
        nodes = st.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise bad((*at, "nodes"), "must be a non-empty list of node ids (no stage may be empty)")
        for j, n in enumerate(nodes):
            if not isinstance(n, str) or not NODE_ID_RE.match(n):
                raise bad((*at, "nodes", j), f"{n!r} is not a node id like 'node7' (node ids are strings)")
            if n in seen_node:
                raise bad((*at, "nodes", j), f"{n} is in stage {seen_node[n]} and stage {i}; a node belongs to "
                                             "exactly one stage")
            seen_node[n] = i
        tp = st.get("tp", 1)
        if not _is_int(tp, 1):
            raise bad((*at, "tp"), f"must be a positive integer (the tensor-parallel degree), got {tp!r}")
        replicas = st.get("replicas", 1)
        if not _is_int(replicas, 1):
            raise bad((*at, "replicas"), f"must be a positive integer, got {replicas!r}")
        if replicas * tp > MAX_RANKS:  # before a rank list of that length is built
            raise bad((*at, "replicas"), f"{replicas} replicas x tp {tp} is more than {MAX_RANKS} ranks")
        ranks = st.get("ranks")
        if ranks is None:
            ranks = list(range(next_rank, next_rank + replicas * tp))
        if not isinstance(ranks, list) or not all(_is_int(r, 0) and r < MAX_RANKS for r in ranks):
            raise bad((*at, "ranks"), f"must be a list of integers from 0 to {MAX_RANKS - 1}, got {_short(ranks)}")
        if len(ranks) != replicas * tp:
            raise bad((*at, "ranks"), f"the stage has replicas={replicas}" + (f" x tp={tp}" if tp != 1 else "")
                      + f" but {len(ranks)} ranks {ranks}")
        for r in ranks:
            if r in seen_rank:
                raise bad((*at, "ranks"), f"rank {r} is in stage {seen_rank[r]} and stage {i}")
            seen_rank[r] = i
        next_rank = max([next_rank, *[r + 1 for r in ranks]])
        fqns = st.get("fqns", [])
        if not isinstance(fqns, list) or not all(isinstance(f, str) for f in fqns):
            raise bad((*at, "fqns"), "must be a list of module names")
        predicted = st.get("predicted")
        if predicted is not None and not isinstance(predicted, Mapping):
            raise bad((*at, "predicted"), "must be an object")
        for key, value in (predicted or {}).items():
            if isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and not _is_number(value)):
                raise bad((*at, "predicted", key), f"must be a non-negative number, got {_short(value)}")
        compute_s = None
        if isinstance(predicted, Mapping) and predicted.get("compute_s") is not None:
            compute_s = predicted["compute_s"]
            if not _is_number(compute_s):
                raise bad((*at, "predicted", "compute_s"), f"must be a non-negative number, got {compute_s!r}")
            compute_s = float(compute_s)
        stages.append(PlanStage(stage_id=i, nodes=tuple(nodes), ranks=tuple(ranks), replicas=replicas, tp=tp,
                                fqns=tuple(fqns), compute_s=compute_s, costs=_costs(st.get("costs"), at, bad), raw=st))
    used = sorted(seen_rank)
    if used != list(range(len(used))):
        raise bad(("stages",), f"the stages use ranks {used}; a plan uses every rank 0..{len(used) - 1} exactly once")
    batch_size = data.get("batch_size")
    if batch_size is not None and not (_is_int(batch_size, 1) and batch_size <= MAX_BATCH_SIZE):
        raise bad(("batch_size",), f"must be a positive integer up to {MAX_BATCH_SIZE}, got {_short(batch_size)}")
    schedule: Mapping[str, Any] = data["schedule"] if isinstance(data.get("schedule"), Mapping) else {}
    kind = schedule.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise bad(("schedule", "kind"), f"must be a schedule name, got {kind!r}")
    microbatches = schedule.get("microbatches")
    if microbatches is not None and not (_is_int(microbatches, 1) and microbatches <= MAX_MICROBATCHES):
        raise bad(("schedule", "microbatches"), f"must be a positive integer up to {MAX_MICROBATCHES}, got "
                                                f"{_short(microbatches)}")
    memory: Mapping[str, Any] = data["memory"] if isinstance(data.get("memory"), Mapping) else {}
    opt_states = memory.get("optimizer_states", 2.0)
    if not _is_number(opt_states):
        raise bad(("memory", "optimizer_states"), f"must be a non-negative number, got {opt_states!r}")
    return Plan(stages=tuple(stages), doc=data, source=source, text=text, batch_size=batch_size, schedule=kind,
                microbatches=microbatches, optimizer_states=float(opt_states))


def _costs(costs: Any, at: JsonPath, bad: Any) -> StageCosts | None:
    if costs is None:
        return None
    where: JsonPath = (*at, "costs")
    if not isinstance(costs, Mapping):
        raise bad(where, "must be an object")

    def num(obj: Mapping[str, Any], key: str, default: float | None, path: JsonPath) -> float:
        value = obj.get(key)
        if value is None and default is not None:
            return default
        if value is None or not _is_number(value):
            raise bad((*path, key), f"must be a non-negative number, got {value!r}")
        return float(value)

    link = costs.get("output_link") or {}
    if not isinstance(link, Mapping):
        raise bad((*where, "output_link"), "must be an object")
    lpath: JsonPath = (*where, "output_link")
    bandwidth = num(link, "bandwidth_bytes_per_s", math.inf, lpath)
    if bandwidth == 0:
        raise bad((*lpath, "bandwidth_bytes_per_s"), "must be positive")
    return StageCosts(
        forward_s=num(costs, "forward_s", None, where), backward_s=num(costs, "backward_s", None, where),
        output_bytes=num(costs, "output_bytes", 0.0, where), link_bandwidth=bandwidth,
        link_latency=num(link, "latency_s", 0.0, lpath), allreduce_s=num(costs, "allreduce_s", 0.0, where),
        tie_allreduce_s=num(costs, "tie_allreduce_s", 0.0, where),
        parameter_bytes=num(costs, "parameter_bytes", 0.0, where),
        stash_bytes=num(costs, "stash_bytes_per_microbatch", 0.0, where))
