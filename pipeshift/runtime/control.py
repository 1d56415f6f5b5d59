"""The runtime's side of the control plane: what a rank says to a master, and hears from it.

The runtime depends on this protocol only; :mod:`pipeshift.launch.client` implements it over the
network (authentication, reconnection, heartbeats), and the ``train`` command
(:mod:`pipeshift.launch.train`) hands a connector to the runtime. So the runtime never imports
launch, and a test or another front end can drive a rank with any object that has these methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol


class ControlPlane(Protocol):
    """One rank's connection to the master. Every call may fail with a ``PipeshiftError``."""

    def report(self, step: int, stage_times: dict[Any, dict[str, float]], window_steps: int | None = None,
               total_steps: int | None = None) -> int | None:
        """Per-stage mean times per minibatch over the last window; returns how many commands wait."""
        ...

    def poll(self) -> Mapping[str, Any] | None:
        """The next command for this rank (``{"type": "repartition", "plan": …, "at_step": N}``, …) or None."""
        ...

    def ack(self, command_id: int, status: str = "applied") -> None:
        """Say what became of a command (``applied``, ``rejected``)."""
        ...

    def announce_plan(self, plan: dict[str, Any], step: int | None = None, pause_s: float | None = None) -> None:
        """The plan the job runs now (after a switch or a restart), so the master's policy follows it.

        ``pause_s``: what the switch that put it in force cost (the slowest rank's pause), so the
        master's policy weighs later switches against a measured pause as rank 0's does.
        """
        ...

    def close(self) -> None:
        ...


# (rank, stage) -> a connected control plane; raises PipeshiftError when it cannot be had at all
Connect = Callable[[int, int], ControlPlane]
