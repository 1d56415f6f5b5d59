"""Per-node forward and backward time, measured inside real training steps.

**Forward.** The captured graph runs node by node (:class:`~pipeshift.profiler.runner.GroupRunner`);
a clock mark before and after each node gives its forward time. Marks are
``time.perf_counter()`` on CPU and CUDA events on GPU (:mod:`pipeshift.profiler.clock`).

**Backward: timeline attribution with autograd hooks.** While the forward runs, every node's
output tensors get a gradient hook. Autograd calls a tensor's hook when that tensor's gradient is
complete, just before the backward function that produced the tensor runs — i.e. when the node's
backward *starts*. The CPU engine runs ready backward functions in decreasing order of creation
(sequence number), and every autograd function a node creates is created during that node's
forward, so one node's backward functions run back to back: no other node's backward can become
ready in between (a node whose gradient depends on this one was created before it, so it comes
after). The backward is therefore a sequence of contiguous intervals, one per node, and a node's
backward time is the time from its first hook to the next node's first hook (the last node's
interval ends when ``backward()`` returns). Parameter gradients accumulate right after the
function that computes them (``AccumulateGrad`` has the highest priority), so they land in the
owning node's interval, which is where a pipeline stage pays for them too.

This attributes the whole measured backward: the per-node times sum to the step's backward
minus the engine's start-up before the first hook (recorded as ``unattributed_ms``), and the
instrumentation adds one Python call per node. Nodes that create no autograd function (inputs,
``getitem`` on a tuple, ops on integer tensors) get zero, as they should.

**Validation.** Each profiled step is interleaved with an uninstrumented step of the original
``nn.Module`` (forward, then backward with the same output gradients), so both see the same
machine load; profile.json records both (``whole_step`` vs ``totals``). The tests check that the
per-node medians sum to within 25% of the whole step on tiny ResNet-50, GPT, GNMT and
Inception-v3 (threads=1). See ``pipeshift/profiler/README.md`` for measured figures.

On CUDA, backward runs on autograd's device thread; the hooks record events on the stream the
engine runs on, so the same attribution holds in device time.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm import tqdm

from pipeshift.errors import PipeshiftError
from pipeshift.graph.capture import flat_tensors
from pipeshift.profiler.clock import Clock
from pipeshift.profiler.runner import GroupRunner


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements, in milliseconds."""

    median: float
    p10: float
    p90: float
    mean: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            return cls(0.0, 0.0, 0.0, 0.0, 0)
        a = np.asarray(samples, dtype=float)
        p10, median, p90 = np.percentile(a, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(a.mean()), len(a))

    def to_json(self, digits: int = 6) -> dict[str, float | int]:
        return {
            "median": round(self.median, digits),
            "p10": round(self.p10, digits),
            "p90": round(self.p90, digits),
            "mean": round(self.mean, digits),
            "n": self.n,
        }


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors in a model's return value: a tensor, or tuples, lists, dicts of them."""
    return [t for t in pytree.tree_leaves(outputs) if torch.is_tensor(t)]


class OutputGradients:
    """Fixed random gradients for the model's floating-point outputs (no loss function needed).

    Backpropagating ``randn`` gradients exercises every node's backward exactly as a loss would,
    without timing a criterion that is not part of the graph. The same gradients are used for
    the instrumented and the reference step.
    """

    def __init__(self, outputs: Any, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.grads = [
            torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) if self._wants_grad(t) else None
            for t in output_tensors(outputs)
        ]
        if not any(x is not None for x in self.grads):
            raise PipeshiftError("the model's outputs do not require grad: there is no backward pass to profile")

    @staticmethod
    def _wants_grad(t: torch.Tensor) -> bool:
        return t.requires_grad and t.is_floating_point()

    def pairs(self, outputs: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors = output_tensors(outputs)
        chosen = [(t, g) for t, g in zip(tensors, self.grads) if g is not None]
        return [t for t, _ in chosen], [g for _, g in chosen]


@dataclasses.dataclass
class StepSamples:
    """Per-node samples of the instrumented steps and totals of the reference steps."""

    forward: list[list[float]]
    backward: list[list[float]]
    unattributed_backward: list[float]
    whole_forward: list[float]
    whole_backward: list[float]


def instrumented_step(
    runner: GroupRunner, inputs: Sequence[Any], clock: Clock, grads: OutputGradients
) -> tuple[list[float], list[float], float]:
    """One forward+backward through ``runner``: per-node forward ms, backward ms, unattributed ms."""
    n = len(runner)
    env: dict[str, Any] = {}
    forward_marks: list[tuple[Any, Any]] = []
    started: list[tuple[int, Any]] = []  # (node index, mark) in the order backward reaches nodes
    begun = [False] * n
    hooked: set[tuple[int, int]] = set()
    alive: list[Any] = []  # keeps grad_fn objects alive so their ids stay unique this step

    def hook_for(index: int) -> Callable[[torch.Tensor], None]:
        def on_grad(_grad: torch.Tensor) -> None:
            if not begun[index]:
                begun[index] = True
                started.append((index, clock.mark()))

        return on_grad

    for i in range(n):
        t0 = clock.mark()
        value = runner.run_group(i, env, inputs)
        t1 = clock.mark()
        forward_marks.append((t0, t1))
        for t in flat_tensors(value):
            fn = t.grad_fn
            # A getitem or an identity op hands on a tensor an earlier node made: that node owns
            # its backward. An in-place op gives the same tensor a new grad_fn: a new owner.
            if fn is None or (id(fn), t.output_nr) in hooked:
                continue
            hooked.add((id(fn), t.output_nr))
            alive.append(fn)
            t.register_hook(hook_for(i))
    tensors, grad_tensors = grads.pairs(runner.outputs(env))
    b0 = clock.mark()
    torch.autograd.backward(tensors, grad_tensors)
    b1 = clock.mark()
    clock.sync()
    forward = [clock.ms(a, b) for a, b in forward_marks]
    backward = [0.0] * n
    ends = [m for _, m in started[1:]] + [b1]
    for (i, start), end in zip(started, ends):
        backward[i] += clock.ms(start, end)
    unattributed = clock.ms(b0, started[0][1] if started else b1)
    return forward, backward, unattributed


def reference_step(model: nn.Module, inputs: Sequence[Any], clock: Clock, grads: OutputGradients) -> tuple[float, float]:
    """One uninstrumented forward+backward of the original module: (forward ms, backward ms)."""
    t0 = clock.mark()
    out = model(*inputs)
    t1 = clock.mark()
    tensors, grad_tensors = grads.pairs(out)
    t2 = clock.mark()
    torch.autograd.backward(tensors, grad_tensors)
    t3 = clock.mark()
    clock.sync()
    return clock.ms(t0, t1), clock.ms(t2, t3)


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def time_steps(
    model: nn.Module,
    runner: GroupRunner,
    inputs: Sequence[Any],
    clock: Clock,
    *,
    iterations: int,
    warmup: int,
    progress: bool = True,
    desc: str = "timing",
) -> StepSamples:
    """Alternate instrumented and reference steps; keep the samples after ``warmup`` of each.

    The garbage collector is paused inside each step (as :mod:`timeit` does) so a collection
    does not land inside one node's interval; it runs between steps as usual (an explicit
    ``gc.collect()`` per step would evict the caches and slow the next step). Gradients are cleared between steps, so every
    step's parameter gradients are assigned, not accumulated, as after ``zero_grad()``.
    """
    n = len(runner)
    grads = OutputGradients(runner.forward(inputs)[0])
    samples = StepSamples([[] for _ in range(n)], [[] for _ in range(n)], [], [], [])
    for it in tqdm(range(warmup + iterations), desc=desc, unit="step", disable=not progress, leave=False):
        gc.disable()
        try:
            forward, backward, unattributed = instrumented_step(runner, inputs, clock, grads)
            _clear_grads(model)
            whole_forward, whole_backward = reference_step(model, inputs, clock, grads)
            _clear_grads(model)
        finally:
            gc.enable()
        if it < warmup:
            continue
        for i in range(n):
            samples.forward[i].append(forward[i])
            samples.backward[i].append(backward[i])
        samples.unattributed_backward.append(unattributed)
        samples.whole_forward.append(whole_forward)
        samples.whole_backward.append(whole_backward)
    return samples
