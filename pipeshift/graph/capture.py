"""Capture a model's dataflow graph with torch.fx, at leaf-module granularity.

The profiler and the code generator both call :func:`capture` on the same model spec, so a
graph.txt node id (``node7``) names the same operation in both. Capture is deterministic: the same
model, inputs and :class:`LeafPolicy` give the same fx graph and the same grouping.

Grouping: every graph node is one *tensor-producing* fx node (a leaf module call, a function such
as ``add``/``cat``/``flatten``, a method such as ``view``, a ``getitem`` on a tuple) plus the
non-tensor fx nodes that only serve it (``x.size(0)``, shape arithmetic). Those small helpers are
copied into every group that needs them, so each edge of the graph is a real tensor and a stage
boundary never has to carry a Python int.

Where torch.fx cannot trace a model (Python that needs concrete shapes, such as a loop over
``range(x.size(1))``), :mod:`pipeshift.graph.export_fallback` captures it with torch.export and
folds the ATen graph back to the same leaf-module granularity. A model neither can trace (control
flow on tensor values) gets a :class:`TraceError` naming the first untraceable op, its source
line, and the ``--leaf`` flag that makes its module opaque.
"""

from __future__ import annotations

import dataclasses
import os
import re
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from pipeshift.errors import PipeshiftError


class TraceError(PipeshiftError):
    """The model cannot be captured; the message names the op and the fix."""


@dataclasses.dataclass(frozen=True)
class LeafPolicy:
    """Which modules the tracer keeps whole (a leaf becomes one graph node).

    Defaults follow torch.fx: modules from ``torch.nn`` (except containers) are leaves. Add
    module classes by name (``leaf_types``), single modules by FQN (``leaf_modules``), or cut
    the hierarchy at ``max_depth`` (depth 1 = the root's children are leaves).
    """

    leaf_types: tuple[str, ...] = ()
    leaf_modules: tuple[str, ...] = ()
    max_depth: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"leaf_types": list(self.leaf_types), "leaf_modules": list(self.leaf_modules), "max_depth": self.max_depth}

    @classmethod
    def from_json(cls, data: Any) -> LeafPolicy:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PipeshiftError(f"leaf policy must be an object, got {data!r}")
        depth = data.get("max_depth")
        if depth is not None and (not isinstance(depth, int) or depth < 1):
            raise PipeshiftError(f"leaf policy max_depth must be a positive integer, got {depth!r}")
        return cls(
            leaf_types=tuple(str(t) for t in data.get("leaf_types", ())),
            leaf_modules=tuple(str(t) for t in data.get("leaf_modules", ())),
            max_depth=depth,
        )


class _Tracer(torch.fx.Tracer):
    def __init__(self, policy: LeafPolicy):
        super().__init__()
        self.policy = policy

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        cls = type(m)
        if cls.__name__ in self.policy.leaf_types or f"{cls.__module__}.{cls.__qualname__}" in self.policy.leaf_types:
            return True
        if qualname in self.policy.leaf_modules:
            return True
        if self.policy.max_depth is not None and qualname and qualname.count(".") + 1 >= self.policy.max_depth:
            return True
        return super().is_leaf_module(m, qualname)


def _current_module_hint(tracer: _Tracer) -> str:
    # torch.fx keeps the path of the module whose forward is being traced.
    path = getattr(tracer, "module_stack", None)
    if path:
        try:
            return list(path.keys())[-1] or ""
        except Exception:  # pragma: no cover - private structure changed
            return ""
    return ""


def _user_frame(error: BaseException) -> str:
    """``file.py:12 `code``` of the innermost traceback frame outside torch and pipeshift."""
    skip = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
    found = ""
    for frame in traceback.extract_tb(error.__traceback__):
        if not frame.filename.startswith(skip) and not frame.filename.startswith("<"):
            code = f" `{frame.line.strip()}`" if frame.line else ""
            found = f" at {os.path.basename(frame.filename)}:{frame.lineno}{code}"
    return found


def trace(model: nn.Module, policy: LeafPolicy | None = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; an untraceable op raises :class:`TraceError` with advice."""
    policy = policy or LeafPolicy()
    tracer = _Tracer(policy)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        where = _current_module_hint(tracer)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        owner = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else "the root module"
        fix = (
            f"mark it as a leaf: --leaf {where}" if where else "mark the module containing it as a leaf (--leaf FQN or --leaf-type ClassName)"
        )
        raise TraceError(
            f"cannot trace {type(model).__name__}: first untraceable op in {owner}{_user_frame(e)}: "
            f"{type(e).__name__}: {first}; {fix}"
        ) from None
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    # Drop pure ops whose results nobody uses (e.g. the unused cell state of an LSTM), so every
    # graph node feeds the loss and no stage computes values that go nowhere.
    if gm.graph.eliminate_dead_code():
        gm.recompile()
    return gm


def trace_with_fallback(
    model: nn.Module, example_inputs: Sequence[Any], policy: LeafPolicy | None = None
) -> tuple[torch.fx.GraphModule, str]:
    """torch.fx first; where it fails, torch.export folded back to the same leaf granularity.

    Returns the graph module and the tracer that made it (``"torch.fx"`` or ``"torch.export"``).
    When both fail, the :class:`TraceError` is torch.fx's (it names the op, the module and the
    ``--leaf`` fix) with the fallback's reason appended.
    """
    policy = policy or LeafPolicy()
    try:
        return trace(model, policy), "torch.fx"
    except TraceError as fx_error:
        from pipeshift.graph.export_fallback import export_trace

        try:
            gm = export_trace(model, example_inputs, _Tracer(policy).is_leaf_module)
        except Exception as e:  # export raises many types; the fx message is the useful one
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TraceError(f"{fx_error} (the torch.export fallback failed too: {type(e).__name__}: {why[:200]})") from None
        if gm.graph.eliminate_dead_code():
            gm.recompile()
        return gm, "torch.export"


# -- grouping --------------------------------------------------------------------------
def _is_tensorish(value: Any) -> bool:
    """A tensor, or a (nested) tuple/list of tensors; ``None`` may fill places (T5's blocks return
    ``(hidden, position_bias, None)``) as long as some tensor is there."""
    if torch.is_tensor(value):
        return True
    if isinstance(value, (tuple, list)) and value:
        return all(v is None or _is_tensorish(v) for v in value) and any(v is not None for v in value)
    return False


def flat_tensors(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat_tensors(v)]
    return []


@dataclasses.dataclass
class NodeGroup:
    """One graph node: a tensor-producing fx node and the helpers it needs."""

    node_id: str
    fx_name: str  # the tensor-producing fx node this group stands for
    fx_nodes: list[str]  # every fx node to run for it, in graph order (helpers first)
    op: str  # placeholder | call_module | call_function | call_method | get_attr
    target: str  # module FQN, function/method name, or attribute path
    desc: str
    inputs: list[str]  # node ids of the groups whose tensors it reads
    shapes: list[list[int]]
    dtypes: list[str]
    activation_bytes: list[int]
    parameter_bytes: int = 0
    buffer_bytes: int = 0
    input_index: int | None = None  # for raw model inputs: position in forward's arguments
    # parameters this node holds that other nodes hold too (tied weights, a module called twice):
    # first name -> bytes. Its parameter_bytes count them; the planner counts them once per stage.
    shared_parameters: dict[str, int] = dataclasses.field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("node_id")
        d.pop("desc")
        d["fqn"] = self.target if self.op in ("call_module", "get_attr") else None
        return d


@dataclasses.dataclass
class CapturedGraph:
    gm: torch.fx.GraphModule
    groups: list[NodeGroup]
    output_ids: list[str]  # groups whose tensors the model returns, in output order
    policy: LeafPolicy
    tracer: str = "torch.fx"  # which tracer made ``gm``: "torch.fx", or "torch.export" as the fallback

    def by_id(self) -> dict[str, NodeGroup]:
        return {g.node_id: g for g in self.groups}

    def group_of_fx(self) -> dict[str, str]:
        """Tensor-producing fx node name → node id."""
        return {g.fx_name: g.node_id for g in self.groups}


_WS = re.compile(r"\s+")


def describe(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """A one-line, separator-free description in PipeDream's style (a module's repr)."""
    if node.op == "call_module":
        text = repr(gm.get_submodule(str(node.target)))
    elif node.op == "call_function":
        text = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method":
        text = str(node.target)
    elif node.op == "get_attr":
        text = f"Parameter({node.target})"
    else:
        text = str(node.target)
    text = _WS.sub(" ", text).strip().replace(" -- ", " - ")
    return text[:400] or node.op


def _run_and_record(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    # The recording pass must leave no trace: BatchNorm running statistics (and their batch
    # counters) and the RNG would otherwise differ from a model that was never captured, and
    # every exactness check downstream compares against such a model.
    buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
    rng = torch.get_rng_state()
    try:
        with torch.no_grad():
            Recorder(gm).run(*example_inputs)
    finally:
        torch.set_rng_state(rng)
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(buffers[name])
    return values


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], policy: LeafPolicy) -> CapturedGraph:
    """Run the traced graph once on ``example_inputs`` and group its fx nodes into graph nodes."""
    values = _run_and_record(gm, example_inputs)
    nodes = list(gm.graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    returned = {m.name for m in _flatten_args(out_node.args) if isinstance(m, torch.fx.Node)}
    # A parameter or buffer read with get_attr is state, not dataflow: it joins (is copied into)
    # every group that uses it, like a shape helper, so a stage holds the weights it computes
    # with and never receives them as activations; one read by two stages is a tied parameter.
    tensorish = {n.name: (n.op == "placeholder" or (_is_tensorish(values.get(n.name))
                                                     and (n.op != "get_attr" or n.name in returned)))
                 for n in nodes if n.op != "output"}
    groups: list[NodeGroup] = []
    group_of: dict[str, str] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    input_pos = {n.name: i for i, n in enumerate(placeholders)}
    modules = dict(gm.named_modules())

    def helpers_of(n: torch.fx.Node) -> tuple[list[str], list[str]]:
        """Non-tensor ancestors reachable through non-tensor nodes, and the tensor nodes they read."""
        seen: set[str] = set()
        tensor_deps: list[str] = []
        stack = list(n.all_input_nodes)
        while stack:
            m = stack.pop()
            if m.name in seen:
                continue
            seen.add(m.name)
            if tensorish[m.name]:
                tensor_deps.append(m.name)
            else:
                stack.extend(m.all_input_nodes)
        return [x for x in seen if not tensorish[x]], tensor_deps

    order = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    held: dict[str, list[torch.Tensor]] = {}  # node id -> the parameters it holds
    counter = 0
    for n in nodes:
        if n.op == "output" or not tensorish[n.name]:
            continue
        counter += 1
        node_id = f"node{counter}"
        helpers, deps = helpers_of(n)
        value = values.get(n.name)
        tensors = flat_tensors(value)
        params = bufs = 0
        mine: list[torch.Tensor] = []
        if n.op == "call_module":
            mod = modules[str(n.target)]
            mine = list(mod.parameters())
            params = sum(_tensor_bytes(p) for p in mine)
            bufs = sum(_tensor_bytes(b) for b in mod.buffers())
        elif n.op == "get_attr":
            params = sum(_tensor_bytes(t) for t in tensors)
            mine = [t for t in tensors if isinstance(t, nn.Parameter)]
        for h in helpers:
            state = values.get(h) if by_name[h].op == "get_attr" else None
            if torch.is_tensor(state):
                if isinstance(state, nn.Parameter):
                    params += _tensor_bytes(state)
                    mine.append(state)
                else:
                    bufs += _tensor_bytes(state)
        held[node_id] = mine
        if n.op == "placeholder":
            desc = f"Input{input_pos[n.name]}"
        else:
            desc = describe(gm, n)
        inputs: list[str] = []
        for d in sorted(deps, key=order.__getitem__):
            gid = group_of[d]
            if gid not in inputs:
                inputs.append(gid)
        groups.append(
            NodeGroup(
                node_id=node_id,
                fx_name=n.name,
                fx_nodes=sorted(helpers, key=order.__getitem__) + [n.name],
                op=n.op,
                target=str(n.target) if n.op != "call_function" else getattr(n.target, "__name__", str(n.target)),
                desc=desc,
                inputs=inputs,
                shapes=[list(t.shape) for t in tensors],
                dtypes=[str(t.dtype).replace("torch.", "") for t in tensors],
                activation_bytes=[_tensor_bytes(t) for t in tensors],
                parameter_bytes=params,
                buffer_bytes=bufs,
                input_index=input_pos.get(n.name),
            )
        )
        group_of[n.name] = node_id
    _mark_shared(groups, held, gm)
    output_ids: list[str] = []
    for m in _flatten_args(out_node.args):
        if isinstance(m, torch.fx.Node):
            if not tensorish[m.name]:
                raise TraceError(f"the model returns a non-tensor value ({m.name}); pipeline stages exchange tensors only")
            output_ids.append(group_of[m.name])
    return CapturedGraph(gm=gm, groups=groups, output_ids=output_ids, policy=policy)


def _mark_shared(groups: list[NodeGroup], held: dict[str, list[torch.Tensor]], gm: torch.fx.GraphModule) -> None:
    """Fill ``shared_parameters`` of the groups holding a parameter another group holds too.

    Found by tensor identity, not by name (GPT-2's head *is* its embedding's weight), and named
    by the parameter's first name in the module, as ``named_parameters`` reports it.
    """
    names = {id(p): name for name, p in gm.named_parameters()}
    holders: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for node_id, params in held.items():
        for p in params:
            if node_id not in holders.setdefault(id(p), []):
                holders[id(p)].append(node_id)
                tensors[id(p)] = p
    by_id = {g.node_id: g for g in groups}
    for key, nodes in holders.items():
        if len(nodes) > 1:
            p = tensors[key]
            for node_id in nodes:
                by_id[node_id].shared_parameters[names.get(key, f"<unnamed {tuple(p.shape)}>")] = _tensor_bytes(p)


def _flatten_args(a: Any) -> Iterable[Any]:
    if isinstance(a, (tuple, list)):
        for x in a:
            yield from _flatten_args(x)
    elif isinstance(a, dict):
        for x in a.values():
            yield from _flatten_args(x)
    else:
        yield a


def capture(model: nn.Module, example_inputs: Sequence[Any], policy: LeafPolicy | None = None) -> CapturedGraph:
    """Trace ``model`` and group its fx graph into graph nodes (see module docstring).

    torch.fx tracing comes first; only a model it cannot trace goes through the torch.export
    fallback (:func:`trace_with_fallback`), so graphs torch.fx can capture keep their node ids.
    """
    policy = policy or LeafPolicy()
    gm, tracer = trace_with_fallback(model, example_inputs, policy)
    captured = group_graph(gm, example_inputs, policy)
    captured.tracer = tracer
    return captured


def to_graph(captured: CapturedGraph) -> "Graph":  # noqa: F821 - imported lazily below
    """The structural :class:`~pipeshift.graph.ir.Graph` (sizes filled, times zero)."""
    from pipeshift.graph.ir import Graph, Node

    g = Graph()
    for grp in captured.groups:
        act: float | list[float]
        act = [float(b) for b in grp.activation_bytes] if len(grp.activation_bytes) > 1 else float(sum(grp.activation_bytes))
        g.add_node(
            Node(
                node_id=grp.node_id,
                desc=grp.desc,
                activation_size=act,
                parameter_size=float(grp.parameter_bytes),
                meta=grp.meta(),
            )
        )
    for grp in captured.groups:
        for src in grp.inputs:
            g.add_edge(src, grp.node_id)
    return g
