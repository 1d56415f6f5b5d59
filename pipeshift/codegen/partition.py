"""Map a plan's stages onto the captured fx graph: what each stage runs, receives and sends.

The plan names graph nodes (``node7``); :func:`pipeshift.graph.capture.capture` on the same model
spec and leaf policy gives the same ids, each a :class:`~pipeshift.graph.capture.NodeGroup` (the
fx nodes to run). From there a stage's *inputs* are the tensors its groups read that another
stage (or the data loader: raw inputs ``input0``, …) produced, and its *outputs* the tensors it
produces that a later stage or the criterion reads. A tensor that skips stages goes straight from
its producer to every consumer: tensor names are global, so the runtime routes it.

A group whose value is a tuple (an LSTM's ``(output, (h, c))``) travels element by element as
``nodeN_0``, ``nodeN_1``, … and is re-packed on the receiving side, so everything on the wire is
a plain tensor.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from pipeshift.codegen.support import adopt
from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.graph.capture import CapturedGraph, NodeGroup
from pipeshift.jsonfile import read_json_object
from pipeshift.plan import Plan

# The shape of a group's value: None for a tensor, (kind, children) for a tuple/list. ``kind``
# is "tuple", "list", or the qualified name of a torch.return_types structseq.
Structure = Any
NONE: Structure = ("none", ())  # a None inside a tuple value: no tensor, no leaf


class CodegenError(PipeshiftError):
    """The plan cannot be turned into stage code (the message says which node and why)."""


@dataclasses.dataclass
class Flow:
    """One value crossing a stage boundary, as its consumers see it."""

    node_id: str
    var: str  # the variable that holds the whole value inside a stage
    structure: Structure
    wire: list[str]  # the plain-tensor names it travels as
    producer: int | None  # stage index, None for a raw model input
    consumers: list[int]  # stage indices; len(stages) stands for the criterion


@dataclasses.dataclass
class StageLayout:
    index: int
    groups: list[NodeGroup]  # graph order, raw inputs left out
    fx_nodes: list[torch.fx.Node]  # every fx node to run, graph order
    inputs: list[Flow]
    outputs: list[Flow]
    adopt: list[str]  # FQNs of modules / parameters / buffers the stage runs
    constants: list[str] = dataclasses.field(default_factory=list)  # tensors fx made from literals in forward
    keep: list[str] = dataclasses.field(default_factory=list)  # state nobody runs, kept for a full state_dict

    @property
    def input_names(self) -> list[str]:
        return [n for t in self.inputs for n in t.wire]

    @property
    def output_names(self) -> list[str]:
        return [n for t in self.outputs for n in t.wire]


@dataclasses.dataclass
class Layout:
    captured: CapturedGraph
    stages: list[StageLayout]
    final: list[Flow]  # what the criterion reads (the model's outputs), before "target"
    var_of: dict[str, str]  # node id → variable name
    ties: list[dict[str, list[int]]]  # parameters several stages hold (:func:`find_ties`)

    @property
    def criterion_inputs(self) -> list[str]:
        return [n for t in self.final for n in t.wire] + ["target"]


# -- value structure -------------------------------------------------------------------
def _structure(value: Any, where: str) -> Structure:
    """``None`` for a tensor; ``(kind, children)`` for a tuple or list; ``NONE`` for a ``None``
    inside one (a constant: nothing is sent for it, the receiver writes ``None``)."""
    if torch.is_tensor(value):
        return None
    if value is None:
        return NONE
    if isinstance(value, (tuple, list)):
        cls = type(value)
        if cls is tuple:
            kind = "tuple"
        elif cls is list:
            kind = "list"
        elif cls.__module__ == "torch.return_types" and getattr(torch.return_types, cls.__name__, None) is cls:
            kind = f"torch.return_types.{cls.__name__}"
        else:
            raise CodegenError(
                f"{where} produces a {cls.__module__}.{cls.__qualname__}, which cannot be sent between stages "
                "(plain tensors, tuples and lists can); keep its producer and consumers in one stage"
            )
        return (kind, tuple(_structure(v, where) for v in value))
    raise CodegenError(f"{where} produces a {type(value).__name__}, not a tensor")


def record_structures(captured: CapturedGraph, example_inputs: Sequence[Any]) -> dict[str, Structure]:
    """Run the captured graph once and note which groups produce tuples (and how they nest)."""
    wanted = {g.fx_name: g.node_id for g in captured.groups if g.op != "placeholder"}
    out: dict[str, Structure] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in wanted:
                out[wanted[n.name]] = _structure(value, f"{wanted[n.name]} ({n.name})")
            return value

    with torch.no_grad():
        Recorder(captured.gm).run(*example_inputs)
    return out


def leaf_count(structure: Structure) -> int:
    if structure is None:
        return 1
    return sum(leaf_count(c) for c in structure[1])


def leaf_ranges(structure: Structure) -> list[range]:
    """For each element of a tuple value, the positions of its tensors among all the leaves."""
    out, start = [], 0
    for child in structure[1]:
        n = leaf_count(child)
        out.append(range(start, start + n))
        start += n
    return out


# -- checks against the profile ----------------------------------------------------------
def _profile_candidates(plan: Plan) -> list[Path]:
    """profile.json beside the plan, or beside the graph.txt the plan was made from."""
    found: list[Path] = []
    here = None if plan.source.startswith("<") else Path(plan.source).parent  # "<plan>": a dict, no file
    if here is not None:
        found.append(here / "profile.json")
    graph = plan.graph
    if isinstance(graph, str) and graph and "\x00" not in graph:
        g = Path(graph)
        found.append(g.parent / "profile.json")
        if here is not None and not g.is_absolute():
            found.append(here / g.parent / "profile.json")
    return found


def check_profile(plan: Plan, captured: CapturedGraph) -> None:
    """If the plan's profile.json is at hand, its node → fx node names must match today's capture.

    A mismatch means the model code or leaf policy changed after profiling, so the plan's node
    ids would silently name other operations.
    """
    for path in _profile_candidates(plan):
        if not path.is_file():
            continue
        try:
            data = read_json_object(path, "profile.json", max_bytes=512 * 1024 * 1024)
        except InputFileError:
            continue  # an unreadable profile only costs this check
        nodes = data.get("nodes")
        if not isinstance(nodes, dict):
            continue
        if isinstance(data.get("model"), dict) and data["model"] != plan.model:
            continue  # another model's profile; nothing to compare with
        by_id = captured.by_id()
        for node_id, meta in nodes.items():
            fx_name = meta.get("fx_name") if isinstance(meta, dict) else None
            if not isinstance(fx_name, str):
                continue
            group = by_id.get(node_id)
            now = group.fx_name if group else None
            if now != fx_name:
                raise InputFileError(
                    str(path), None,
                    f"{node_id!r:.30} was fx node {fx_name!r:.80} when profiled but is {now!r} in the model today: "
                    "the model or its leaf policy changed since profiling; re-run profile and plan",
                )
        return


# -- layout ---------------------------------------------------------------------------------
def is_trace_constant(model: nn.Module, target: str) -> bool:
    """A tensor torch.fx made from a value forward computed from literals (``torch.tensor([0.5])``).

    The tracer parks it on the traced root as ``_tensor_constantN``, which a freshly built model
    does not have, so a stage carries it itself instead of adopting it.
    """
    if not re.match(r"^_tensor_constant[0-9]+$", target):
        return False
    return target not in model._parameters and target not in model._buffers and torch.is_tensor(getattr(model, target, None))


def _fqns_of(fx_nodes: list[torch.fx.Node], model: nn.Module) -> list[str]:
    """Module / attribute targets the nodes use, outermost first, without ones nested in another."""
    found: list[str] = []
    for n in fx_nodes:
        if n.op == "get_attr" and is_trace_constant(model, str(n.target)):
            continue
        if n.op in ("call_module", "get_attr") and str(n.target) not in found:
            found.append(str(n.target))
    kept = [f for f in found if not any(f.startswith(o + ".") for o in found if o != f)]
    return kept


def _covered_keys(model: nn.Module, fqns: list[str]) -> set[str]:
    scratch = nn.Module()
    adopt(scratch, model, fqns)
    return set(scratch.state_dict(keep_vars=True))


def _keep_unused(model: nn.Module, stages: list[StageLayout]) -> None:
    """State the forward never touches (unused layers, second names of shared modules) goes to the
    last stage, so the stages' state_dicts together hold every key of the original's."""
    covered: set[str] = set()
    for st in stages:
        covered |= _covered_keys(model, st.adopt)
    missing = [k for k in model.state_dict(keep_vars=True) if k not in covered]
    if not missing:
        return
    last = stages[-1]
    missing_set = set(missing)
    keys_under: dict[str, list[str]] = {}
    for key in model.state_dict(keep_vars=True):
        parts = key.split(".")
        for i in range(1, len(parts)):
            keys_under.setdefault(".".join(parts[:i]), []).append(key)

    def clashes(prefix: str) -> bool:
        return any(a == prefix or a.startswith(prefix + ".") or prefix.startswith(a + ".") for a in last.adopt)

    keep: list[str] = []
    for key in missing:
        if any(key == k or key.startswith(k + ".") for k in keep):
            continue
        parts = key.split(".")
        choice = key
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if all(k in missing_set for k in keys_under[prefix]) and not clashes(prefix):
                choice = prefix
                break
        if choice.endswith("_extra_state"):
            raise CodegenError(f"{choice}: unused module with extra state; pipeshift cannot place it in a stage")
        keep.append(choice)
    last.keep = keep


def layout(plan: Plan, captured: CapturedGraph, structures: dict[str, Structure], model: nn.Module) -> Layout:
    """Check the plan against the captured graph and work out every stage's inputs and outputs."""
    groups = captured.by_id()
    n_stages = len(plan.stages)
    stage_of: dict[str, int] = {}
    for st in plan.stages:
        for j, node_id in enumerate(st.nodes):
            if node_id not in groups:
                raise plan.error(
                    ("stages", st.stage_id, "nodes", j),
                    f"stage {st.stage_id} lists {node_id}, but the model's graph has node1..node{len(groups)}: "
                    "the model or its leaf policy changed since profiling; re-run profile and plan",
                )
            stage_of[node_id] = st.stage_id
    missing = [g.node_id for g in captured.groups if g.node_id not in stage_of]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InputFileError(plan.source, None, f"{len(missing)} graph node(s) are in no stage: {shown}")

    var_of: dict[str, str] = {}
    for g in captured.groups:
        var_of[g.node_id] = f"input{g.input_index}" if g.op == "placeholder" else g.node_id

    consumers: dict[str, set[int]] = {g.node_id: set() for g in captured.groups}
    for g in captured.groups:
        if g.op == "placeholder":
            continue
        for src in g.inputs:
            consumers[src].add(stage_of[g.node_id])
    for out in captured.output_ids:
        consumers[out].add(n_stages)
    for g in captured.groups:
        if g.op == "placeholder":
            continue
        early = [c for c in consumers[g.node_id] if c < stage_of[g.node_id]]
        if early:
            reader = next(
                h.node_id for h in captured.groups if g.node_id in h.inputs and stage_of.get(h.node_id) == min(early)
            )
            raise InputFileError(
                plan.source, None,
                f"stage {min(early)} runs {reader}, which reads {g.node_id} from the later stage "
                f"{stage_of[g.node_id]}: stages must follow the data flow",
            )

    fx_by_name = {n.name: n for n in captured.gm.graph.nodes}
    position = {n.name: i for i, n in enumerate(captured.gm.graph.nodes)}
    plans: list[tuple[list[NodeGroup], list[torch.fx.Node]]] = []
    for st in plan.stages:
        mine = sorted((groups[n] for n in st.nodes if groups[n].op != "placeholder"), key=lambda g: position[g.fx_name])
        if not mine:
            raise InputFileError(
                plan.source, None,
                f"stage {st.stage_id} holds only model inputs ({', '.join(st.nodes)}); every stage needs an operation "
                "(raw inputs reach every stage that reads them)",
            )
        names = sorted({name for g in mine for name in g.fx_nodes}, key=position.__getitem__)
        plans.append((mine, [fx_by_name[n] for n in names if fx_by_name[n].op != "placeholder"]))

    def used_leaves(node_id: str, stage: int) -> set[int]:
        """Which elements of a tuple value ``stage`` reads: only those travel to it."""
        structure = structures.get(node_id)
        everything = set(range(leaf_count(structure)))
        if stage == n_stages:
            return everything
        value = fx_by_name[groups[node_id].fx_name]
        found: set[int] = set()
        for user in plans[stage][1]:
            if value not in user.all_input_nodes:
                continue
            key = user.args[1] if len(user.args) == 2 else None
            if (
                user.op == "call_function" and user.target is operator.getitem and user.args[0] is value
                and not user.kwargs and isinstance(key, int) and not isinstance(key, bool)
                and -len(structure[1]) <= key < len(structure[1])
            ):
                found |= set(leaf_ranges(structure)[key])
            else:
                return everything
        return found

    def flow(node_id: str, readers: list[int]) -> Flow:
        g = groups[node_id]
        if g.op == "placeholder":
            return Flow(node_id, var_of[node_id], None, [var_of[node_id]], None, readers)
        structure = structures.get(node_id)
        if structure is None:
            wire = [node_id]
        else:
            used = set().union(*(used_leaves(node_id, r) for r in readers))
            wire = [f"{node_id}_{i}" for i in sorted(used)]
        return Flow(node_id, node_id, structure, wire, stage_of[node_id], readers)

    def order(node_id: str) -> tuple[int, int]:
        g = groups[node_id]
        if g.op == "placeholder":
            return (0, g.input_index or 0)
        return (1, int(node_id[4:]))

    stages: list[StageLayout] = []
    for st, (mine, fx_nodes) in zip(plan.stages, plans):
        k = st.stage_id
        in_ids = sorted(
            {src for g in mine for src in g.inputs if groups[src].op == "placeholder" or stage_of[src] != k}, key=order
        )
        out_ids = sorted((g.node_id for g in mine if any(c > k for c in consumers[g.node_id])), key=order)
        stages.append(
            StageLayout(
                index=k,
                groups=mine,
                fx_nodes=fx_nodes,
                inputs=[flow(i, [k]) for i in in_ids],
                outputs=[flow(o, [c for c in sorted(consumers[o]) if c > k]) for o in out_ids],
                adopt=_fqns_of(fx_nodes, model),
                constants=sorted({str(n.target) for n in fx_nodes if n.op == "get_attr" and is_trace_constant(model, str(n.target))}),
            )
        )
    _keep_unused(model, stages)
    final = [flow(o, [n_stages]) for o in captured.output_ids]
    return Layout(captured=captured, stages=stages, final=final, var_of=var_of,
                  ties=find_ties(_stage_modules(model, stages)))


def _stage_modules(model: nn.Module, stages: list[StageLayout]) -> list[nn.Module]:
    out = []
    for st in stages:
        scratch = nn.Module()
        adopt(scratch, model, st.adopt + st.keep)
        out.append(scratch)
    return out


def find_ties(stage_modules: Sequence[nn.Module]) -> list[dict[str, list[int]]]:
    """Parameters held by several stages — tied weights, or a module run in two stages.

    Found by tensor identity, not by name: GPT-2's ``lm_head.weight`` *is* ``transformer.wte.weight``.
    Each tie is ``{fqn: [stages holding it under that name]}``; in one process the stages share
    the tensor, across processes each holds a copy that the runtime keeps equal (it sums their
    gradients), and checkpoints store it once. Ties within a single stage need nothing and are
    left out.
    """
    holders: dict[int, dict[str, set[int]]] = {}
    for index, module in enumerate(stage_modules):
        for key, value in module.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter):
                holders.setdefault(id(value), {}).setdefault(key, set()).add(index)
    ties = []
    for names in holders.values():
        if len(set().union(*names.values())) > 1:
            ties.append({k: sorted(v) for k, v in sorted(names.items())})
    return sorted(ties, key=lambda t: next(iter(t)))
