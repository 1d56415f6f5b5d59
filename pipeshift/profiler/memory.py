"""Bytes a node keeps alive for training: saved-for-backward tensors and optimizer state.

A pipeline stage's memory is its parameters, their gradients and optimizer state, plus — for
every microbatch in flight — what autograd saved in the forward to run the backward. The
activation a node *outputs* (graph.txt's ``activation_size``) is what crosses a stage boundary;
what it *saves* can be much more (a convolution saves its input, a softmax its output, dropout
its mask) or nothing (``view``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pipeshift.profiler.runner import GroupRunner

ADAM_STEP_BYTES = 4  # torch.optim.Adam keeps one float32 ``step`` tensor per parameter


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, storage bytes); views of one storage share the key."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse, mkldnn, ... tensors have no plain storage
        return id(t), t.numel() * t.element_size()


@dataclasses.dataclass(frozen=True)
class SavedBytes:
    """What one node's forward saved for backward, counted once per storage.

    ``total``: every storage saved, parameters and buffers excluded (they are resident anyway);
    ``from_inputs``: the part that is the storage of the node's input tensors (already counted
    as another node's output; a stage holds it once, whoever saves it).
    """

    total: int
    from_inputs: int


def saved_bytes_per_node(model: nn.Module, runner: GroupRunner, inputs: Sequence[Any]) -> list[SavedBytes]:
    """Run one forward under ``saved_tensors_hooks``, one context per node, and count storages."""
    resident = {_storage_key(t)[0] for t in [*model.parameters(), *model.buffers()]}
    env: dict[str, Any] = {}
    out: list[SavedBytes] = []
    for i in range(len(runner)):
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            key, nbytes = _storage_key(t)
            saved[key] = nbytes
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            runner.run_group(i, env, inputs)
        input_keys = {_storage_key(t)[0] for t in runner.input_tensors(i, env)}
        kept = {k: b for k, b in saved.items() if k not in resident}
        out.append(SavedBytes(sum(kept.values()), sum(b for k, b in kept.items() if k in input_keys)))
    return out


def trainable_tensors_of(runner: GroupRunner, index: int) -> list[torch.Tensor]:
    """The parameters node ``index`` owns (a leaf module's, or a ``get_attr`` parameter)."""
    group = runner.groups[index]
    gm = runner.captured.gm
    found: list[torch.Tensor] = []
    if group.op == "call_module":
        found = [p for p in gm.get_submodule(group.target).parameters() if p.requires_grad]
    fx = {n.name: n for n in gm.graph.nodes}
    for name in group.fx_nodes:  # the group's own get_attr, and the parameters it reads as helpers
        node = fx[name]
        if node.op == "get_attr":
            obj: Any = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor) and obj.requires_grad and all(obj is not f for f in found):
                found.append(obj)
    return found


def optimizer_state_bytes(params: Iterable[torch.Tensor]) -> dict[str, int]:
    """State torch.optim allocates for these parameters: SGD with momentum and Adam.

    SGD-momentum keeps one momentum buffer per parameter (1x its bytes); Adam keeps
    ``exp_avg`` and ``exp_avg_sq`` (2x) plus a scalar float32 ``step`` per parameter tensor.
    Gradients (another 1x, for any optimizer) are not included.
    """
    params = list(params)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    return {"sgd_momentum": nbytes, "adam": 2 * nbytes + ADAM_STEP_BYTES * len(params)}
