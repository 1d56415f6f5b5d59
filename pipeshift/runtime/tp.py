"""Tensor parallelism inside a stage, on PyTorch's own ``torch.distributed.tensor``.

A stage with TP degree ``t`` runs on a *TP group* of ``t`` ranks; a replicated stage has one
TP group per replica. The stage's Linear/Embedding layers named by the TP plan are sharded with
:func:`torch.distributed.tensor.parallel.parallelize_module` on a :class:`DeviceMesh` over the
group (``ColwiseParallel`` then ``RowwiseParallel``, Megatron's pairing): every rank of the
group holds ``1/t`` of those weights and the pair costs one all-reduce forward (and one
backward), done by DTensor. Every other module is replicated in the group and computes the same
values on every rank.

What crosses a stage boundary is a whole tensor, so it crosses *once per TP group*: the group's
first rank (its *leader*) receives activations and gradients from other stages and sends its
own, and broadcasts what it received to the rest of the group. Data loading on the first stage
works the same way (the leader loads and broadcasts), so a data source never needs to be
deterministic across ranks.

Gradients of sharded parameters stay sharded (DTensor ``.grad``); replicas of a TP stage
all-reduce shard-wise, rank ``i`` of each replica's group with rank ``i`` of the others
(:func:`dp_groups`). Checkpoints gather shards by FQN into the original full tensors
(:func:`full_tensors`), and loading cuts full tensors back into whatever layout this run has
(:meth:`TensorParallel.shard_state`), so a checkpoint moves between any TP degrees, stages and
rank counts.

Ranks of a stage are ordered replica-major: replica ``k`` of a stage with ``ranks`` and degree
``t`` is the TP group ``ranks[k*t:(k+1)*t]``, so a TP group takes neighbouring ranks (the same
machine, the fastest link) and replicas spread outwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.tp_plan import SHARDING_STYLES, STYLE_NAMES, summarize_plan

def is_sharding(style: str) -> bool:
    """Whether ``style`` splits the module's weights (else it is replicated in the group)."""
    return style in SHARDING_STYLES


def torch_style(name: str) -> Any:
    """The ``torch.distributed.tensor.parallel`` style for a style name (None: leave it whole)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    makers: dict[str, Callable[[], Any]] = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
        "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
        "sequence_parallel": SequenceParallel,
    }
    if name in ("replicate", "replicated_with_grad_allreduce"):
        return None
    if name not in makers:
        raise PipeshiftError(f"unknown tensor-parallel style {name!r}; known: {', '.join(STYLE_NAMES)}")
    style = makers[name]()
    style.src_data_rank = None  # every rank already holds the full weights: cut locally, send nothing
    return style


def tp_groups(ranks: Sequence[int], degree: int) -> list[list[int]]:
    """The TP groups of a stage: one per replica, neighbouring ranks."""
    if degree < 1 or len(ranks) % degree:
        raise PipeshiftError(f"a stage on ranks {list(ranks)} cannot have tensor-parallel degree {degree}: "
                             f"its {len(ranks)} ranks are not a multiple of {degree}")
    return [list(ranks[k:k + degree]) for k in range(0, len(ranks), degree)]


def dp_groups(ranks: Sequence[int], degree: int) -> list[list[int]]:
    """The data-parallel groups of a stage: rank ``i`` of every replica's TP group, for each ``i``."""
    groups = tp_groups(ranks, degree)
    return [[g[i] for g in groups] for i in range(degree)]


def make_tp_groups(stage_ranks: Sequence[Sequence[int]], degrees: Sequence[int], rank: int, device: torch.device,
                   timeout: Any) -> TensorParallel | None:
    """Create every stage's TP groups (a collective over the world: every rank calls this in one
    order) and return this rank's, or None when its stage is not tensor-parallel."""
    import torch.distributed as dist

    mine = None
    for ranks, t in zip(stage_ranks, degrees):
        if t <= 1:
            continue
        for group_ranks in tp_groups(ranks, t):
            group = dist.new_group(group_ranks, timeout=timeout)
            if rank in group_ranks:
                mine = TensorParallel(group_ranks, rank, group, device)
    return mine


def check_shardable(module: nn.Module, fqn: str, style: str, degree: int, where: str) -> None:
    """A clear error before DTensor's own, for a style that does not fit the module."""
    if not is_sharding(style) and style != "sequence_parallel":
        return
    if style == "sequence_parallel":
        return
    if isinstance(module, nn.Linear):
        dim = module.out_features if style.startswith("colwise") else module.in_features
        what = "output features" if style.startswith("colwise") else "input features"
    elif isinstance(module, nn.Embedding):
        dim = module.num_embeddings if style.startswith(("rowwise", "embedding")) else module.embedding_dim
        what = "rows" if style.startswith(("rowwise", "embedding")) else "embedding dimension"
    else:
        raise PipeshiftError(f"{where}: {fqn} is a {type(module).__name__}; {style!r} shards only Linear and "
                             "Embedding layers")
    if dim % degree:
        raise PipeshiftError(f"{where}: {fqn} ({type(module).__name__}) has {dim} {what}, which tensor-parallel "
                             f"degree {degree} does not divide ({style})")


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (the tensor itself when it is not distributed)."""
    return cast(Any, t).to_local() if _is_dtensor(t) else t


def full_tensors(obj: Any) -> Any:
    """``obj`` with every DTensor gathered into its full tensor (a collective over its mesh).

    Walks dicts, lists and tuples in their order, which is the same on every rank of a group
    (the same modules, the same optimizer), so the collectives match up.
    """
    if _is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


class TensorParallel:
    """This rank's TP group: its mesh, its leader, and sharding of a stage's modules."""

    def __init__(self, ranks: Sequence[int], rank: int, group: Any, device: torch.device):
        from torch.distributed.device_mesh import DeviceMesh

        self.ranks = list(ranks)
        self.degree = len(self.ranks)
        self.rank = rank
        self.index = self.ranks.index(rank)
        self.leader = self.ranks[0]
        self.group = group
        self.mesh = DeviceMesh.from_group(group, device.type, mesh=self.ranks)

    @property
    def is_leader(self) -> bool:
        return self.index == 0

    def shard(self, modules: Sequence[nn.Module], plan: Mapping[str, str], where: str) -> list[tuple[str, str]]:
        """Shard every module of ``plan`` (FQN -> style) found in ``modules``, in place.

        Returns the ``(fqn, style)`` pairs applied. FQNs are the original model's: the stage
        modules adopt submodules under their original names.
        """
        from torch.distributed.tensor.parallel import parallelize_module

        applied = []
        for top in modules:
            found = {name: m for name, m in top.named_modules() if name in plan}
            styles = {}
            for fqn, m in found.items():
                check_shardable(m, fqn, plan[fqn], self.degree, where)
                style = torch_style(plan[fqn])
                if style is not None:
                    styles[fqn] = style
                applied.append((fqn, plan[fqn]))
            if styles:
                parallelize_module(top, self.mesh, styles)
        return sorted(applied)

    def shard_state(self, state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Full tensors cut to the layout of ``like`` (this rank's tensors by FQN); no communication."""
        from torch.distributed.tensor import distribute_tensor

        out: dict[str, Any] = dict(state)
        for name, tensor in like.items():
            mine: Any = tensor
            if name in state and _is_dtensor(mine):
                full = state[name]
                if tuple(full.shape) != tuple(mine.shape):
                    raise PipeshiftError(f"{name}: the checkpoint holds shape {list(full.shape)} but the model "
                                         f"has {list(mine.shape)}")
                out[name] = distribute_tensor(full.to(mine.device, mine.dtype), mine.device_mesh, mine.placements,
                                              src_data_rank=None)
        return out

    def shard_optimizer_state(self, saved: Mapping[str, Any], params: Mapping[str, nn.Parameter]) -> dict[str, Any]:
        """An FQN-keyed optimizer state with the full-size entries of sharded parameters cut to shards."""
        from torch.distributed.tensor import distribute_tensor

        state = dict(saved.get("state", {}))
        for name, param in params.items():
            p: Any = param
            if name not in state or not _is_dtensor(p):
                continue
            entry = dict(state[name])
            for key, value in entry.items():
                if torch.is_tensor(value) and not _is_dtensor(value) and tuple(value.shape) == tuple(p.shape):
                    entry[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                   src_data_rank=None)
            state[name] = entry
        return {**saved, "state": state}


def describe_sharding(pipeline: Any) -> str:
    """One line: which modules this rank's stage sharded, on which TP group."""
    tp = pipeline.tp
    sharded = [(f, s) for f, s in pipeline.tp_applied if is_sharding(s)]
    head = f"stage {pipeline.stage_id} replica {pipeline.replica} runs on TP group {tp.ranks} (degree {tp.degree})"
    if not sharded:
        return head + ": the TP plan names none of its modules, so every rank computes the whole stage"
    return head + f": sharded {len(sharded)} modules: {summarize_plan(sharded)}"
