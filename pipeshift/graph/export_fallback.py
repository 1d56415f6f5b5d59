"""torch.export as the fallback tracer: the same leaf-module graph when torch.fx gives up.

torch.fx traces with proxies, so Python that needs a concrete value — a loop over
``range(x.size(1))``, ``torch.zeros(x.size(0), n)``, a branch on a shape — stops it. torch.export
(non-strict) runs the model on fake tensors and records ATen ops, so it gets through such code;
only control flow on tensor *values* defeats both.

The exported graph is too fine (one node per ATen op, leaf modules inlined), so we fold it back
into the graph torch.fx would have produced: every call of a leaf module (per the
:class:`~pipeshift.graph.capture.LeafPolicy`) becomes one ``call_module`` node on the original
module, with the arguments and outputs export recorded for that call
(``preserve_module_call_signature``); the ATen ops outside leaves stay ``call_function`` nodes;
parameters are ``get_attr`` nodes under their original FQNs. The batch dimension is exported as
dynamic where the model allows it, so shape arithmetic stays symbolic (``sym_size`` helpers)
rather than baking in the profiled batch size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export import graph_signature as gsig
from torch.utils import _pytree as pytree

_CALL_SUFFIX = re.compile(r"@\d+$")
_SET_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled
_INLINED = (_SET_GRAD, torch.ops.higher_order.wrap_with_autocast)


class ExportFallbackError(Exception):
    """torch.export ran, but its graph cannot be folded back into leaf-module form."""


# Containers hold modules but are never called, so torch.fx never asks whether they are leaves;
# the walk below must look inside them as tracing does, or every block of a ``ModuleList`` is lost.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def leaf_module_fqns(model: nn.Module, is_leaf: Any) -> list[str]:
    """FQNs of the modules the tracer would keep whole: leaves whose ancestors are not leaves."""
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if not isinstance(child, _CONTAINERS) and is_leaf(child, fqn):
                found.append(fqn)
            else:
                walk(child, fqn)

    walk(model, "")
    return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export prints graphs and warnings when it fails; the caller reports one line instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            yield
    finally:
        logging.disable(previous)


def _export(model: nn.Module, example_inputs: Sequence[Any], leaves: list[str]) -> torch.export.ExportedProgram:
    inputs = tuple(example_inputs)
    # Every dimension is dynamic where the model allows it (the batch, a sequence length), so the
    # graph computes sizes from its inputs instead of baking in the example's; a dimension the
    # model needs fixed (an image side a position table is sized for) stays static.
    dynamic = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} if torch.is_tensor(t) and t.dim() > 0 else None
                    for t in inputs)
    with _quiet():
        return torch.export.export(
            model, inputs, strict=False, dynamic_shapes=dynamic, preserve_module_call_signature=tuple(leaves)
        )


def _leaf_call(node: torch.fx.Node, leaves: set[str]) -> tuple[str, str] | None:
    """(module FQN, call name such as ``cell@2``) of the outermost leaf this node runs inside."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, value in stack.items():
        fqn = value[0] if isinstance(value, tuple) else None
        if fqn in leaves:
            suffix = _CALL_SUFFIX.search(key)
            return fqn, fqn + (suffix.group(0) if suffix else "")
    return None


def _output_paths(spec: pytree.TreeSpec, count: int) -> list[tuple[Any, ...]]:
    """For each flat output, the index path (tuple positions, dict keys) into the real output."""
    tree = pytree.tree_unflatten(list(range(count)), spec)
    paths: list[tuple[Any, ...]] = [()] * count

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if isinstance(value, int):
            paths[value] = path
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, (*path, i))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))
        else:
            raise ExportFallbackError(f"unsupported module output container {type(value).__name__}")

    walk(tree, ())
    return paths


class _Folder:
    """Builds the leaf-module fx graph from an exported program, node by node."""

    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram, leaves: list[str]):
        self.model = model
        self.ep = ep
        self.leaves = set(leaves)
        self.graph = torch.fx.Graph()
        self.env: dict[str, Any] = {}  # exported node name -> new node (or constant)
        self.attr_of: dict[str, str] = {}  # lifted placeholder name -> attribute FQN on the model
        self.attr_nodes: dict[str, torch.fx.Node] = {}
        self.signatures = {e.fqn: e.signature for e in ep.module_call_graph}
        self.emitted_calls: set[str] = set()
        self.owner: dict[str, str] = {}  # exported node name -> leaf call it belongs to
        self.subgraphs: dict[str, torch.fx.GraphModule] = {}  # bodies of higher-order ops, by node name
        self.inlined: set[str] = set()  # higher-order op nodes replaced by their bodies' ops
        self.vals: dict[torch.fx.Node, Any] = {}  # new node -> export's fake value (symbolic shapes)
        self.exported = {n.name: n for n in ep.graph.nodes}

    def value(self, name: str) -> Any:
        if name in self.attr_of:
            target = self.attr_of[name]
            if target not in self.attr_nodes:
                self.attr_nodes[target] = self.graph.get_attr(target)
            return self.attr_nodes[target]
        if name not in self.env:
            raise ExportFallbackError(f"value {name!r} is used outside the leaf module call that computes it")
        return self.env[name]

    def fold(self) -> torch.fx.Graph:
        sig = self.ep.graph_signature
        for spec in sig.input_specs:
            name = spec.arg.name
            if spec.kind in (gsig.InputKind.PARAMETER, gsig.InputKind.BUFFER, gsig.InputKind.CONSTANT_TENSOR):
                if spec.target is None or not self._has_attr(spec.target):
                    raise ExportFallbackError(f"tensor constant {spec.target!r} is not an attribute of the model")
                self.attr_of[name] = spec.target
            elif spec.kind != gsig.InputKind.USER_INPUT:
                raise ExportFallbackError(f"unsupported exported input kind {spec.kind.name}")
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                if node.name not in self.attr_of:
                    self.env[node.name] = self.graph.placeholder(node.name)
                    self.vals[self.env[node.name]] = node.meta.get("val")
            elif node.op == "output":
                self._output(node)
            elif node.op == "get_attr" and isinstance(getattr(self.ep.graph_module, str(node.target), None),
                                                       torch.fx.GraphModule):
                self.subgraphs[node.name] = getattr(self.ep.graph_module, str(node.target))
            elif node.op == "call_function":
                self._call_function(node, lambda n: self.value(n.name), self.env)
            else:
                raise ExportFallbackError(f"unsupported exported node {node.op} {node.target}")
        return self.graph

    def _call_function(self, node: torch.fx.Node, lookup: Any, env: dict[str, Any]) -> None:
        if node.target in _INLINED:
            env[node.name] = self._inline(node, lookup)
            self.inlined.add(node.name)
        elif node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) \
                and node.args[0].name in self.inlined:
            env[node.name] = lookup(node.args[0])[node.args[1]]  # an element of an inlined region's results
        else:
            call = _leaf_call(node, self.leaves)
            if call is None:
                env[node.name] = self.graph.node_copy(node, lookup)
                self.vals[env[node.name]] = node.meta.get("val")
                env[node.name].meta = {k: node.meta[k] for k in ("stack_trace",) if k in node.meta}
            elif env is not self.env:
                raise ExportFallbackError(f"leaf module {call[0]!r} is called inside a {node.target} region")
            else:
                self.owner[node.name] = call[1]
                if call[1] not in self.emitted_calls:
                    self._call_module(*call)

    def _inline(self, node: torch.fx.Node, lookup: Any) -> tuple[Any, ...]:
        """Copy the body of a grad-mode or autocast region into the graph, in place of the region.

        HF wraps small computations (rotary embeddings) in ``torch.no_grad()`` or a disabled
        autocast; torch.export records them as a higher-order op over a sub-graph. Inlined, the
        ops compute the same values; the results of a no-grad region are detached, so gradients
        still stop where the model stopped them.
        """
        if node.target is _SET_GRAD:
            enabled, body, *operands = node.args
        else:
            device, dtype, enabled, cache, body, *operands = node.args
            if enabled:
                raise ExportFallbackError(f"autocast to {dtype} on {device} inside forward is not supported; "
                                          "mark the module that uses it as a leaf")
        gm = self.subgraphs.get(body.name) if isinstance(body, torch.fx.Node) else None
        if gm is None:
            raise ExportFallbackError(f"{node.target}: its body is not a sub-graph of the program")
        local: dict[str, Any] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            raise ExportFallbackError(f"{node.target}: {len(operands)} operands for {len(placeholders)} inputs")
        for ph, operand in zip(placeholders, operands):
            local[ph.name] = lookup(operand) if isinstance(operand, torch.fx.Node) else operand

        def inner(n: torch.fx.Node) -> Any:
            if n.name not in local:
                raise ExportFallbackError(f"{node.target}: value {n.name!r} is used before it is computed")
            return local[n.name]

        results: Any = ()
        for n in gm.graph.nodes:
            if n.op == "call_function":
                self._call_function(n, inner, local)
            elif n.op == "output":
                results = torch.fx.node.map_arg(n.args[0], inner)
            elif n.op != "placeholder":
                raise ExportFallbackError(f"unsupported node {n.op} {n.target} inside {node.target}")
        results = tuple(results) if isinstance(results, (tuple, list)) else (results,)
        if node.target is _SET_GRAD and not enabled:
            results = tuple(self.graph.call_function(torch.ops.aten.detach.default, (r,))
                            if isinstance(r, torch.fx.Node) else r for r in results)
        return results

    def _has_attr(self, target: str) -> bool:
        try:
            obj: Any = self.model
            for part in target.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return False
        return torch.is_tensor(obj)

    def _argument(self, arg: Any) -> Any:
        if isinstance(arg, gsig.ConstantArgument):
            return arg.value
        if isinstance(arg, (gsig.TensorArgument, gsig.SymIntArgument, gsig.SymFloatArgument, gsig.SymBoolArgument)):
            return self.value(arg.name)
        raise ExportFallbackError(f"unsupported module argument {type(arg).__name__}")

    def _call_module(self, fqn: str, call: str) -> None:
        signature = self.signatures.get(call)
        if signature is None:
            raise ExportFallbackError(f"torch.export recorded no call signature for module {call!r}")
        flat = [self._argument(a) for a in signature.inputs]
        args, kwargs = pytree.tree_unflatten(flat, signature.in_spec)
        result = self.graph.call_module(fqn, tuple(args), dict(kwargs))
        self.emitted_calls.add(call)
        made: dict[tuple[Any, ...], torch.fx.Node] = {(): result}

        def element(path: tuple[Any, ...]) -> torch.fx.Node:
            if path not in made:
                made[path] = self.graph.call_function(operator.getitem, (element(path[:-1]), path[-1]))
            return made[path]

        paths = _output_paths(signature.out_spec, len(signature.outputs))
        for out, path in zip(signature.outputs, paths):
            if isinstance(out, gsig.ConstantArgument):
                continue
            if not isinstance(out, gsig.TensorArgument):
                raise ExportFallbackError(f"module {fqn!r} returns a non-tensor value ({type(out).__name__})")
            self.env[out.name] = element(path)
            self.vals[self.env[out.name]] = self.exported[out.name].meta.get("val") if out.name in self.exported else None

    def _output(self, node: torch.fx.Node) -> None:
        results = node.args[0]
        user: list[Any] = []
        for spec, value in zip(self.ep.graph_signature.output_specs, results):
            if spec.kind == gsig.OutputKind.USER_OUTPUT:
                user.append(self.value(value.name) if isinstance(value, torch.fx.Node) else value)
            elif spec.kind == gsig.OutputKind.BUFFER_MUTATION:
                # A leaf module updating its own buffers (BatchNorm's running stats) does so itself
                # when it is called; an update outside any leaf would be lost.
                if not (isinstance(value, torch.fx.Node) and value.name in self.owner):
                    raise ExportFallbackError(f"buffer {spec.target!r} is updated outside a leaf module")
            else:
                raise ExportFallbackError(f"unsupported exported output kind {spec.kind.name}")
        root = self.signatures.get("")
        structure = pytree.tree_unflatten(user, root.out_spec) if root is not None else tuple(user)
        self.graph.output(structure)

    def localise_sizes(self) -> None:
        """Read every dynamic size from a tensor the op itself receives, where one has it.

        torch.export reads a size once (``sym_size(input_ids, 1)``) and every later op uses that
        value, so a stage deep in the pipeline would need the raw input just to learn the batch
        size or the sequence length. Re-reading it from the op's own operand (``x.size(1)`` of the
        hidden states it reshapes) keeps each stage's inputs to the tensors it computes with.
        """
        sym_size = torch.ops.aten.sym_size.int
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target is sym_size:
                continue
            operands = [a for a in node.all_input_nodes if isinstance(self.vals.get(a), torch.Tensor)]
            for size in [a for a in node.all_input_nodes if a.op == "call_function" and a.target is sym_size]:
                source, dim = size.args
                expr = self._dim_expr(source, dim)
                if expr is None:
                    continue
                for candidate in operands:
                    if candidate is source:
                        break
                    shape = self.vals[candidate].shape
                    match = next((d for d in range(len(shape)) if _expr(shape[d]) == expr), None)
                    if match is not None:
                        with self.graph.inserting_before(node):
                            local = self.graph.call_function(sym_size, (candidate, match))
                        self.vals[local] = self.vals.get(size)
                        node.replace_input_with(size, local)
                        break

    def _dim_expr(self, source: Any, dim: Any) -> Any:
        val = self.vals.get(source)
        if not isinstance(val, torch.Tensor) or not isinstance(dim, int) or not -val.dim() <= dim < val.dim():
            return None
        size = val.shape[dim]
        return _expr(size) if isinstance(size, torch.SymInt) else None


def _expr(size: Any) -> Any:
    """The symbolic expression of a dynamic size (``s0``, ``2*s1``), or the int itself."""
    return size.node.expr if isinstance(size, torch.SymInt) else size


def export_trace(model: nn.Module, example_inputs: Sequence[Any], is_leaf: Any) -> torch.fx.GraphModule:
    """Export ``model`` and fold the result into a leaf-module :class:`torch.fx.GraphModule`.

    ``is_leaf(module, fqn)`` is the tracer's leaf test, so both tracers cut the model at the
    same modules. Raises whatever torch.export raises, or :class:`ExportFallbackError`.
    """
    leaves = leaf_module_fqns(model, is_leaf)
    ep = _export(model, example_inputs, leaves)
    folder = _Folder(model, ep, leaves)
    graph = folder.fold()
    folder.localise_sizes()
    graph.lint()
    return torch.fx.GraphModule(model, graph, type(model).__name__)
