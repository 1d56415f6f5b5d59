"""Clocks that mark points in a step and read the time between two marks afterwards.

The timing code marks the start and end of every node's forward and the moment each node's
backward begins, then reads all intervals once the step is over. Splitting "mark" from "read"
lets one code path serve both devices: on CPU a mark is ``time.perf_counter()`` (ops run
synchronously, so wall clock is compute time); on GPU a mark is a CUDA event recorded on the
current stream, so the interval is device time between kernels, not Python launch time, and
reading it waits for the device only once per step.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class Clock(Protocol):
    name: str

    def mark(self) -> Any: ...

    def sync(self) -> None: ...

    def ms(self, start: Any, end: Any) -> float: ...


class CpuClock:
    """Wall clock; CPU ops are synchronous, so nothing needs waiting for."""

    name = "time.perf_counter"

    def mark(self) -> float:
        return time.perf_counter()

    def sync(self) -> None:
        pass

    def ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3


class CudaClock:
    """CUDA events on the current stream of the calling thread (autograd's device thread too)."""

    name = "cuda_events"

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return float(start.elapsed_time(end))


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else CpuClock()
