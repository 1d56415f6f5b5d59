"""Reading plan.json for the code generator: every field it uses is checked before it is used.

plan.json is an input file like any other (CONTRIBUTING.md, "plan.json"), so it is treated as
hostile: node ids must look like ``node7``, ranks must be integers, and so on. A wrong value is an
:class:`~pipeshift.errors.InputFileError` naming the field, never a traceback from deep inside
code generation. Only the fields codegen needs are checked; the planner's predictions pass
through untouched (they are copied into the package with the rest of the plan).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from pipeshift.codegen.support import FQN_RE
from pipeshift.jsonfile import read_json_object
from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.graph.capture import LeafPolicy
from pipeshift.spec import ModelSpec

NODE_ID_RE = re.compile(r"^node[0-9]{1,9}$")
MAX_PLAN_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage_id: int
    nodes: tuple[str, ...]
    replicas: int
    ranks: tuple[int, ...]
    fqns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The validated part of a plan.json; ``raw`` is the whole document as read."""

    model: ModelSpec
    policy: LeafPolicy
    batch_size: int
    stages: tuple[StagePlan, ...]
    raw: dict[str, Any]
    source: str = "plan.json"


def _int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def parse_plan(data: Any, source: str = "plan.json") -> Plan:
    """Validate a decoded plan.json; errors name ``source`` and the offending field."""

    def bad(msg: str) -> InputFileError:
        return InputFileError(source, None, msg)

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    if data.get("version", 1) != 1:
        raise bad(f"unsupported plan version {data.get('version')!r} (this pipeshift reads version 1)")
    if data.get("model") is None:
        raise bad("no 'model' spec: codegen rebuilds the model from it; plan a graph that `pipeshift profile` wrote")
    try:
        model = ModelSpec.from_json(data["model"])
        policy = LeafPolicy.from_json(data.get("leaf_policy"))
    except PipeshiftError as e:
        raise bad(str(e)) from None
    batch_size = data.get("batch_size")
    if not _int(batch_size, 1):
        raise bad(f"'batch_size' must be a positive integer, got {batch_size!r}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise bad("'stages' must be a non-empty list")
    stages: list[StagePlan] = []
    next_rank = 0
    for i, st in enumerate(stages_raw):
        where = f"stages[{i}]"
        if not isinstance(st, dict):
            raise bad(f"{where} must be an object")
        if st.get("stage_id", i) != i:
            raise bad(f"{where}.stage_id is {st.get('stage_id')!r}; stages must be listed in pipeline order 0, 1, ...")
        nodes = st.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise bad(f"{where}.nodes must be a non-empty list of node ids (no stage may be empty)")
        for n in nodes:
            if not isinstance(n, str) or not NODE_ID_RE.match(n):
                raise bad(f"{where}.nodes: {n!r} is not a node id like 'node7'")
        replicas = st.get("replicas", 1)
        if not _int(replicas, 1):
            raise bad(f"{where}.replicas must be a positive integer, got {replicas!r}")
        ranks = st.get("ranks")
        if ranks is None:
            ranks = list(range(next_rank, next_rank + replicas))
        if not isinstance(ranks, list) or not all(_int(r, 0) for r in ranks):
            raise bad(f"{where}.ranks must be a list of non-negative integers, got {ranks!r}")
        if len(ranks) != replicas:
            raise bad(f"{where} has replicas={replicas} but {len(ranks)} ranks {ranks}")
        next_rank = max([next_rank, *[r + 1 for r in ranks]])
        fqns = st.get("fqns", [])
        if not isinstance(fqns, list):
            raise bad(f"{where}.fqns must be a list")
        for f in fqns:
            if not isinstance(f, str) or not FQN_RE.match(f):
                raise bad(f"{where}.fqns: {f!r} is not a dotted module name like 'layer1.0.conv1'")
        stages.append(StagePlan(i, tuple(nodes), replicas, tuple(ranks), tuple(fqns)))
    seen_rank: dict[int, int] = {}
    seen_node: dict[str, int] = {}
    for st in stages:
        for r in st.ranks:
            if r in seen_rank:
                raise bad(f"rank {r} is in stage {seen_rank[r]} and stage {st.stage_id}")
            seen_rank[r] = st.stage_id
        for n in st.nodes:
            if n in seen_node:
                raise bad(f"{n} is in stage {seen_node[n]} and stage {st.stage_id}; a node belongs to exactly one stage")
            seen_node[n] = st.stage_id
    return Plan(model=model, policy=policy, batch_size=batch_size, stages=tuple(stages), raw=data, source=source)


def plan_path(path: str | Path) -> Path:
    """``PLAN_DIR`` or ``PLAN_DIR/plan.json`` → the plan.json file."""
    p = Path(path)
    return p / "plan.json" if p.is_dir() else p


def read_plan(path: str | Path) -> Plan:
    """Read and validate plan.json (``path`` is the file or the directory holding it)."""
    file = plan_path(path)
    data = read_json_object(file, "plan file", " (expected the directory `pipeshift plan -o` wrote)",
                            max_bytes=MAX_PLAN_BYTES)
    return parse_plan(data, str(file))
