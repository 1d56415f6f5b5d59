"""Profile one model at one batch size: capture, time, size — the numbers graph.txt carries.

:func:`profile_model` is the library entry point (the CLI is a thin shell around it); it returns
a :class:`ModelProfile` that knows how to become a :class:`~pipeshift.graph.ir.Graph` (for
graph.txt) and the profile.json document (CONTRIBUTING.md, "profile.json").
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeshift.tp_plan import TPPlan
from pipeshift.tp_plan import resolve as resolve_tp_plan
from pipeshift.tp_plan import to_json as tp_plan_json
from pipeshift.tp_plan import with_leaves as with_tp_leaves
from pipeshift.errors import PipeshiftError
from pipeshift.graph.capture import CapturedGraph, LeafPolicy, capture, to_graph
from pipeshift.graph.ir import Graph
from pipeshift.profiler.clock import clock_for
from pipeshift.profiler.memory import SavedBytes, optimizer_state_bytes, saved_bytes_per_node, trainable_tensors_of
from pipeshift.profiler.runner import GroupRunner
from pipeshift.profiler import noise
from pipeshift.profiler.timing import Stats, time_steps
from pipeshift.spec import ModelSpec

PROFILE_VERSION = 1


@dataclasses.dataclass
class NodeProfile:
    """Measurements of one graph node (the structural part is the capture's ``NodeGroup``)."""

    forward: Stats
    backward: Stats
    saved: SavedBytes
    optimizer_bytes: dict[str, int]


@dataclasses.dataclass
class ModelProfile:
    captured: CapturedGraph
    nodes: list[NodeProfile]
    batch_size: int
    threads: int
    device: str
    iterations: int
    warmup: int
    clock: str
    whole_forward: Stats
    whole_backward: Stats
    unattributed_backward: Stats
    spec: ModelSpec | None = None
    noise: dict[str, Any] | None = None  # the noise checks of the kept measurement (noise.Attempt.to_json)
    materialized: str = "whole"  # "per-node": timed one node at a time, in isolation (profiler/per_node.py)
    tp_plan: TPPlan | None = None  # which modules a tensor-parallel stage would shard (pipeshift.tp_plan)

    @property
    def noise_findings(self) -> list[str]:
        return list((self.noise or {}).get("findings", []))

    def graph(self) -> Graph:
        """The graph.txt graph: structure and sizes from the capture, median times in ms."""
        g = to_graph(self.captured)
        meta = self.node_meta()
        for group, prof in zip(self.captured.groups, self.nodes):
            node = g[group.node_id]
            node.forward_ms = round(prof.forward.median, 6)
            node.backward_ms = round(prof.backward.median, 6)
            node.meta = meta[group.node_id]
        return g

    def node_meta(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for group, prof in zip(self.captured.groups, self.nodes):
            m = group.meta()
            m.update(
                desc=group.desc,
                forward_ms=prof.forward.to_json(),
                backward_ms=prof.backward.to_json(),
                saved_bytes=prof.saved.total,
                saved_input_bytes=prof.saved.from_inputs,
                optimizer_bytes=prof.optimizer_bytes,
            )
            out[group.node_id] = m
        return out

    def totals(self) -> dict[str, Any]:
        params = {id(p): p for p in self.captured.gm.parameters()}
        return {
            "forward_ms": round(sum(n.forward.median for n in self.nodes), 6),
            "backward_ms": round(sum(n.backward.median for n in self.nodes), 6),
            "activation_bytes": sum(sum(g.activation_bytes) for g in self.captured.groups if g.input_index is None),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            "saved_bytes": sum(n.saved.total for n in self.nodes),
            "optimizer_bytes": optimizer_state_bytes(p for p in params.values() if p.requires_grad),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROFILE_VERSION,
            "model": self.spec.to_json() if self.spec is not None else None,
            "leaf_policy": self.captured.policy.to_json(),
            "tracer": self.captured.tracer,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "device": self.device,
            "machine": machine_info(self.device),
            "torch_version": torch.__version__,
            "timing": {
                "clock": self.clock,
                "iterations": self.iterations,
                "warmup": self.warmup,
                "backward_attribution": "autograd tensor hooks on node outputs (timeline between nodes)",
                "output_gradients": "fixed random normal (no criterion)",
                "units": "ms per minibatch",
            },
            "whole_step": {
                "forward_ms": self.whole_forward.to_json(),
                "backward_ms": self.whole_backward.to_json(),
                "unattributed_backward_ms": self.unattributed_backward.to_json(),
            },
            "totals": self.totals(),
            "noise": self.noise,
            "materialize": self.materialized,
            "tp_plan": tp_plan_json(self.tp_plan) if self.tp_plan is not None else None,
            "inputs": [g.node_id for g in self.captured.groups if g.input_index is not None],
            "outputs": list(self.captured.output_ids),
            "nodes": self.node_meta(),
        }


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return info


def resolve_device(name: str | None) -> torch.device:
    """``None``/``"auto"``: the GPU when there is one. A GPU asked for but absent is a user error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipeshiftError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipeshiftError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise PipeshiftError(f"--device {name}: only cpu and cuda are supported")
    return device


def _check_runs(model: nn.Module, inputs: Sequence[Any], what: str) -> None:
    """Run the model once eagerly, so a wrong input shape is reported as the user's mistake."""
    try:
        with torch.no_grad():
            model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs if torch.is_tensor(t))
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PipeshiftError(f"{what} fails on its example inputs ({shapes}): {type(e).__name__}: {first}") from None


def profile_model(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    batch_size: int,
    policy: LeafPolicy | None = None,
    threads: int | None = None,
    iterations: int = 20,
    warmup: int = 3,
    device: str | torch.device | None = None,
    spec: ModelSpec | None = None,
    progress: bool = True,
    remeasure: int = 1,
    tp_rules: dict[str, str] | None = None,
) -> ModelProfile:
    """Capture ``model`` on ``example_inputs`` and measure every graph node.

    The model is put in training mode (dropout and batch norm behave as in training) and moved
    to ``device``; ``threads`` fixes torch's intra-op thread count for the whole run. A
    measurement the noise checks (:mod:`pipeshift.profiler.noise`) find disturbed is taken again,
    up to ``remeasure`` more times, and the steadiest one is kept.
    """
    if iterations < 1 or warmup < 0:
        raise PipeshiftError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    if remeasure < 0:
        raise PipeshiftError(f"--remeasure must be >= 0, got {remeasure}")
    if threads is not None and threads < 1:
        raise PipeshiftError(f"--threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _profile(model, example_inputs, batch_size, policy or LeafPolicy(), iterations, warmup, device, spec,
                        progress, remeasure, tp_rules)
    finally:
        torch.set_num_threads(previous_threads)  # a library call leaves the process as it found it


def _profile(
    model: nn.Module,
    example_inputs: Sequence[Any],
    batch_size: int,
    policy: LeafPolicy,
    iterations: int,
    warmup: int,
    device: str | torch.device | None,
    spec: ModelSpec | None,
    progress: bool,
    remeasure: int = 1,
    tp_rules: dict[str, str] | None = None,
) -> ModelProfile:
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = model.to(dev).train()
    inputs = [t.to(dev) if torch.is_tensor(t) else t for t in example_inputs]
    what = spec.callable if spec is not None else type(model).__name__
    _check_runs(model, inputs, what)
    captured = capture(model, inputs, policy)
    tp_plan = with_tp_leaves(resolve_tp_plan(model, captured.gm, tp_rules), model, captured.gm)
    runner = GroupRunner(captured)
    saved = saved_bytes_per_node(model, runner, inputs)
    clock = clock_for(dev)
    attempts: list[noise.Attempt] = []
    for attempt in range(1 + remeasure):
        before = noise.calibrate()
        samples = time_steps(
            model, runner, inputs, clock, iterations=iterations, warmup=warmup, progress=progress,
            desc=f"profiling b={batch_size}" + (f" (again: noisy, {attempt + 1})" if attempt else ""),
        )
        after = noise.calibrate()
        whole = [f + b for f, b in zip(samples.whole_forward, samples.whole_backward)]
        attempts.append(noise.Attempt(samples, before, after, noise.assess(before, after, whole), noise.spread(whole)))
        if not attempts[-1].findings:
            break
    kept = min(attempts, key=noise.Attempt.badness)
    samples = kept.samples
    nodes = [
        NodeProfile(
            forward=Stats.of(samples.forward[i]),
            backward=Stats.of(samples.backward[i]),
            saved=saved[i],
            optimizer_bytes=optimizer_state_bytes(trainable_tensors_of(runner, i)),
        )
        for i in range(len(runner))
    ]
    return ModelProfile(
        captured=captured,
        nodes=nodes,
        batch_size=batch_size,
        threads=torch.get_num_threads(),
        device=str(dev),
        iterations=iterations,
        warmup=warmup,
        clock=clock.name,
        whole_forward=Stats.of(samples.whole_forward),
        whole_backward=Stats.of(samples.whole_backward),
        unattributed_backward=Stats.of(samples.unattributed_backward),
        spec=spec,
        noise=kept.to_json(len(attempts)),
        tp_plan=tp_plan,
    )
