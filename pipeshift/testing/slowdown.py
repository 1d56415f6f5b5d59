"""``--slowdown RANK:FACTOR[@STEP]``: emulate a slower worker, to exercise repartitioning.

From minibatch ``STEP + 1`` on, every forward and backward of rank ``RANK`` takes ``FACTOR``
times its measured time: the rank sleeps for the difference after each pass. Sleeping costs the
shared cores nothing, so on one machine a slowed rank looks, to its peers and to the policy, like
a slower machine. A later entry for the same rank replaces an earlier one from its step on
(``1:1@80`` ends a slowdown).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from pipeshift.errors import PipeshiftError
from pipeshift.runtime.hooks import Hooks


@dataclasses.dataclass(frozen=True)
class Slowdown:
    """From step ``step`` on, ``rank`` computes ``factor``× slower."""

    rank: int
    factor: float
    step: int = 0


def parse_slowdowns(values: Sequence[str]) -> list[Slowdown]:
    out = []
    for text in values or []:
        head, _, step = text.partition("@")
        rank, sep, factor = head.partition(":")
        try:
            item: Slowdown | None = Slowdown(int(rank), float(factor), int(step) if step else 0)
        except ValueError:
            item = None
        if not sep or item is None or item.rank < 0 or not item.factor >= 1.0 or item.step < 0:
            raise PipeshiftError(f"--slowdown {text!r}: expected RANK:FACTOR[@STEP] with FACTOR >= 1, e.g. 1:3@50")
        out.append(item)
    return out


def slowdown_at(slowdowns: Sequence[Slowdown], rank: int, step: int) -> float:
    """The factor for minibatch ``step + 1`` on ``rank``: the latest entry that has started."""
    factor, since = 1.0, -1
    for s in slowdowns:
        if s.rank == rank and s.step <= step and s.step >= since:
            factor, since = s.factor, s.step
    return factor


class EmulatedSlowdown:
    """The hooks of one slowed rank: the factor follows the step, each pass sleeps its share."""

    def __init__(self, slowdowns: Sequence[Slowdown], rank: int):
        self.slowdowns = [s for s in slowdowns if s.rank == rank]
        self.rank = rank
        self.factor = 1.0

    def on_step(self, step: int) -> None:
        self.factor = slowdown_at(self.slowdowns, self.rank, step)

    def after_compute(self, seconds: float) -> None:
        if self.factor > 1.0:
            time.sleep((self.factor - 1.0) * seconds)


def install_slowdowns(hooks: Hooks, slowdowns: Sequence[Slowdown], rank: int) -> None:
    mine = EmulatedSlowdown(slowdowns, rank)
    if mine.slowdowns:
        hooks.on_step.append(mine.on_step)
        hooks.after_compute.append(mine.after_compute)
