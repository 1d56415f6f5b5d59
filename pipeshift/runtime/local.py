"""This rank's stages, and nothing else: the model built on the meta device, only its own tensors made real.

A stage package's ``model(criterion, original)`` adopts the original model's submodules by FQN,
which costs nothing on a model whose parameters are still on the meta device
(:meth:`ModelSpec.build(weights=False) <pipeshift.spec.ModelSpec.build>`). Building the entries
once over that model tells which tensors each stage holds; this rank's are then materialised —
initialised per module from the recorded seed (the same values whichever rank, and however many,
build them), or read from ``--init-from`` tensor by tensor — and the entries are built again
over the partly real model. The other stages' modules stay on meta and are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from pipeshift.materialize import materialize
from pipeshift.runtime.memory import StageMemory, check_limit, predict
from pipeshift.runtime.stage import StageEntry


@dataclasses.dataclass
class LocalBuild:
    """What :func:`local_entries` made: the entries, and which tensors this rank holds and read."""

    entries: list[StageEntry]
    held: list[str]  # state_dict keys of the model this rank materialised
    loaded: list[str]  # the keys read from --init-from (empty without it)
    memory: list[StageMemory] | None = None  # every stage's predicted bytes per worker


@dataclasses.dataclass(frozen=True)
class MemoryCheck:
    """The run's schedule and optimizer, to price every stage before allocating (:mod:`pipeshift.runtime.memory`)."""

    schedule: str
    microbatches: int
    optimizer_states: float
    batch_scale: float = 1.0
    limit: float | None = None  # bytes per worker; a stage over it is refused
    limit_source: str = "--memory-size"
    plan_stages: Sequence[Mapping[str, Any]] | None = None
    stage_ranks: Sequence[Sequence[int]] | None = None


def stage_tensor_names(module: nn.Module) -> set[str]:
    """Every parameter and buffer name (original FQNs) a stage module holds, tied duplicates included."""
    return ({n for n, _ in module.named_parameters(remove_duplicate=False)}
            | {n for n, _ in module.named_buffers(remove_duplicate=False)})


def local_entries(make: Callable[[nn.Module], list[StageEntry]], model: nn.Module, module_to_stage: Sequence[int],
                  stages: Sequence[int], *, seed: int, init_from: str | None = None, who: str = "",
                  memory: MemoryCheck | None = None) -> LocalBuild:
    """``make(model)`` (stages over ``model`` plus the criterion) with only ``stages``' tensors real.

    ``model`` comes from ``build(weights=False)``; afterwards it holds real tensors for exactly
    the FQNs of ``stages`` (and is otherwise on meta), so a caller may keep it as the rank's
    landing place for repartitioning. With ``memory``, every stage is priced first and a stage
    over the limit raises before anything is allocated (every rank prices every stage alike).
    """
    entries = make(model)
    priced = price_stages(entries, module_to_stage, memory) if memory is not None else None
    names: set[str] = set()
    for i, (module, _, _) in enumerate(entries[:-1]):
        if module_to_stage[i] in stages:
            names |= stage_tensor_names(module)
    loaded: list[str] = []
    if init_from is None:
        held = materialize(model, names, seed=seed)
    else:
        from pipeshift.weights import load_into, open_weights

        held = materialize(model, names, initialize=False)
        source = open_weights(init_from)
        state = model.state_dict(keep_vars=True)
        loaded = load_into(state, source, held, who=who, aliases=tensor_aliases(model))
        source.close()
    return LocalBuild(make(model), held, loaded, priced)


def price_stages(entries: Sequence[StageEntry], module_to_stage: Sequence[int], check: MemoryCheck) -> list[StageMemory]:
    """Every stage's predicted memory from ``entries`` (on meta, so nothing is read); refuses one over the limit."""
    count = max(module_to_stage) + 1
    modules = [nn.ModuleList([m for i, (m, _, _) in enumerate(entries[:-1]) if module_to_stage[i] == s])
               for s in range(count)]
    ranks = list(check.stage_ranks) if check.stage_ranks is not None and len(check.stage_ranks) == count \
        else [[0]] * count
    priced = predict(modules, ranks, check.plan_stages, schedule=check.schedule, microbatches=check.microbatches,
                     optimizer_states=check.optimizer_states, batch_scale=check.batch_scale)
    check_limit(priced, check.limit, check.limit_source)
    return priced


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """For a tensor with several names (tied weights), the other names: files keep only one of them."""
    by_id: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                by_id.setdefault(id(t), []).append(f"{prefix}.{name}" if prefix else name)
    return {n: [m for m in names if m != n] for names in by_id.values() if len(names) > 1 for n in names}
