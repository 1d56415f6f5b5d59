"""The pipeline schedules pipeshift knows, and the facts about each that every layer uses.

The planner's cost model (how much of a stage's work one replica does, how often gradients are
all-reduced, how many microbatches and weight versions a worker holds), the simulator and the
runtime all ask this table, so a schedule is described once. The action lists themselves are
built by :mod:`pipeshift.schedule.order` and :mod:`pipeshift.schedule.actions` from these fields,
and :mod:`pipeshift.schedule.check` verifies that the lists keep the promises made here.
"""

from __future__ import annotations

import dataclasses

from pipeshift.errors import PipeshiftError


@dataclasses.dataclass(frozen=True)
class ScheduleKind:
    """One schedule.

    ``synchronous``: one optimizer step per minibatch with the pipeline drained between
    minibatches (weights after N steps equal gradient accumulation); otherwise the stream of
    microbatches never stops for a step. ``order``: ``"gpipe"`` (all forwards, then all
    backwards) or ``"1f1b"`` (warm-up forwards, then one forward / one backward). ``step_every``:
    ``"minibatch"`` (one step per M microbatches) or ``"replica_group"`` (one step after every
    backward of each replica: PipeDream's 1F1B). ``weights``: ``"live"`` (every pass on the
    current weights), ``"stashed"`` (a microbatch's backward uses the weights its forward used,
    one stash per microbatch in flight) or ``"double"`` (two versions, updates delayed by one
    minibatch: PipeDream-2BW). ``microbatches_at_least_stages``: the schedule needs M >= the
    number of stages (2BW: the version a minibatch needs must exist when it starts).
    ``backward``: ``False`` for serving (``pipeshift plan --objective serve``): forward passes
    only, no gradients, no optimizer state, replicas never synchronise; it is not a training
    schedule (its pipeline is :mod:`pipeshift.serve`'s).
    """

    name: str
    synchronous: bool
    order: str
    step_every: str
    weights: str
    microbatches_at_least_stages: bool
    summary: str
    backward: bool = True


KINDS: dict[str, ScheduleKind] = {k.name: k for k in (
    ScheduleKind("1f1b", synchronous=False, order="1f1b", step_every="replica_group", weights="stashed",
                 microbatches_at_least_stages=False,
                 summary="PipeDream: asynchronous 1F1B with weight stashing"),
    ScheduleKind("flush", synchronous=True, order="1f1b", step_every="minibatch", weights="live",
                 microbatches_at_least_stages=False,
                 summary="PipeDream-Flush: 1F1B within a minibatch, then a flush and one step"),
    ScheduleKind("gpipe", synchronous=True, order="gpipe", step_every="minibatch", weights="live",
                 microbatches_at_least_stages=False,
                 summary="GPipe: all forwards, all backwards, one step"),
    ScheduleKind("2bw", synchronous=False, order="1f1b", step_every="minibatch", weights="double",
                 microbatches_at_least_stages=True,
                 summary="PipeDream-2BW: continuous 1F1B, two weight versions, one step per minibatch"),
    ScheduleKind("serve", synchronous=False, order="forward", step_every="never", weights="live",
                 microbatches_at_least_stages=False, backward=False,
                 summary="serving: forward passes only, a continuous stream of batches"),
)}
# the training schedules (``--schedule`` of plan, simulate and train)
SCHEDULES: tuple[str, ...] = tuple(k for k, v in KINDS.items() if v.backward)
SYNCHRONOUS: tuple[str, ...] = tuple(k for k in SCHEDULES if KINDS[k].synchronous)
ASYNCHRONOUS: tuple[str, ...] = tuple(k for k in SCHEDULES if not KINDS[k].synchronous)


def schedule_kind(name: str, training: bool = False) -> ScheduleKind:
    """The schedule called ``name`` (a training one if ``training``); else a one-line error listing them."""
    known = SCHEDULES if training else tuple(KINDS)
    if name not in known:
        raise PipeshiftError(f"unknown schedule {name!r}: one of {', '.join(known)}")
    return KINDS[name]
