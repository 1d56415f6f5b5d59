"""One driver for the repartitioning policy, wherever it runs: rank 0 in-process, or the master.

Both places see the same thing — per-stage compute seconds per minibatch, one window at a time —
and must judge it the same way, so both go through :class:`PolicyDriver`:

1. **warm-up**: the first ``warmup_windows`` windows are not judged (first-step allocation,
   caches, the thread pool starting);
2. **calibration**: the next window fixes the profile-to-runtime scale, one factor for all stages
   (measured times include what the profile does not: M microbatches, the runtime's own
   overhead). Without it every stage deviates from the raw profile by the same large factor and
   the policy sees "imbalance 13" before anything slowed down. A stage slow from the start still
   stands out against the others;
3. then every window goes to :class:`~pipeshift.runtime.policy.RepartitionPolicy` (hysteresis,
   the gain's confidence bound over the streak, the remaining steps against the pause), and a
   switch comes back as the new plan.json.

The master feeds it per-rank reports (:meth:`on_report` averages a stage's replicas and waits
until every stage has reported); rank 0 feeds it the gathered stage times (:meth:`observe`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan
from pipeshift.runtime.policy import (
    Chain,
    Decision,
    PolicyConfig,
    RepartitionPolicy,
    Replanner,
    replace_stages,
    stage_compute_s,
    stages_of,
)


class PolicyDriver:
    """Warm-up, calibration and the policy's verdicts for one job (see the module docstring)."""

    def __init__(
        self, plan: Plan, chain: Chain, config: PolicyConfig | None = None,
        total_steps: int | None = None, replan: Replanner | None = None,
    ) -> None:
        self.plan = plan
        self.chain = chain
        self.total_steps = total_steps
        self.policy = RepartitionPolicy(chain, plan, config, replan)
        self.warmup_left = self.policy.config.warmup_windows
        self.scale: float | None = None  # measured / profiled, once calibrated
        self._pending: dict[int, dict[int, float]] = {}
        self.last_decision: Decision | None = None

    @property
    def config(self) -> PolicyConfig:
        return self.policy.config

    def adopt_plan(self, plan: Plan) -> None:
        """The job switched to ``plan`` (an operator's or a forced one): judge it from now on."""
        self.policy.adopt(plan)  # raises if the plan does not cover the graph; workers keep their speeds
        self.policy.cooldown_left = self.policy.config.cooldown_windows  # the switch disturbs timings
        self.plan = plan
        self._pending.clear()

    def check_plan(self, plan: Plan) -> None:
        self.chain.assignment(stages_of(plan))

    def record_pause(self, seconds: float) -> None:
        self.policy.record_pause(seconds)

    def observe(self, measured: list[float], step: int | None,
                remaining_steps: int | None) -> tuple[Decision, Plan | None]:
        """Judge one window of per-stage compute seconds; the decision and the new plan, if any."""
        policy = self.policy
        values = np.asarray(measured, dtype=float)
        if values.shape != (policy.num_stages,) or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise PipeshiftError(f"policy: need {policy.num_stages} finite non-negative stage times, got {measured}")
        profiled = stage_compute_s(self.chain, policy.assignment, policy.num_stages)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            decision = self._note("policy_warmup", "warm-up window (not judged)", step, values, profiled)
        elif self.scale is None:
            self.scale = float(values.sum() / max(float(profiled.sum()), 1e-12))
            policy.adopt(policy.stages, np.full(policy.num_stages, self.scale))
            decision = self._note("policy_calibrated", f"measured / profiled = {self.scale:.4g} for every stage",
                                  step, values, profiled)
        else:
            decision = policy.observe(values, step=step, remaining_steps=remaining_steps)
        self.last_decision = decision
        if not decision.repartition or decision.new_stages is None:
            return decision, None
        self.plan = replace_stages(self.plan, decision.new_stages, decision.new_predicted_s, self.chain.node_fqns)
        return decision, self.plan

    def _note(self, event: str, reason: str, step: int | None, measured: np.ndarray, profiled: np.ndarray) -> Decision:
        p = self.policy
        return Decision(window=p.window, step=step, repartition=False, reason=reason, imbalance=0.0, streak=0,
                        measured_s=measured.tolist(), expected_s=profiled.tolist(),
                        speed_factors=p.expected_speed.tolist(), event=event)

    def on_report(self, rank: int, step: int, stage_times: dict[int, dict[str, float]],
                  total_steps: int | None) -> tuple[Decision, Plan | None] | None:
        """Record one rank's report; when every stage has reported, judge the window."""
        if total_steps is not None:
            self.total_steps = total_steps
        num_stages = self.policy.num_stages
        for stage, times in stage_times.items():
            if 0 <= stage < num_stages:
                self._pending.setdefault(stage, {})[rank] = times["compute_s"]
        if len(self._pending) < num_stages:
            return None
        measured = [sum(by_rank.values()) / len(by_rank) for _, by_rank in sorted(self._pending.items())]
        self._pending.clear()
        remaining = None if self.total_steps is None else max(self.total_steps - step, 0)
        return self.observe(measured, step, remaining)

    def summary(self) -> dict[str, Any]:
        d = self.last_decision
        return {
            "window": self.policy.window,
            "streak": self.policy.streak,
            "cooldown_left": self.policy.cooldown_left,
            "num_stages": self.policy.num_stages,
            "calibration": self.scale,
            "last_decision": None if d is None else {
                "window": d.window, "step": d.step, "repartition": d.repartition, "reason": d.reason,
                "imbalance": d.imbalance, "speed_factors": d.speed_factors, "event": d.event,
            },
        }
