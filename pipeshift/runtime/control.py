"""The runtime's side of the control plane: what a rank says to a master, and hears from it.

The runtime depends on this protocol only; :mod:`pipeshift.launch.client` implements it over the
network (authentication, reconnection, heartbeats), and the ``train`` command
(:mod:`pipeshift.launch.train`) hands a connector to the runtime. So the runtime never imports
launch, and a test or another front end can drive a rank with any object that has these methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan, parse_plan

MAX_WORLD_SIZE = 1 << 16  # a resize beyond this is refused whatever the master let through
COMMANDS = ("repartition", "resize")


@dataclasses.dataclass(frozen=True)
class Command:
    """An order for the job (an operator's or the master's policy), checked when it arrived.

    A command that is not well-formed still arrives, with ``error`` saying what is wrong: the job
    acknowledges it as rejected and logs it, so the operator learns why, and nothing is applied.
    """

    id: int | None
    type: str  # "repartition" or "resize"
    at_step: int | None  # a repartition's: the step it switches after; a resize's: the tick it stops at
    source: str  # who asked ("operator", "policy")
    plan: Plan | None = None  # a repartition's
    world_size: int | None = None  # a resize's
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source} command #{self.id}"


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def parse_command(message: Mapping[str, Any]) -> Command:
    """A command message from the master as a :class:`Command` (``error`` set when it is malformed)."""
    cid = message.get("id")
    cid = cid if _whole(cid, 0, 1 << 62) else None
    source = message.get("source")
    source = source[:100] if isinstance(source, str) and source else "operator"
    kind = message.get("type")
    at = message.get("at_step")
    base = Command(cid, kind if kind in COMMANDS else str(kind)[:40], at if _whole(at, 0, 1 << 62) else None, source)
    where = base.where
    if kind not in COMMANDS:
        return dataclasses.replace(base, error=f"unknown command type {str(kind)[:40]!r}")
    if at is not None and base.at_step is None:
        return dataclasses.replace(base, error=f"at_step must be a step number, got {str(at)[:40]}")
    if kind == "resize":
        size = message.get("world_size")
        if not _whole(size, 1, MAX_WORLD_SIZE):
            return dataclasses.replace(base, error=f"world_size must be 1..{MAX_WORLD_SIZE}, got {str(size)[:40]}")
        return dataclasses.replace(base, world_size=size)
    try:
        return dataclasses.replace(base, plan=parse_plan(message.get("plan"), where))
    except PipeshiftError as e:
        return dataclasses.replace(base, error=str(e))


class ControlPlane(Protocol):
    """One rank's connection to the master. Every call may fail with a ``PipeshiftError``."""

    def report(self, step: int, stage_times: dict[Any, dict[str, float]], window_steps: int | None = None,
               total_steps: int | None = None) -> int | None:
        """Per-stage mean times per minibatch over the last window; returns how many commands wait."""
        ...

    def poll(self) -> Command | None:
        """The next command for this rank, or None."""
        ...

    def ack(self, command_id: int, status: str = "applied") -> None:
        """Say what became of a command (``applied``, ``rejected``)."""
        ...

    def announce_plan(self, plan: Plan, step: int | None = None, pause_s: float | None = None) -> None:
        """The plan the job runs now (after a switch or a restart), so the master's policy follows it.

        ``pause_s``: what the switch that put it in force cost (the slowest rank's pause), so the
        master's policy weighs later switches against a measured pause as rank 0's does.
        """
        ...

    def close(self) -> None:
        ...


# (rank, stage) -> a connected control plane; raises PipeshiftError when it cannot be had at all
Connect = Callable[[int, int], ControlPlane]
