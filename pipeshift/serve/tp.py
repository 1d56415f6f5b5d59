"""Serving a tensor-parallel stage: its TP group computes every batch together.

The stage's Linear/Embedding layers are sharded as in training (:mod:`pipeshift.runtime.tp`:
DTensor's ``parallelize_module`` over the group's mesh, so each rank holds ``1/t`` of them and
the pairs all-reduce inside the forward). Only the group's first rank (its leader) talks to the
front end and to other stages, so a batch's inputs cross into the group once; the leader then
broadcasts what it received — the same header-and-payload message the wire carries
(:mod:`pipeshift.serve.wire`), because every batch has its own shapes — and the group runs the
forward in lockstep. The stage's outputs are whole tensors on every rank (row-parallel layers
end in an all-reduce); the leader sends them on, the others drop theirs.

A batch the leader got as a skip is broadcast as that skip, so no rank of the group waits in a
collective the others never enter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeshift.runtime.comm import PeerError
from pipeshift.runtime.tp import TensorParallel, make_tp_groups
from pipeshift.serve import wire


def tp_group(stage_ranks: Sequence[Sequence[int]], degrees: Mapping[int, int], rank: int, device: torch.device,
             timeout_s: float) -> TensorParallel | None:
    """Every stage's TP groups (every rank calls this, in one order); this rank's, or None."""
    per_stage = [degrees.get(s, 1) for s in range(len(stage_ranks))]
    return make_tp_groups(stage_ranks, per_stage, rank, device, timedelta(seconds=timeout_s))


class GroupInputs:
    """The leader's received inputs of a batch, on every rank of the TP group."""

    def __init__(self, tp: TensorParallel, timeout_s: float, who: Callable[[int], str]):
        self.tp = tp
        self.timeout_s = timeout_s
        self.who = who

    def _broadcast(self, t: torch.Tensor, doing: str) -> None:
        try:
            work: Any = dist.broadcast(t, self.tp.leader, group=self.tp.group, async_op=True)
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except (RuntimeError, TimeoutError, dist.DistBackendError) as e:
            text = " ".join(str(e).split())[:200]
            raise PeerError(f"{self.who(self.tp.rank)}: {doing} in its TP group {self.tp.ranks} failed "
                            f"({text})") from None

    def share(self, batch: int, names: Sequence[str], env: dict[str, torch.Tensor], skip: str | None
              ) -> str | None:
        """Fill ``env`` with ``names`` from the leader (the leader's own ``env`` is the source).

        Returns the batch's skip reason (the leader's), or None when the group computes it.
        """
        doing = f"sharing the inputs of batch {batch}"
        if self.tp.is_leader:
            msg = (wire.Message(wire.SKIP, batch, text=skip) if skip is not None
                   else wire.Message(wire.DATA, batch, [env[n] for n in names]))
            header, payload = wire.encode(msg)
            self._broadcast(header, doing)
            if payload is not None:
                self._broadcast(payload, doing)
            return skip
        header = torch.empty(wire.HEADER_LEN, dtype=torch.int64)
        self._broadcast(header, doing)
        total, _specs, _text = wire.payload_bytes(header)
        payload = torch.empty(total, dtype=torch.uint8) if total else None
        if payload is not None:
            self._broadcast(payload, doing)
        got = wire.decode(header, payload)
        if got.batch != batch:
            raise PeerError(f"{self.who(self.tp.rank)}: its TP group's leader (rank {self.tp.leader}) shared "
                            f"batch {got.batch}, expected batch {batch}")
        if got.kind == wire.SKIP:
            return got.text
        if len(got.tensors) != len(names):
            raise PeerError(f"{self.who(self.tp.rank)}: the TP group's leader shared {len(got.tensors)} tensors "
                            f"of batch {batch}, expected {list(names)}")
        env.update(zip(names, got.tensors))
        return None
