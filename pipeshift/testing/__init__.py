"""Experiment and test hooks, installed on a rank from outside the training loop.

The runtime exposes named hook points (:class:`pipeshift.runtime.hooks.Hooks`); this package is
what may be put there: emulated slower workers (``--slowdown``, a documented experiment flag, see
:mod:`pipeshift.testing.slowdown`) and injected failures (``$PIPESHIFT_FAULT``, for the
restart tests, see :mod:`pipeshift.testing.faults`). The ``train`` command calls
:func:`install` once per rank; nothing here runs unless asked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pipeshift.runtime.hooks import Hooks
from pipeshift.testing.faults import install_faults
from pipeshift.testing.slowdown import install_slowdowns, parse_slowdowns

RESERVE_ENV = "PIPESHIFT_RESERVE"  # "0": no landing buffers reserved ahead (to measure what they save)


def install(rank: int, slowdowns: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Hooks:
    """The hooks of ``rank``: ``--slowdown`` values, and what ``$PIPESHIFT_FAULT``/``$PIPESHIFT_RESERVE`` ask for."""
    env = os.environ if environ is None else environ
    hooks = Hooks()
    install_slowdowns(hooks, parse_slowdowns(slowdowns), rank)
    install_faults(hooks, rank, env)
    hooks.reserve_landing_buffers = env.get(RESERVE_ENV, "1") != "0"
    return hooks


__all__ = ["RESERVE_ENV", "install"]
