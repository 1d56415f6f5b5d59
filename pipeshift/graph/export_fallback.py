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


class ExportFallbackError(Exception):
    """torch.export ran, but its graph cannot be folded back into leaf-module form."""


def leaf_module_fqns(model: nn.Module, is_leaf: Any) -> list[str]:
    """FQNs of the modules the tracer would keep whole: leaves whose ancestors are not leaves."""
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if is_leaf(child, fqn):
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
    dynamic = tuple({0: torch.export.Dim.AUTO} if torch.is_tensor(t) and t.dim() > 0 else None for t in inputs)
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
            elif node.op == "output":
                self._output(node)
            elif node.op == "call_function":
                call = _leaf_call(node, self.leaves)
                if call is None:
                    self.env[node.name] = self.graph.node_copy(node, lambda n: self.value(n.name))
                    self.env[node.name].meta = {k: node.meta[k] for k in ("stack_trace",) if k in node.meta}
                else:
                    self.owner[node.name] = call[1]
                    if call[1] not in self.emitted_calls:
                        self._call_module(*call)
            else:
                raise ExportFallbackError(f"unsupported exported node {node.op} {node.target}")
        return self.graph

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


def export_trace(model: nn.Module, example_inputs: Sequence[Any], is_leaf: Any) -> torch.fx.GraphModule:
    """Export ``model`` and fold the result into a leaf-module :class:`torch.fx.GraphModule`.

    ``is_leaf(module, fqn)`` is the tracer's leaf test, so both tracers cut the model at the
    same modules. Raises whatever torch.export raises, or :class:`ExportFallbackError`.
    """
    leaves = leaf_module_fqns(model, is_leaf)
    ep = _export(model, example_inputs, leaves)
    graph = _Folder(model, ep, leaves).fold()
    graph.lint()
    return torch.fx.GraphModule(model, graph, type(model).__name__)
