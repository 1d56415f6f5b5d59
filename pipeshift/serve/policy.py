"""Repartitioning while serving, decided by training's policy (:class:`~pipeshift.runtime.policy.RepartitionPolicy`).

A window closes once every rank has run ``every`` batches since the last one; the measured
time of a stage is the forward seconds per batch its ranks report in their pongs (the mean over
replicas), which includes an emulated slowdown. The windows go to the same
:class:`~pipeshift.runtime.policy_driver.PolicyDriver` as training's (warm-up, one calibration
factor, then the policy's hysteresis and gain against the pause), and a verdict to repartition
becomes a plan the front end switches to between batches.

The policy's view of the model is the profiled graph with forward times only (serving runs no
backward) and weights without optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan


def serving_chain(graph_path: Path):
    from pipeshift.graph.graphtxt import read_graph_txt
    from pipeshift.runtime.policy import chain_from_graph

    graph = read_graph_txt(graph_path)
    chain = chain_from_graph(graph, optimizer="sgd")
    forward = np.array([graph[n].forward_ms / 1e3 for n in chain.node_ids])
    return dataclasses.replace(chain, node_times_s=forward)


class ServePolicy:
    """Serving windows from the ranks' counters, judged by training's :class:`PolicyDriver`."""

    def __init__(self, plan: Plan, chain, config, every: int, log_path: Path | None = None):
        from pipeshift.runtime.policy_driver import PolicyDriver

        self.driver = PolicyDriver(plan, chain, config)
        self.every = every
        self._last: dict[int, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self.log_path = log_path

    @property
    def plan(self) -> Plan:
        return self.driver.plan

    def observe(self, rank_info: dict[int, dict[str, Any]], stage_ranks: Sequence[Sequence[int]],
                batches: int) -> Plan | None:
        """One look at the ranks' counters; a new plan when the policy decides to repartition."""
        with self._lock:
            measured = []
            for ranks in stage_ranks:
                per_rank = []
                for r in ranks:
                    info = rank_info.get(r)
                    if info is None:
                        return None
                    compute, done = self._last.get(r, (0.0, 0))
                    if info["batches"] - done < self.every:
                        return None  # the window is not complete yet
                    per_rank.append((info["compute_s"] - compute) / (info["batches"] - done))
                measured.append(float(np.mean(per_rank)))
            self._last = {r: (float(i["compute_s"]), int(i["batches"])) for r, i in rank_info.items()}
            decision, plan = self.driver.observe(measured, step=batches, remaining_steps=None)
            if self.log_path is not None:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(decision.to_json(), default=float) + "\n")
            if plan is not None:
                print(f"pipeshift serve: policy: {decision.reason} (measured {['%.4g' % m for m in measured]} s "
                      f"per batch per stage)", file=sys.stderr, flush=True)
            return plan

    def adopted(self, plan: Plan, pause_s: float) -> None:
        """A switch happened (the policy's own, forced or an operator's): judge the new split from now on."""
        with self._lock:
            self.driver.record_pause(pause_s)
            if plan is not self.driver.plan:
                try:
                    self.driver.adopt_plan(plan)
                except PipeshiftError:  # a plan over another graph: the policy cannot judge it
                    pass
