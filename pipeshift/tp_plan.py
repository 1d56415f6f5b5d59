"""Which layers a tensor-parallel stage shards, and how: the TP plan.

A TP plan maps module FQNs (patterns with ``*`` for one name component, as Hugging Face writes
them) to a style: ``colwise`` (split the output features), ``rowwise`` (split the input
features; the pair's partial sums are all-reduced), and a few variants (:data:`STYLE_NAMES`).
It comes from, in this order:

1. the user: ``--tp-plan 'model.layers.*.self_attn.q_proj=colwise' …`` or ``--tp-plan FILE``
   (a JSON object ``{pattern: style}``); ``--tp-plan generic`` asks for rule 3 explicitly;
2. the model's own: Hugging Face models carry one in their config (``base_model_tp_plan``,
   relative to the base model, plus the head model's ``_tp_plan`` for ``lm_head``);
3. a generic rule on the captured graph (:func:`generic_plan`): a Linear whose output reaches
   another Linear only through feature-local operations (activations, products of two such
   Linears, dropout) is column-parallel and that Linear row-parallel — an MLP; and Linears
   whose outputs are split into heads by a reshape that infers the head count (``view(…, -1,
   head_dim)``), run per head (attention, rotary products) and merged back before another
   Linear — attention. Anything else stays whole.

The result is always concrete: one style per module FQN, checked against the model (every user
pattern must match a module; sharded modules are Linear or Embedding), so what a run shards is
printed and written into the stage package (``conf.json``'s ``tp_plan``).

This module needs only torch (no distributed setup); the runtime turns styles into
``torch.distributed.tensor.parallel`` styles (:mod:`pipeshift.runtime.tp`).
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeshift.errors import InputFileError, PipeshiftError

# Style names as Hugging Face writes them; the *_rep/_gather_output/_split_input variants keep a
# whole (replicated) tensor on one side of the layer.
STYLE_NAMES = ("colwise", "rowwise", "colwise_rep", "colwise_gather_output", "rowwise_rep",
               "rowwise_split_input", "embedding_rowwise", "sequence_parallel", "replicate",
               "replicated_with_grad_allreduce")
SHARDING_STYLES = ("colwise", "rowwise", "colwise_rep", "colwise_gather_output", "rowwise_rep",
                   "rowwise_split_input", "embedding_rowwise")
GENERIC = "generic"


@dataclasses.dataclass(frozen=True)
class TPPlan:
    """A resolved TP plan: module FQN -> style, and where it came from (for the printout)."""

    modules: Mapping[str, str]
    source: str
    notes: tuple[str, ...] = ()
    # graph nodes that are whole modules holding sharded layers (see :func:`with_leaves`)
    leaves: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def sharded(self) -> dict[str, str]:
        return {f: s for f, s in self.modules.items() if s in SHARDING_STYLES}

    def describe(self) -> str:
        sharded = sorted(self.sharded().items())
        text = f"tensor-parallel plan ({self.source}): "
        text += f"{len(sharded)} modules sharded: {summarize_plan(sharded)}" if sharded else "nothing sharded"
        return "\n".join([text, *self.notes])


def summarize_plan(applied: Sequence[tuple[str, str]]) -> str:
    """``pattern=style xcount`` for sharded modules, layer numbers folded into ``*``."""
    counts: dict[tuple[str, str], int] = {}
    for fqn, style in applied:
        key = (re.sub(r"\.[0-9]+(?=\.|$)", ".*", fqn), style)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{pattern}={style}" + (f" x{n}" if n > 1 else "") for (pattern, style), n in sorted(counts.items()))


# -- user rules -------------------------------------------------------------------------------
def parse_rules(items: Sequence[str]) -> dict[str, str] | None:
    """``--tp-plan`` values: ``PATTERN=STYLE`` items, JSON files, or ``generic``; None when absent."""
    if not items:
        return None
    rules: dict[str, str] = {}
    for item in items:
        if item == GENERIC:
            if len(items) > 1:
                raise PipeshiftError("--tp-plan generic stands alone (it means: the generic rule, no user rules)")
            return {}
        if "=" in item:
            pattern, _, style = item.partition("=")
            rules[pattern.strip()] = style.strip()
            continue
        rules.update(_read_rules_file(Path(item)))
    for pattern, style in rules.items():
        if not pattern or not re.fullmatch(r"[A-Za-z0-9_.*]+", pattern):
            raise PipeshiftError(f"--tp-plan: {pattern!r} is not a module pattern (names, dots and *)")
        if style not in STYLE_NAMES:
            raise PipeshiftError(f"--tp-plan {pattern}={style}: unknown style; known: {', '.join(STYLE_NAMES)}")
    return rules


def _read_rules_file(path: Path) -> dict[str, str]:
    from pipeshift.jsonfile import read_json_object

    if "/" not in str(path) and not path.suffix and not path.exists():
        raise PipeshiftError(f"--tp-plan {path}: expected PATTERN=STYLE, a JSON file, or 'generic'")
    data: Any = read_json_object(path, "TP plan file")
    if isinstance(data.get("tp_plan"), dict):
        data = data["tp_plan"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise InputFileError(str(path), None, "a TP plan is a JSON object {\"module pattern\": \"style\"}")
    return dict(data)


def _pattern_re(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")


def expand(rules: Mapping[str, str], model: nn.Module, *, strict: bool) -> dict[str, str]:
    """Concrete FQN -> style for the model's modules; ``strict``: every pattern must match one."""
    names = [n for n, _ in model.named_modules() if n]
    out: dict[str, str] = {}
    for pattern, style in rules.items():
        rx = _pattern_re(pattern)
        hits = [n for n in names if rx.match(n)]
        if not hits and strict:
            sample = ", ".join(n for n in names if isinstance(model.get_submodule(n), (nn.Linear, nn.Embedding)))
            raise PipeshiftError(f"--tp-plan {pattern}={style}: matches no module of the model "
                                 f"(its Linear/Embedding layers: {sample[:300]})")
        for n in hits:
            out[n] = style
    for fqn, style in out.items():
        if style in SHARDING_STYLES and not isinstance(model.get_submodule(fqn), (nn.Linear, nn.Embedding)):
            raise PipeshiftError(f"TP plan: {fqn} is a {type(model.get_submodule(fqn)).__name__}; {style!r} shards "
                                 "only Linear and Embedding layers")
    return out


# -- the model's own plan ---------------------------------------------------------------------
def model_rules(model: nn.Module) -> tuple[dict[str, str], str] | None:
    """The Hugging Face TP plan a model carries (patterns relative to the model), or None."""
    rules: dict[str, str] = {}
    owners: list[str] = []
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        base = getattr(config, "base_model_tp_plan", None)
        if not isinstance(base, dict) or not base:
            continue
        prefix = name + "." if name else ""
        inner = getattr(m, str(getattr(m, "base_model_prefix", "")), None)
        if isinstance(inner, nn.Module) and inner is not m:  # a head model: its base model is a child
            head = getattr(type(m), "_tp_plan", None) or {}
            rules.update({prefix + k: v for k, v in head.items() if isinstance(v, str)})
            continue
        if any(name.startswith(o) for o in owners):
            continue
        owners.append(prefix)
        rules.update({prefix + k: v for k, v in base.items() if isinstance(v, str)})
        owner_name = type(config).__name__
    if not owners:
        return None
    return rules, f"the model's own ({owner_name}.base_model_tp_plan)"


# -- the generic rule -------------------------------------------------------------------------
_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.LeakyReLU,
                        nn.Mish, nn.Hardswish, nn.ELU)
_UNARY = {torch.relu, torch.tanh, torch.sigmoid, torch.nn.functional.relu, torch.nn.functional.gelu,
          torch.nn.functional.silu, torch.nn.functional.dropout, torch.nn.functional.tanh,
          torch.nn.functional.sigmoid, torch.neg, operator.neg}
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "contiguous", "neg", "float", "to", "type_as"}
_BINARY = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub}
_BINARY_METHODS = {"mul", "add", "sub", "div"}
_HEADED_FUNCS = {torch.nn.functional.scaled_dot_product_attention, torch.matmul, operator.matmul,
                 torch.softmax, torch.nn.functional.softmax, torch.cat, operator.getitem, torch.transpose}
_HEADED_METHODS = {"transpose", "permute", "softmax", "matmul", "expand", "unsqueeze"}
_SHAPE_QUERIES = {"size", "dim"}  # non-tensor helpers: they read a shape, they do not carry shards
_RESHAPES = {"view", "reshape"}


def _is_linear(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Linear)


def _shape_args(node: torch.fx.Node) -> list[Any]:
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return args


def _splits_heads(node: torch.fx.Node) -> bool:
    """``x.view(…, -1, d)`` / ``x.unflatten(-1, (-1, d))``: the head count inferred, so shards keep whole heads."""
    if node.op == "call_method" and node.target in _RESHAPES:
        args = _shape_args(node)
        if -1 not in args:
            return False
        i = args.index(-1)
        return 0 < len(args) - 1 - i and all(isinstance(a, int) and a > 0 for a in args[i + 1:])
    if node.op == "call_method" and node.target == "unflatten":
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == -1 and isinstance(sizes, (tuple, list)) and len(sizes) >= 2 and sizes[0] == -1
    return False


def _merges_heads(node: torch.fx.Node) -> bool:
    """``y.reshape(…, -1)`` / ``y.flatten(k)``: heads merged back into the last dimension."""
    if node.op == "call_method" and node.target in _RESHAPES:
        args = _shape_args(node)
        return bool(args) and args[-1] == -1
    if node.op == "call_method" and node.target == "flatten":
        return True
    return node.op == "call_function" and node.target is torch.flatten


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes]


class _Walk:
    """From one Linear's output: where its column shards flow, and what that needs."""

    def __init__(self, start: torch.fx.Node, modules: Mapping[str, nn.Module]):
        self.ok = True
        self.targets: set[torch.fx.Node] = set()  # row-parallel Linears reached
        self.partners: set[torch.fx.Node] = set()  # other tensors mixed in while flat: must be sharded too
        self.reached: set[torch.fx.Node] = set()
        seen: dict[torch.fx.Node, str] = {}
        todo = [(u, "flat", start) for u in start.users]
        while todo and self.ok:
            node, state, src = todo.pop()
            if seen.get(node) == state:
                continue
            seen[node] = state
            nxt = self._step(node, state, src, modules)
            if nxt is None:
                continue
            self.reached.add(node)
            todo.extend((u, nxt, node) for u in node.users)

    def _fail(self) -> None:
        self.ok = False

    def _step(self, node: torch.fx.Node, state: str, src: torch.fx.Node, modules) -> str | None:
        if node.op == "output":
            return self._fail()
        if (node.op == "call_method" and node.target in _SHAPE_QUERIES) or (
                node.op == "call_function" and node.target is getattr):
            return None
        if _is_linear(node, modules):
            if state != "flat" or node.args[0] is not src:
                return self._fail()
            self.targets.add(node)
            return None
        others = [a for a in _tensor_inputs(node) if a is not src]
        if node.op == "call_module":
            if isinstance(modules.get(str(node.target)), _ELEMENTWISE_MODULES) and not others:
                return state
            return self._fail()
        fn, meth = (node.target, None) if node.op == "call_function" else (None, node.target)
        if state == "flat":
            if fn in _UNARY or meth in _UNARY_METHODS:
                return "flat" if not others else self._fail()
            if fn in _BINARY or meth in _BINARY_METHODS:
                self.partners.update(others)  # a product of two shards is a shard; shard × whole is wrong
                return "flat"
            if _splits_heads(node):
                return "headed"
            return self._fail()
        # headed: one dimension before the last counts heads; per-head work keeps it sharded
        if _merges_heads(node):
            return "flat"
        if fn in _UNARY or meth in _UNARY_METHODS or fn in _BINARY or meth in _BINARY_METHODS:
            return "headed"
        if fn in _HEADED_FUNCS or meth in _HEADED_METHODS:
            return "headed"
        return self._fail()


def generic_plan(gm: torch.fx.GraphModule, model: nn.Module) -> dict[str, str]:
    """Column-then-row pairs found in the graph (see the module docstring), FQN -> style."""
    modules = dict(model.named_modules())
    linears = [n for n in gm.graph.nodes if _is_linear(n, modules)]
    walks = {n: _Walk(n, modules) for n in linears}
    assigned: dict[torch.fx.Node, str] = {}
    for first in linears:
        if first in assigned or not walks[first].ok or not walks[first].targets:
            continue
        # the group: every Linear feeding the same row-parallel Linears (q, k, v -> o; gate, up -> down)
        group, targets = {first}, set(walks[first].targets)
        grew = True
        while grew:
            grew = False
            for n in linears:
                w = walks[n]
                if n not in group and w.ok and w.targets & targets:
                    group.add(n)
                    targets |= w.targets
                    grew = True
        reached = set().union(*(walks[n].reached for n in group)) | group
        fine = all(walks[n].ok for n in group) and not (group | targets) & set(assigned) and not group & targets
        fine = fine and all(p in reached for n in group for p in walks[n].partners)
        if fine:
            assigned.update({n: "colwise" for n in group})
            assigned.update({n: "rowwise" for n in targets})
    return {str(n.target): style for n, style in sorted(assigned.items(), key=lambda kv: kv[0].name)}


# -- resolving --------------------------------------------------------------------------------
def resolve(model: nn.Module, gm: torch.fx.GraphModule | None, user: Mapping[str, str] | None) -> TPPlan:
    """The TP plan for ``model``: the user's, else the model's own, else the generic rule."""
    if user:
        return TPPlan(expand(user, model, strict=True), "the user's (--tp-plan)")
    notes: list[str] = []
    own = model_rules(model) if user is None else None
    if own is not None:
        rules, source = own
        unknown = sorted({s for s in rules.values() if s not in STYLE_NAMES})
        if not unknown:
            return TPPlan(expand(rules, model, strict=False), source)
        notes.append(f"note: {source} uses styles pipeshift does not translate ({', '.join(unknown)}); "
                     "the generic rule decides instead")
    if gm is None:
        return TPPlan({}, "none (no graph for the generic rule)", tuple(notes))
    return TPPlan(generic_plan(gm, model), "the generic rule: column- then row-parallel pairs found in the graph",
                  tuple(notes))


def with_leaves(plan: TPPlan, model: nn.Module, gm: torch.fx.GraphModule) -> TPPlan:
    """``plan`` with, for every graph node that is a whole module holding sharded layers (a
    decoder block the capture kept as one node), the share of its weights those layers hold
    and how many of them are row-parallel (each ends in an all-reduce): what the planner needs
    to price a block it cannot see into."""
    sharded = plan.sharded()
    leaves: dict[str, dict[str, float]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) in plan.modules:
            continue
        fqn = str(node.target)
        inside = {f: st for f, st in sharded.items() if f.startswith(fqn + ".")}
        if not inside:
            continue
        block = model.get_submodule(fqn)
        total = sum(p.numel() for p in block.parameters())
        split = sum(p.numel() for f in inside for p in model.get_submodule(f).parameters())
        leaves[fqn] = {"sharded_fraction": split / total if total else 0.0,
                       "row_parallel": float(sum(1 for st in inside.values() if st.startswith("rowwise")))}
    return dataclasses.replace(plan, leaves=leaves)


def to_json(plan: TPPlan) -> dict[str, Any]:
    out: dict[str, Any] = {"source": plan.source, "modules": dict(sorted(plan.modules.items()))}
    if plan.leaves:
        out["leaves"] = {k: dict(v) for k, v in sorted(plan.leaves.items())}
    return out


def dumps(plan: TPPlan) -> str:
    return json.dumps(to_json(plan), indent=1)


def check_pairs_within(gm: torch.fx.GraphModule, modules: Mapping[str, str], stage_of: Mapping[str, int]) -> None:
    """Every column-parallel layer's shards meet their row-parallel layer in the same stage.

    ``stage_of`` maps fx node names to stages. Between a ``colwise`` layer and its ``rowwise``
    partner the activation is a shard; a stage boundary there would send one rank's shard as
    if it were the whole tensor.
    """
    for start in gm.graph.nodes:
        if start.op != "call_module" or modules.get(str(start.target)) != "colwise":
            continue
        home = stage_of.get(start.name)
        todo, seen = list(start.users), set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if (node.op == "call_method" and node.target in _SHAPE_QUERIES) or (
                    node.op == "call_function" and node.target is getattr):
                continue
            if node.op == "output" or stage_of.get(node.name) != home:
                where = "the model's output" if node.op == "output" else f"stage {stage_of.get(node.name)}"
                raise PipeshiftError(
                    f"{start.target} (column-parallel, stage {home}) feeds {where} through {node.name} before any "
                    "row-parallel layer: its output is a shard there. Cut the plan elsewhere, or leave it whole "
                    f"(--tp-plan {start.target}=replicate and its partner likewise)")
            if node.op == "call_module" and modules.get(str(node.target), "").startswith("rowwise"):
                continue
            todo.extend(node.users)
