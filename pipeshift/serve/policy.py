"""Repartitioning while serving, decided by training's policy (:class:`~pipeshift.runtime.policy.RepartitionPolicy`).

A window closes once every rank has run ``every`` batches since the last one; the measured
time of a stage is the forward seconds per batch its ranks report in their pongs (the mean over
replicas), which includes an emulated slowdown. As in training, the first window is warm-up
and the second fixes one common factor from profiled to measured times; from then on the policy
judges each window (hysteresis, gain against migration cost, the straight-pipeline DP) and a
verdict to repartition becomes a plan the front end switches to between batches.

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


def serving_chain(graph_path: Path):
    from pipeshift.graph.graphtxt import read_graph_txt
    from pipeshift.runtime.policy import chain_from_graph

    graph = read_graph_txt(graph_path)
    chain = chain_from_graph(graph, optimizer="sgd")
    forward = np.array([graph[n].forward_ms / 1e3 for n in chain.node_ids])
    return dataclasses.replace(chain, node_times_s=forward)


class ServePolicy:
    def __init__(self, plan: dict[str, Any], chain, config, every: int, log_path: Path | None = None):
        from pipeshift.runtime.policy import RepartitionPolicy

        self.plan = plan
        self.chain = chain
        self.every = every
        self.policy = RepartitionPolicy(chain, plan, config)
        self.windows = 0
        self._last: dict[int, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self.log_path = log_path

    def _log(self, record: dict[str, Any]) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def observe(self, rank_info: dict[int, dict[str, Any]], stage_ranks: Sequence[Sequence[int]],
                batches: int) -> dict[str, Any] | None:
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
            self.windows += 1
            if self.windows == 1:
                self._log({"event": "policy_warmup", "batches": batches, "measured_s": measured})
                return None
            if self.windows == 2:
                from pipeshift.runtime.policy import stage_compute_s

                profiled = stage_compute_s(self.policy.chain, self.policy.assignment, self.policy.num_stages)
                factor = float(np.sum(measured) / max(float(np.sum(profiled)), 1e-12))
                self.policy.adopt(self.policy.stages, np.full(self.policy.num_stages, factor))
                self._log({"event": "policy_calibrated", "batches": batches, "measured_s": measured,
                           "profiled_s": profiled.tolist(), "factor": factor})
                return None
            decision = self.policy.observe(measured, step=batches)
            self._log(decision.to_json())
            if not decision.repartition:
                return None
            from pipeshift.runtime.policy import replace_stages

            self.plan = replace_stages(self.plan, decision.new_stages, decision.new_predicted_s, self.chain.node_fqns)
            print(f"pipeshift serve: policy: {decision.reason} (measured {['%.4g' % m for m in measured]} s "
                  f"per batch per stage)", file=sys.stderr, flush=True)
            return self.plan

    def adopted(self, plan: dict[str, Any]) -> None:
        """Another switch (forced or an operator's) happened: judge the new split from now on."""
        with self._lock:
            if plan is self.plan:
                return
            try:
                self.policy.adopt(plan, self.policy.expected_speed)
            except PipeshiftError:  # another number of stages: start from equal speeds
                self.policy.adopt(plan)
            self.policy.cooldown_left = self.policy.config.cooldown_windows
            self.plan = plan
