"""Profiling a model that does not fit: ``pipeshift profile --materialize per-node``.

The model is built with its parameters on the meta device (:mod:`pipeshift.materialize`) and
captured on meta tensors, which gives the graph, every node's output shapes and its parameter
sizes without allocating the model. Then, one graph node at a time, the node's own parameters
and buffers are materialised, it runs forward and backward on synthetic inputs of the recorded
shapes (random floats; a raw integer input is the real example input, so token ids stay in
range; other integer tensors are zeros), it is timed, what its forward saves for backward is
counted, and its tensors are freed again. The profiler's peak memory is therefore the largest
node's weights and gradients plus its activations, not the model.

These are in-isolation times — the measurement :mod:`pipeshift.profiler.validate` compares with
the in-context (hook-attributed) times of the default mode; they miss the interactions of a real
step (warm caches, gradients summed over several consumers), so the whole-step figures of the
profile are the sums of the nodes'.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeshift.graph.capture import CapturedGraph, LeafPolicy, capture, flat_tensors
from pipeshift.materialize import materialize, release
from pipeshift.profiler.memory import SavedBytes, _storage_key, optimizer_state_bytes
from pipeshift.profiler.runner import GroupRunner
from pipeshift.runtime.allocator import return_freed_memory

META = torch.device("meta")


def training_state_bytes(model: nn.Module, optimizer_states: float = 2.0) -> int:
    """Weights, gradients and (by default Adam's two) optimizer moments, from shapes alone (meta is fine)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int(params * (2 + optimizer_states) + buffers)


def available_bytes() -> int | None:
    """Memory the OS could give this process now (``MemAvailable``), ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def capture_meta(model: nn.Module, inputs: Sequence[Any], policy: LeafPolicy) -> tuple[CapturedGraph, dict[str, Any]]:
    """Capture ``model`` and run it once with every tensor on meta; returns the graph and each fx node's value."""

    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *xs: Any) -> tuple[CapturedGraph, dict[str, Any]]:
            captured = capture(self.model, xs, policy)
            _, env = GroupRunner(captured).forward(xs)
            return captured, env

    runner = Run()
    state = {n: torch.empty_like(t, device=META)
             for n, t in [*runner.named_parameters(remove_duplicate=False), *runner.named_buffers(remove_duplicate=False)]}
    meta_inputs = tuple(torch.empty_like(x, device=META) if torch.is_tensor(x) else x for x in inputs)
    return torch.func.functional_call(runner, state, meta_inputs, tie_weights=False)


def _synthetic(value: Any, device: torch.device, g: torch.Generator) -> Any:
    if torch.is_tensor(value):
        if value.is_floating_point():
            t = torch.randn(value.shape, generator=g, dtype=value.dtype).to(device)
            return t.requires_grad_(True)
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, (tuple, list)):
        return type(value)(_synthetic(v, device, g) for v in value)
    return value


def _group_fqns(captured: CapturedGraph, index: int) -> set[str]:
    """The modules and attributes (FQNs) a graph node's fx nodes read."""
    by_name = {n.name: n for n in captured.gm.graph.nodes}
    out = set()
    for name in captured.groups[index].fx_nodes:
        node = by_name[name]
        if node.op in ("call_module", "get_attr"):
            out.add(str(node.target))
    return out


def profile_nodes(model: nn.Module, example_inputs: Sequence[Any], policy: LeafPolicy, *, seed: int,
                  iterations: int, warmup: int, device: torch.device, progress: bool = True,
                  ) -> tuple[CapturedGraph, list[tuple[list[float], list[float], SavedBytes, dict[str, int]]]]:
    """Per node: forward and backward samples (ms), saved bytes and optimizer bytes; the model stays on meta."""
    inputs = [t.to(device) if torch.is_tensor(t) else t for t in example_inputs]
    captured, meta_env = capture_meta(model, inputs, policy)
    gm = captured.gm.train()
    fx_of = {g.node_id: g.fx_name for g in captured.groups}
    g = torch.Generator().manual_seed(seed)
    node_fqns = [_group_fqns(captured, i) for i in range(len(captured.groups))]
    weight_bytes = [_tensor_bytes(_params_of(gm, f)) for f in node_fqns]  # from shapes: the model is on meta
    largest = max(weight_bytes, default=0)
    out = []
    for i, group in enumerate(tqdm(captured.groups, desc="profiling one node at a time", disable=not progress,
                                   leave=False)):
        fqns = node_fqns[i]
        # A node whose weights and their gradients together would outweigh the largest node's weights
        # takes its backward in two passes (see _SplitBackward): the profiler's peak stays near the
        # largest node's weights instead of twice them.
        split = 2 * weight_bytes[i] > largest
        before = {n for n, t in [*gm.named_parameters(remove_duplicate=False),
                                 *gm.named_buffers(remove_duplicate=False)] if t.device.type == "meta"}
        if fqns:
            materialize(gm, fqns, seed=seed, device=device, keep_others=True)
        made = {n for n, t in [*gm.named_parameters(remove_duplicate=False),
                               *gm.named_buffers(remove_duplicate=False)] if t.device.type != "meta"} & before
        runner = GroupRunner(captured)  # resolves attributes now that this node's are real
        local = {fx_of[gid]: _synthetic(meta_env[fx_of[gid]], device, g) for gid in group.inputs}
        resident = {_storage_key(t)[0] for t in [*gm.parameters(), *gm.buffers()] if t.device.type != "meta"}
        fwd: list[float] = []
        bwd: list[float] = []
        saved: dict[int, int] = {}
        from_inputs = {_storage_key(t)[0] for t in flat_tensors(local)}
        for it in range(max(warmup, 1) + iterations):
            if split and it > 0:  # the last backward gave the weights' storage away: materialise them afresh
                release(gm, made)
                materialize(gm, fqns, seed=seed, device=device, keep_others=True)
                runner = GroupRunner(captured)
            scratch = dict(local)
            splitter = _SplitBackward([p for p in _params_of(gm, fqns) if p.requires_grad]) if split else None

            def pack(t: torch.Tensor, count: bool = it == 0, saved: dict[int, int] = saved,
                     splitter: _SplitBackward | None = splitter) -> Any:
                key, nbytes = _storage_key(t)
                if count:
                    saved[key] = nbytes
                return splitter.pack(t, key) if splitter is not None else t

            unpack = splitter.unpack if splitter is not None else (lambda t: t)
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack) if it == 0 or split else None
            _sync(device)
            t0 = time.perf_counter()
            if hooks is not None:
                with hooks:
                    value = runner.run_group(i, scratch, inputs)
            else:
                value = runner.run_group(i, scratch, inputs)
            _sync(device)
            t1 = time.perf_counter()
            pairs = [(t, torch.randn_like(t)) for t in flat_tensors(value) if t.grad_fn is not None]
            t2 = time.perf_counter()
            if pairs and splitter is not None:
                leaves = [t for t in flat_tensors(local) if t.requires_grad]
                splitter.backward([t for t, _ in pairs], [gr for _, gr in pairs], leaves)
            elif pairs:
                torch.autograd.backward([t for t, _ in pairs], [gr for _, gr in pairs])
            _sync(device)
            t3 = time.perf_counter()
            for p in gm.parameters():
                p.grad = None
            for t in flat_tensors(local):
                t.grad = None
            if it >= max(warmup, 1):
                fwd.append((t1 - t0) * 1e3)
                bwd.append((t3 - t2) * 1e3 if pairs else 0.0)
            del value, pairs, scratch, splitter
        kept = {k: n for k, n in saved.items() if k not in resident}
        nbytes = SavedBytes(total=int(sum(kept.values())),
                            from_inputs=int(sum(n for k, n in kept.items() if k in from_inputs)))
        params = [p for p in _params_of(gm, fqns) if p.requires_grad]
        out.append((fwd, bwd, nbytes, optimizer_state_bytes(params)))
        release(gm, made)
        del local, runner
        # Freed memory stays with the malloc arena that freed it (the intra-op threads have their
        # own) for reuse; the next node reuses little of it, so give it back: the peak is then one
        # node's, not one node's plus what earlier nodes left in other arenas.
        return_freed_memory()
    return captured, out


class _SplitBackward:
    """A node's backward in two passes, so that its weights and their gradients never coexist.

    The weights' own gradients need the node's inputs and output gradient, not the weights'
    values (a linear layer's is ``grad_out^T @ x``, an embedding's a scatter of ``grad_out``), so
    the backward first computes the gradients of the node's inputs while the weights are real,
    then frees the weights' storage and computes the weights' gradients (timed: both passes).
    Autograd keeps the weights alive through what the forward saved for backward, so the forward
    runs under :func:`torch.autograd.graph.saved_tensors_hooks` that save a weight (or a view of
    it) as its shape and position in the weight; unpacked after the weights are freed, it is a
    broadcast zero of that shape. A parameter object keeps its identity throughout (autograd's
    gradient edge is the object), only its ``.data`` changes.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.by_storage = {_storage_key(p)[0]: p for p in params}
        self.freed = False

    def pack(self, t: torch.Tensor, key: int) -> Any:
        owner = self.by_storage.get(key)
        if owner is None:
            return t
        return _WeightView(owner, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))

    def unpack(self, packed: torch.Tensor | _WeightView) -> torch.Tensor:
        if not isinstance(packed, _WeightView):
            return packed
        if self.freed:
            return torch.zeros((), dtype=packed.owner.dtype, device=packed.owner.device).expand(packed.shape)
        view: torch.Tensor = packed.owner.detach().as_strided(packed.shape, packed.stride, packed.offset)
        return view

    def backward(self, outputs: list[torch.Tensor], grads: list[torch.Tensor], leaves: list[torch.Tensor]) -> None:
        if leaves:
            torch.autograd.grad(outputs, leaves, grads, retain_graph=True, allow_unused=True)
        self.freed = True
        for p in self.params:
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
        if self.params:
            torch.autograd.grad(outputs, self.params, grads, allow_unused=True)


@dataclasses.dataclass(frozen=True)
class _WeightView:
    owner: torch.Tensor
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _params_of(gm: nn.Module, fqns: set[str]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if any(".".join(parts[:k]) in fqns for k in range(1, len(parts) + 1)):
            seen[id(p)] = p
    return list(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_model_per_node(model: nn.Module, example_inputs: Sequence[Any], *, batch_size: int,
                           policy: LeafPolicy | None = None, threads: int | None = None, iterations: int = 20,
                           warmup: int = 3, device: str | torch.device | None = None, spec: Any = None,
                           progress: bool = True) -> Any:
    """:func:`pipeshift.profiler.profile.profile_model` for a model built with ``weights=False``, node by node."""
    from pipeshift.profiler.profile import ModelProfile, NodeProfile, resolve_device
    from pipeshift.profiler.timing import Stats

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        captured, measured = profile_nodes(model.train(), example_inputs, policy or LeafPolicy(),
                                           seed=spec.seed if spec is not None else 0, iterations=iterations,
                                           warmup=warmup, device=dev, progress=progress)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    nodes = [NodeProfile(forward=Stats.of(f), backward=Stats.of(b), saved=s, optimizer_bytes=o)
             for f, b, s, o in measured]
    per_step_f = [sum(x) for x in zip(*[f for f, _, _, _ in measured])] if measured else []
    per_step_b = [sum(x) for x in zip(*[b for _, b, _, _ in measured])] if measured else []
    return ModelProfile(captured=captured, nodes=nodes, batch_size=batch_size, threads=used, device=str(dev),
                        iterations=iterations, warmup=warmup, clock="per-node, in isolation",
                        whole_forward=Stats.of(per_step_f), whole_backward=Stats.of(per_step_b),
                        unattributed_backward=Stats.of([0.0]), spec=spec, materialized="per-node")
