"""Experiment and test hooks are installed from outside the loop, and do what their flags say."""

from __future__ import annotations

import time

import pytest

from pipeshift.errors import PipeshiftError
from pipeshift.testing import install


def test_nothing_asked_installs_nothing() -> None:
    hooks = install(0, [], environ={})
    assert not (hooks.on_step or hooks.after_compute or hooks.at_sync_point or hooks.mid_migration)
    assert hooks.reserve_landing_buffers


def test_slowdown_follows_the_step_and_stretches_each_pass() -> None:
    hooks = install(1, ["1:3@2", "1:1@4", "0:5"], environ={})
    seen = []
    for step in range(5):
        hooks.step(step)
        t0 = time.perf_counter()
        hooks.computed(0.02)
        seen.append(time.perf_counter() - t0)
    assert max(seen[0], seen[1], seen[4]) < 0.02  # factor 1: no sleep
    assert min(seen[2], seen[3]) >= 0.04  # factor 3: sleeps twice the pass
    assert not install(2, ["1:3@2"], environ={}).after_compute  # other ranks untouched


def test_faults_and_reserve_from_the_environment() -> None:
    hooks = install(2, [], environ={"PIPESHIFT_FAULT": "1@migrate,2@step:3", "PIPESHIFT_RESERVE": "0"})
    assert len(hooks.at_sync_point) == 1 and not hooks.mid_migration and not hooks.reserve_landing_buffers
    hooks.sync_point(2)  # not the step named: the rank lives on
    restarted = install(2, [], environ={"PIPESHIFT_FAULT": "2@step:3", "PIPESHIFT_ATTEMPT": "1"})
    assert not restarted.at_sync_point  # a restarted job runs clean


@pytest.mark.parametrize("spec", ["2@nowhere", "x@migrate", "2@step:three"])
def test_bad_fault_specs_are_one_line_errors(spec: str) -> None:
    with pytest.raises(PipeshiftError, match="expected RANK@start, RANK@migrate or RANK@step:N"):
        install(2, [], environ={"PIPESHIFT_FAULT": spec})


def test_bad_slowdowns_are_one_line_errors() -> None:
    with pytest.raises(PipeshiftError, match="expected RANK:FACTOR"):
        install(0, ["1:0.5"], environ={})
