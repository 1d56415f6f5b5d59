"""Memory per rank: what the planner's cost model predicts for the stages as built, and what the rank measured.

The prediction is the planner's own formula (:class:`pipeshift.optimizer.cost.Memory`): weights
× (weight versions + gradients + optimizer states per weight) + activations stashed per
microbatch × microbatches in flight, with the schedule's in-flight count and versions
(:class:`pipeshift.optimizer.cost.Schedule`). Here the weights are the exact bytes of the
stage's tensors, read from the model while it is still on the meta device, and the schedule,
microbatch count and optimizer are the run's — so every rank can price every stage before any
of them allocates, and a stage over ``--memory-size`` (or the plan's own limit) stops the job
at once. Activations come from the plan's profiled ``stash_bytes_per_microbatch`` (scaled to the
run's batch size), zero where the plan does not have them.

Measured: the peak resident set (``ru_maxrss``) on CPU, ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeshift.errors import PipeshiftError

OPTIMIZER_STATES = {"sgd": 0.0, "momentum": 1.0, "adam": 2.0, "adamw": 2.0}


@dataclasses.dataclass(frozen=True)
class StageMemory:
    stage: int
    parameter_bytes: int
    buffer_bytes: int
    activation_bytes: float
    versions: float
    optimizer_states: float
    predicted_bytes: float
    plan_bytes: float | None  # the planner's figure in plan.json, when it has one

    def breakdown(self) -> str:
        return (f"weights {size(self.parameter_bytes)} x (versions {self.versions:g} + gradients 1 + "
                f"optimizer {self.optimizer_states:g}), buffers {size(self.buffer_bytes)}, "
                f"activations {size(self.activation_bytes)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def size(n: float) -> str:
    """Bytes as people read them: ``3.2 kB``, ``1.6 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def tensor_bytes(tensors: Mapping[int, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def predict(stage_modules: Sequence[torch.nn.Module], stage_ranks: Sequence[Sequence[int]],
            plan_stages: Sequence[Mapping[str, Any]] | None, *, schedule: str, microbatches: int,
            optimizer_states: float, batch_scale: float = 1.0) -> list[StageMemory]:
    """Every stage's predicted bytes per worker (works on meta tensors: only shapes are read)."""
    from pipeshift.optimizer.cost import Memory, Schedule

    sched = Schedule(kind=schedule, microbatches=microbatches)
    memory = Memory(None, optimizer_states)
    out = []
    for s, module in enumerate(stage_modules):
        params = tensor_bytes({id(p): p for p in module.parameters()})
        buffers = tensor_bytes({id(b): b for b in module.buffers()})
        raw = plan_stages[s] if plan_stages is not None and s < len(plan_stages) else {}
        costs: Mapping[str, Any] = raw["costs"] if isinstance(raw.get("costs"), Mapping) else {}
        stash = _number(costs.get("stash_bytes_per_microbatch")) * batch_scale
        downstream = sum(len(r) for r in stage_ranks[s + 1:])
        in_flight = float(sched.in_flight(downstream, len(stage_ranks[s])))
        versions = float(sched.weight_versions(in_flight))  # the live weights, and for 1f1b/2bw their stashes
        total = float(memory.bytes(params, stash, in_flight, versions)) + buffers
        predicted: Mapping[str, Any] = raw["predicted"] if isinstance(raw.get("predicted"), Mapping) else {}
        plan_bytes = _number(predicted.get("memory_bytes")) or None
        out.append(StageMemory(s, params, buffers, in_flight * stash, versions, optimizer_states, total, plan_bytes))
    return out


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0.0


def check_limit(stages: Sequence[StageMemory], limit: float | None, where: str) -> None:
    """Refuse (the same way on every rank) a plan one of whose stages would not fit in ``limit`` bytes."""
    if not limit:
        return
    for st in stages:
        if st.predicted_bytes > limit:
            raise PipeshiftError(
                f"stage {st.stage} needs an estimated {size(st.predicted_bytes)} per worker "
                f"({st.breakdown()}) but {where} is {size(limit)}: refused before allocating anything; "
                "plan for more workers or a smaller model, or use a schedule with fewer microbatches in flight")


def peak_bytes(device: torch.device) -> int:
    """This rank's peak memory: CUDA's allocator peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from pipeshift.runtime.allocator import peak_resident_bytes

    return peak_resident_bytes()
