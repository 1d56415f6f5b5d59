"""Pipeline schedules as data: the ordered list of actions each stage (rank) performs.

A schedule is nothing but, for every stage, the order of its forward (``F``) and backward
(``B``) passes over the microbatches of a minibatch. Keeping it as plain data lets the
simulator (:mod:`pipeshift.optimizer.simulator`) and the runtime execute the very same lists,
so a predicted timeline and a measured one differ only in the durations.

``schedule_actions(kind, num_stages, stage, microbatches)`` returns that list:

* ``gpipe`` — all forwards, then all backwards (GPipe); every microbatch's activations are
  alive at once.
* ``flush`` — PipeDream-Flush (1F1B with a flush): stage s runs ``min(S-s-1, M)`` warm-up
  forwards, then alternates one forward and one backward, then drains the remaining backwards.
  Same bubble as GPipe, but at most S-s microbatches in flight.
* ``1f1b`` — PipeDream's asynchronous 1F1B: the same per-stage order, but the stream of
  microbatches never stops for an optimizer step (run it over all microbatches of a run); a
  microbatch's backward uses the weights its forward used (weight stashing).
* ``2bw`` — PipeDream-2BW: the 1F1B order over a continuous stream, with weights updated every
  M microbatches and two weight versions kept.

A replicated stage's replicas split the microbatches round-robin (``replica``,
``num_replicas``); each runs the stage's order restricted to its own microbatches. The stage's
order is built with ``warmup`` forwards (counted over all of its microbatches) before its first
backward; :func:`stage_warmup` gives the usual choice, one forward for every worker from this
stage to the end minus one — S-s-1 without replication, and enough microbatches in flight per
replica to keep a replicated stage busy. Any warm-up that does not grow along the pipeline is
deadlock-free (a stage's backward of microbatch i needs the next stage to have run forward up to
i + its own warm-up, which this stage has already sent), and restricting a runnable order to a
replica's microbatches keeps it runnable.
"""

from __future__ import annotations

from typing import NamedTuple

SCHEDULES = ("1f1b", "flush", "gpipe", "2bw")
FLUSHING = ("flush", "gpipe")  # one optimizer step per minibatch, pipeline drained between


class Action(NamedTuple):
    """One pass of one microbatch: ``kind`` is ``"F"`` (forward) or ``"B"`` (backward)."""

    kind: str
    microbatch: int


def stage_warmup(replicas: list[int], stage: int) -> int:
    """1F1B warm-up of ``stage`` when stage t has ``replicas[t]`` replicas: workers after it + its own - 1."""
    return sum(replicas[stage + 1 :]) + replicas[stage] - 1


def schedule_actions(
    kind: str,
    num_stages: int,
    stage: int,
    microbatches: int,
    *,
    replica: int = 0,
    num_replicas: int = 1,
    warmup: int | None = None,
) -> list[Action]:
    """The ordered actions of ``stage`` (0-based) for microbatches ``0 … microbatches-1``.

    ``warmup`` (1F1B-style schedules) defaults to ``num_stages - stage - 1``; pass
    :func:`stage_warmup` for pipelines with replicated stages.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in 0..{num_stages - 1}")
    if microbatches < 1:
        raise ValueError("need at least one microbatch")
    if num_replicas < 1 or not 0 <= replica < num_replicas:
        raise ValueError(f"replica {replica} is not in 0..{num_replicas - 1}")
    M = microbatches
    if kind == "gpipe":
        order = [Action("F", i) for i in range(M)] + [Action("B", i) for i in range(M)]
    else:
        if warmup is not None and warmup < 0:
            raise ValueError("warmup must be >= 0")
        warm = min(num_stages - stage - 1 if warmup is None else warmup, M)
        order = [Action("F", i) for i in range(warm)]
        for i in range(M - warm):
            order.append(Action("F", warm + i))
            order.append(Action("B", i))
        order += [Action("B", i) for i in range(M - warm, M)]
    if num_replicas > 1:
        order = [a for a in order if a.microbatch % num_replicas == replica]
    return order


def max_in_flight(actions: list[Action]) -> int:
    """Most microbatches whose forward has run and backward has not, along the list."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak
