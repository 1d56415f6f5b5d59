"""Run a captured graph one graph node at a time.

A graph node (:class:`~pipeshift.graph.capture.NodeGroup`) is a tensor-producing fx node plus
the non-tensor helpers it needs. Running group by group, in graph order, computes exactly what
the model computes (the helpers are pure and are simply recomputed where several groups share
one, as a generated stage would), and gives the profiler a seam between any two nodes where it
can read a clock, attach backward hooks or open a ``saved_tensors_hooks`` context.

Each fx node is resolved once, up front, to the callable it runs (the module, the function, the
method name), so the per-node cost while timing is a dict lookup and an argument map, not
torch.fx's generic :class:`~torch.fx.Interpreter` dispatch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.node import map_arg

from pipeshift.graph.capture import CapturedGraph, NodeGroup, flat_tensors


@dataclasses.dataclass
class _Step:
    """One fx node, ready to run against an environment of already computed values."""

    name: str
    run: Callable[[dict[str, Any], Sequence[Any]], Any]


def _fetch_attr(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _make_step(gm: torch.fx.GraphModule, node: torch.fx.Node, input_index: dict[str, int]) -> _Step:
    args, kwargs = node.args, node.kwargs

    def resolve(env: dict[str, Any]) -> tuple[Any, Any]:
        return map_arg(args, lambda n: env[n.name]), map_arg(kwargs, lambda n: env[n.name])

    if node.op == "placeholder":
        position = input_index[node.name]
        return _Step(node.name, lambda env, inputs: inputs[position])
    if node.op == "get_attr":
        value = _fetch_attr(gm, str(node.target))
        return _Step(node.name, lambda env, inputs: value)
    if node.op == "call_module":
        fn: Callable[..., Any] = gm.get_submodule(str(node.target))
    elif node.op == "call_function":
        fn = node.target  # type: ignore[assignment]
    elif node.op == "call_method":
        method = str(node.target)

        def fn(self_: Any, *a: Any, **k: Any) -> Any:
            return getattr(self_, method)(*a, **k)

    else:
        raise ValueError(f"cannot run fx node {node.op} {node.name}")

    def run(env: dict[str, Any], inputs: Sequence[Any]) -> Any:
        a, k = resolve(env)
        return fn(*a, **k)

    return _Step(node.name, run)


class GroupRunner:
    """Executes a :class:`CapturedGraph` group by group; ``env`` maps fx node names to values."""

    def __init__(self, captured: CapturedGraph):
        self.captured = captured
        self.groups: list[NodeGroup] = captured.groups
        gm = captured.gm
        nodes = {n.name: n for n in gm.graph.nodes}
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        input_index = {name: i for i, name in enumerate(placeholders)}
        self._steps = [[_make_step(gm, nodes[name], input_index) for name in g.fx_nodes] for g in self.groups]
        self._output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        self._fx_name_of = {g.node_id: g.fx_name for g in self.groups}

    def __len__(self) -> int:
        return len(self.groups)

    def run_group(self, index: int, env: dict[str, Any], inputs: Sequence[Any]) -> Any:
        """Compute group ``index`` (helpers, then its tensor node) into ``env``; returns its value."""
        value = None
        for step in self._steps[index]:
            value = step.run(env, inputs)
            env[step.name] = value
        return value

    def value_of(self, index: int, env: dict[str, Any]) -> Any:
        return env[self.groups[index].fx_name]

    def input_tensors(self, index: int, env: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors group ``index`` reads from other groups (already in ``env``)."""
        return [t for gid in self.groups[index].inputs for t in flat_tensors(env[self._fx_name_of[gid]])]

    def outputs(self, env: dict[str, Any]) -> Any:
        """The model's return value, structured as ``forward`` returns it."""
        return map_arg(self._output, lambda n: env[n.name])

    def forward(self, inputs: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        env: dict[str, Any] = {}
        for i in range(len(self.groups)):
            self.run_group(i, env, inputs)
        return self.outputs(env), env
