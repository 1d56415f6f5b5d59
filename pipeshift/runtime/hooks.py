"""Where an experiment or a test may act on a running rank: named, explicit hook points.

The runtime calls these points and nothing else: what runs there (killing a rank mid-migration,
emulating a slower worker, not reserving landing buffers) is installed from outside by
:mod:`pipeshift.testing`, which the ``train`` command wires in. With nothing installed each point
is an empty loop, so the training loop and the exchange carry no test logic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class Hooks:
    """The hook points of one rank.

    ``at_start()``: first thing, before the process group is formed (a rank that dies here is
    a dead child for the launcher, not a peer that left); ``on_step(step)``: at the start of a run (the step it resumes from) and after every
    minibatch; ``after_compute(seconds)``: after each forward or backward, with its duration (a
    hook that sleeps makes the pass look that much longer); ``at_sync_point(step)``: at each
    synchronisation point, after checkpointing; ``mid_migration()``: during a repartition's
    exchange, after this rank posted its sends and before it waits for its receives.
    ``reserve_landing_buffers``: whether a repartition allocates its receive buffers ahead.
    """

    at_start: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    on_step: list[Callable[[int], None]] = dataclasses.field(default_factory=list)
    after_compute: list[Callable[[float], None]] = dataclasses.field(default_factory=list)
    at_sync_point: list[Callable[[int], None]] = dataclasses.field(default_factory=list)
    mid_migration: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    reserve_landing_buffers: bool = True

    def starting(self) -> None:
        for hook in self.at_start:
            hook()

    def step(self, step: int) -> None:
        for hook in self.on_step:
            hook(step)

    def computed(self, seconds: float) -> None:
        for hook in self.after_compute:
            hook(seconds)

    def sync_point(self, step: int) -> None:
        for hook in self.at_sync_point:
            hook(step)

    def migrating(self) -> None:
        for hook in self.mid_migration:
            hook()
