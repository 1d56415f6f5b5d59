"""The order of a stage's work: forward (``F``) and backward (``B``) passes, and optimizer steps.

A schedule is, for every stage, the order of its passes over the microbatches; keeping it as
plain data lets the simulator (:mod:`pipeshift.optimizer.simulator`) and the runtime execute the
very same lists (lowered to per-rank actions by :mod:`pipeshift.schedule.actions`), so a
predicted timeline and a measured one differ only in the durations.

``schedule_actions(kind, num_stages, stage, microbatches)`` returns the passes:

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

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from pipeshift.schedule.registry import schedule_kind


class Pass(NamedTuple):
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
) -> list[Pass]:
    """The ordered actions of ``stage`` (0-based) for microbatches ``0 … microbatches-1``.

    ``warmup`` (1F1B-style schedules) defaults to ``num_stages - stage - 1``; pass
    :func:`stage_warmup` for pipelines with replicated stages.
    """
    spec = schedule_kind(kind, training=True)
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not in 0..{num_stages - 1}")
    if microbatches < 1:
        raise ValueError("need at least one microbatch")
    if num_replicas < 1 or not 0 <= replica < num_replicas:
        raise ValueError(f"replica {replica} is not in 0..{num_replicas - 1}")
    M = microbatches
    if spec.order == "gpipe":
        order = [Pass("F", i) for i in range(M)] + [Pass("B", i) for i in range(M)]
    else:
        if warmup is not None and warmup < 0:
            raise ValueError("warmup must be >= 0")
        warm = min(num_stages - stage - 1 if warmup is None else warmup, M)
        order = [Pass("F", i) for i in range(warm)]
        for i in range(M - warm):
            order.append(Pass("F", warm + i))
            order.append(Pass("B", i))
        order += [Pass("B", i) for i in range(M - warm, M)]
    if num_replicas > 1:
        order = [a for a in order if a.microbatch % num_replicas == replica]
    return order


def max_in_flight(actions: Sequence[Pass]) -> int:
    """Most microbatches whose forward has run and backward has not, along the list."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


@dataclasses.dataclass(frozen=True)
class Work:
    """One entry of a stage-level order: ``F``/``B`` of a microbatch, or ``S`` (optimizer step).

    A step carries ``grads``: how many stage-level backwards its gradient sums (the divisor
    that turns the sum into a mean), and ``minibatch_end``: whether it closes a minibatch (the
    LR scheduler and the metrics advance there).
    """

    op: str
    mb: int = -1
    grads: int = 0
    minibatch_end: bool = False

    def __str__(self) -> str:
        return f"{self.op}{self.mb}" if self.op in "FB" else "S"


def in_flight(stage_replicas: Sequence[int], stage: int) -> int:
    """Microbatches a 1F1B stage holds in steady state (over all its replicas): its warm-up + 1.

    The warm-up is :func:`stage_warmup`: one
    forward for every worker from this stage to the end, minus one — ``num_stages - stage - 1``
    without replicas. It never grows downstream, which keeps 1F1B deadlock-free.
    """
    return stage_warmup(list(stage_replicas), stage) + 1


def compute_order(kind: str, num_stages: int, stage: int, microbatches: int, *,
                  replicas: int = 1, minibatches: int = 1,
                  stage_replicas: Sequence[int] | None = None) -> list[Work]:
    """Stage-level order of one *segment*: ``minibatches`` minibatches of ``microbatches`` each.

    The forward/backward order is :func:`schedule_actions`'s; this adds the optimizer steps. Synchronous schedules (``flush``,
    ``gpipe``) repeat their per-minibatch order; asynchronous ones (``1f1b``, ``2bw``) run 1F1B
    continuously over the whole segment, which ends with the pipeline drained (a
    synchronisation point: checkpoints, evaluation, repartitioning). ``stage_replicas`` (every
    stage's replica count) sizes the warm-up; default: no other stage is replicated.
    """
    spec = schedule_kind(kind, training=True)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} outside 0..{num_stages - 1}")
    if stage_replicas is None:
        stage_replicas = [1] * num_stages
        stage_replicas[stage] = replicas
    warmup = stage_warmup(list(stage_replicas), stage)
    m = microbatches
    if spec.synchronous:
        body = [Work(a.kind, a.microbatch) for a in schedule_actions(kind, num_stages, stage, m, warmup=warmup)]
        order: list[Work] = []
        for b in range(minibatches):
            order += [Work(w.op, w.mb + b * m) for w in body]
            order.append(Work("S", grads=m, minibatch_end=True))
        return order
    total = m * minibatches
    group = replicas if spec.step_every == "replica_group" else m
    order = []
    done = 0
    for a in schedule_actions(kind, num_stages, stage, total, warmup=warmup):
        order.append(Work(a.kind, a.microbatch))
        if a.kind == "B":
            done += 1
            if done % group == 0:
                order.append(Work("S", grads=group, minibatch_end=done % m == 0))
    return order


def for_replica(order: Sequence[Work], replicas: int, replica: int) -> list[Work]:
    """The part of a stage-level order that replica ``replica`` of ``replicas`` runs."""
    return [w for w in order if w.op == "S" or w.mb % replicas == replica]
