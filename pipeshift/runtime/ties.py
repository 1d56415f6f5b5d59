"""Tied parameters across stages: one logical parameter, a copy on every stage that holds it.

GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``; split across stages, each process holds
its own copy. As Megatron does for embeddings, every holder sums its gradient with the others'
in a small process group per tie (all the ranks of all the stages holding it) before the
optimizer step, so the copies receive the same update and stay equal — and with the same
optimizer, the same optimizer state. At start-up the first holder broadcasts its value, so the
copies start equal however each rank created its stage's parameters.

A tie is ``{fqn: [stages holding it under that name]}`` (conf.json's ``tied_parameters``, found
at capture by tensor identity: :func:`pipeshift.codegen.partition.find_ties`). Checkpoints store
a tied parameter once, under its *canonical* name — the first FQN of the first stage holding
it — and the other names point to that tensor when the state_dict is re-assembled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeshift.errors import InputFileError, PipeshiftError

Tie = dict[str, list[int]]


def parse_ties(data: Any, path: Any, num_stages: int) -> list[Tie]:
    """conf.json's ``tied_parameters``: a list of ``{fqn: [stage, …]}`` over at least two stages."""
    if data is None:
        return []
    bad = InputFileError(path, None, "'tied_parameters' must be a list of objects {\"fqn\": [stages], …} "
                                     "covering at least two stages")
    if not isinstance(data, list):
        raise bad
    ties: list[Tie] = []
    for tie in data:
        if not isinstance(tie, dict) or not tie:
            raise bad
        for fqn, stages in tie.items():
            if not isinstance(fqn, str) or not fqn or not isinstance(stages, list) or not stages or not all(
                    isinstance(s, int) and not isinstance(s, bool) and 0 <= s < num_stages for s in stages):
                raise InputFileError(path, None, f"tied_parameters entry {fqn!r:.80}: expected a list of stage "
                                                 f"numbers below {num_stages}, got {stages!r:.80}")
        if len({s for stages in tie.values() for s in stages}) < 2:
            raise bad
        ties.append({fqn: sorted(set(stages)) for fqn, stages in tie.items()})
    return ties


def canonical(tie: Mapping[str, Sequence[int]]) -> tuple[str, int]:
    """The name a checkpoint stores the tie under, and the stage that stores it."""
    first = min(min(stages) for stages in tie.values())
    return next(fqn for fqn, stages in tie.items() if first in stages), first


def aliases(ties: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, str]:
    """Every non-canonical FQN of a tie → its canonical FQN."""
    out: dict[str, str] = {}
    for tie in ties:
        name, _ = canonical(tie)
        out.update({fqn: name for fqn in tie if fqn != name})
    return out


def skipped_keys(ties: Iterable[Mapping[str, Sequence[int]]], stage: int) -> set[str]:
    """FQNs stage ``stage`` leaves out of its checkpoint (another stage stores that tensor)."""
    out: set[str] = set()
    for tie in ties:
        name, first = canonical(tie)
        out |= {fqn for fqn, stages in tie.items() if stage in stages and (fqn, stage) != (name, first)}
    return out


class TieSync:
    """This rank's share of every tie: the process groups (all ranks create each, in order) and
    the parameters of its stage in each."""

    def __init__(self, ties: Sequence[Mapping[str, Sequence[int]]], stage_ranks: Sequence[Sequence[int]],
                 stage_id: int, params: Mapping[str, torch.nn.Parameter], comm: Any, timeout_s: float):
        self.ties = [dict(t) for t in ties]
        self.comm = comm
        self.mine: list[tuple[Any, list[int], list[torch.nn.Parameter]]] = []
        for tie in self.ties:
            stages = sorted({s for held in tie.values() for s in held})
            if any(s >= len(stage_ranks) for s in stages):
                raise PipeshiftError(f"tied parameter {next(iter(tie))!r} names stage {max(stages)}, but the "
                                     f"partition has {len(stage_ranks)} stages")
            ranks = sorted(r for s in stages for r in stage_ranks[s])
            group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s)) if dist.is_initialized() else None
            if stage_id not in stages:
                continue
            found: list[torch.nn.Parameter] = []
            names = [fqn for fqn, held in tie.items() if stage_id in held]
            for fqn in names:
                # a stage lists a tensor once, under its first name: T5's encoder and decoder
                # embeddings on one stage are one entry, the other name its alias
                if fqn in params and all(params[fqn] is not p for p in found):
                    found.append(params[fqn])
            if not found:
                raise PipeshiftError(f"stage {stage_id} should hold the tied parameter {names[0]!r}, but its "
                                     "modules have no parameter of that name")
            if len(found) > 1:
                raise PipeshiftError(f"stage {stage_id} holds the tied parameter {next(iter(tie))!r} as "
                                     f"{len(found)} different tensors")
            if group is None:
                raise PipeshiftError("tied parameters across stages need torch.distributed to be initialised")
            self.mine.append((group, ranks, found))

    @property
    def tied(self) -> set[int]:
        """``id()`` of this stage's tied parameters (summed by their tie, not by the replica group)."""
        return {id(p) for _, _, ps in self.mine for p in ps}

    def broadcast_values(self) -> None:
        """Make every copy equal to the first holder's (start-up, and after a repartition)."""
        for group, ranks, params in self.mine:
            with torch.no_grad():
                for p in params:
                    self.comm.broadcast(p.data, ranks[0], group,
                                               f"starting the copies of a tied parameter (ranks {ranks}) equal")

    def all_reduce_grads(self) -> None:
        """Sum every tied parameter's gradient over all its holders (before the step)."""
        for group, ranks, params in self.mine:
            grads = []
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            self.comm.all_reduce(grads, group, f"summing the gradients of a tied parameter over ranks {ranks}")
