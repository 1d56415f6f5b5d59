"""Pipeline schedules, once: the registry, the per-rank action lists, and their checks.

* :mod:`~pipeshift.schedule.registry` — the schedules and the facts about each (synchronous or
  not, when the optimizer steps, which weights a pass uses, what microbatch counts they need);
* :mod:`~pipeshift.schedule.order` — a stage's forward/backward/step order, and a replica's part;
* :mod:`~pipeshift.schedule.actions` — lowered to one rank's actions (receives, compute, sends,
  all-reduce, step, flush) with weight versions: the list the runtime executes and the simulator
  replays;
* :mod:`~pipeshift.schedule.check` — the replay that proves a pipeline's lists deadlock-free and
  consistent with the cost model, run at start-up.

Nothing here imports torch or numpy: the planner and the simulator use it as cheaply as the runtime.
"""

from pipeshift.schedule.registry import ASYNCHRONOUS, KINDS, SCHEDULES, SYNCHRONOUS, ScheduleKind, schedule_kind

__all__ = ["ASYNCHRONOUS", "KINDS", "SCHEDULES", "SYNCHRONOUS", "ScheduleKind", "schedule_kind"]
