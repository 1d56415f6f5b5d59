"""Injected failures for the restart tests: kill a rank (SIGKILL, like a lost machine) at a named point.

``$PIPESHIFT_FAULT`` is comma-separated: ``RANK@start`` kills the rank as it starts, before the
process group exists; ``RANK@migrate`` in the middle of its next migration, after posting its
sends; ``RANK@step:N`` at the synchronisation point after step N.
Faults fire only in the first attempt (``$PIPESHIFT_ATTEMPT`` unset or 0, set by the elastic
supervisor), so the restarted job runs clean.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping

from pipeshift.errors import PipeshiftError
from pipeshift.runtime.hooks import Hooks

FAULT_ENV = "PIPESHIFT_FAULT"
ATTEMPT_ENV = "PIPESHIFT_ATTEMPT"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after(step: int | None) -> Callable[[int], None]:
    """A sync-point hook that kills the rank after ``step`` (any step if ``None``)."""

    def hook(now: int) -> None:
        if step is None or now == step:
            _die()

    return hook


def install_faults(hooks: Hooks, rank: int, environ: Mapping[str, str]) -> None:
    """Add the kills ``environ`` asks of ``rank`` to its hook points."""
    spec = environ.get(FAULT_ENV, "")
    if not spec or environ.get(ATTEMPT_ENV, "0") != "0":
        return
    for part in spec.split(","):
        who, _, where = part.strip().partition("@")
        name, _, at = where.partition(":")
        if name not in ("start", "migrate", "step") or not who.isdigit() or (at and not at.isdigit()):
            raise PipeshiftError(f"${FAULT_ENV} {part!r}: expected RANK@start, RANK@migrate or RANK@step:N")
        if int(who) != rank:
            continue
        if name == "start":
            hooks.at_start.append(_die)
        elif name == "migrate":
            hooks.mid_migration.append(_die)
        else:
            hooks.at_sync_point.append(_die_after(int(at) if at else None))
