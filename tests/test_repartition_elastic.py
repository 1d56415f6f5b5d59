"""Repartitioning under failure and change: a rank killed mid-migration, a worker lost for good,
operators' commands through the master (a new plan, one more worker), and the in-process policy.

Every run goes through `pipeshift launch --local N --elastic` (the supervisor) with a hard time
limit; flush's result does not depend on the partition, so each must end with the weights of
uninterrupted single-process training on the same minibatches.
"""

from __future__ import annotations

import csv
import json
import threading

import pytest
import torch

import repartition_helpers as h
from pipeshift.cli import main
from pipeshift.launch.client import CtlClient
from pipeshift.launch.master import Master, load_policy_driver
from pipeshift.runtime.policy import PolicyConfig

pytestmark = pytest.mark.timeout(240)
SGD = ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.1"]


def sgd(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def metric_steps(workdir, rank: int = 0) -> list[int]:
    rows = csv.DictReader(open(workdir / "out" / f"rank{rank}" / "metrics.csv"))
    return [int(r["step"]) for r in rows if r["split"] == "train"]


def final_plan(workdir) -> dict:
    latest = (workdir / "ck" / "latest").read_text().strip()
    return json.loads((workdir / "ck" / latest / "plan.json").read_text())


def test_a_rank_killed_mid_migration_restarts_from_the_step_it_started_at(tmp_path):
    h.package(tmp_path, [6], [[0], [1]])
    h.plan(tmp_path, "A", [3], [[0], [1]])
    h.plan(tmp_path, "B", [9], [[0], [1]])
    steps, m = 7, 2
    rc, out = h.launch(tmp_path, 2, ["--steps", str(steps), "--microbatches", str(m), *SGD,
                                     "--repartition-at", "3:A.json", "--repartition-at", "5:B.json"],
                       environ=h.env(PIPESHIFT_FAULT="1@migrate"))
    assert rc == 0, out[-4000:]
    assert "rank 1 failed (killed by signal 9)" in out and "finished on 2 workers after 1 restart" in out
    # nothing lost, nothing done twice: the restart resumed at step 3 (checkpointed just before the migration)
    assert metric_steps(tmp_path) == list(range(1, steps + 1))
    assert [r["step"] for r in h.jsonl(tmp_path / "out" / "repartitions.jsonl")] == [3, 5]
    assert final_plan(tmp_path)["stages"][0]["nodes"] == h.NODES[:9]
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), h.reference(steps, m, sgd))


def test_the_job_shrinks_to_two_workers_when_one_dies(tmp_path):
    h.package(tmp_path, [4, 8], [[0], [1], [2]])
    steps, m = 6, 4
    rc, out = h.launch(tmp_path, 3, ["--steps", str(steps), "--microbatches", str(m), *SGD, "--checkpoint-every", "1"],
                       elastic=["--on-failure", "shrink"], environ=h.env(PIPESHIFT_FAULT="2@step:3"))
    assert rc == 0, out[-4000:]
    assert "rank 2 failed (killed by signal 9); restarting 2 workers" in out
    assert "re-planned for 2 (profiled times)" in out
    plan = final_plan(tmp_path)
    assert [st["ranks"] for st in plan["stages"]] == [[0], [1]]
    assert sorted(len(st["nodes"]) for st in plan["stages"]) in ([6, 6], [5, 7])  # eleven equal layers, balanced
    assert metric_steps(tmp_path) == list(range(1, steps + 1))
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), h.reference(steps, m, sgd))


def test_operator_repartition_and_grow_through_the_master(tmp_path):
    h.package(tmp_path, [6], [[0], [1]])
    good = h.plan(tmp_path, "A", [3], [[0], [1]])
    bad = h.plan(tmp_path, "Bad", [3, 6], [[0], [1], [2]])  # three ranks: the two-rank job must refuse it
    token = "test-token-7"
    master = Master(token, port=0, heartbeat_timeout_s=30.0)
    host, port = master.start_in_thread()
    steps, m = 60, 4  # ~0.15 s a step with the slowdowns: the commands land within the first dozen
    args = ["--steps", str(steps), "--microbatches", str(m), *SGD, "--report-every", "2",
            "--master", f"{host}:{port}", "--slowdown", "0:30", "--slowdown", "1:30", "--slowdown", "2:30"]
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(zip(("rc", "out"), h.launch(
        tmp_path, 2, args, elastic=["--max-workers", "3"], environ=h.env(PIPESHIFT_TOKEN=token), limit=300))))
    job.start()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    ctl = ["ctl", "--master", f"{host}:{port}", "--token-file", str(token_file)]
    try:
        def status():
            with CtlClient((host, port), token) as c:
                return c.status()

        h.wait_until(lambda: sum(1 for w in status()["workers"] if (w["step"] or 0) >= 2) == 2, 120)
        assert main([*ctl, "repartition", "--plan", str(bad)]) == 1  # the master checks it against the job
        assert main([*ctl, "repartition", "--plan", str(good)]) == 0
        events = tmp_path / "out" / "repartitions.jsonl"
        h.wait_until(lambda: any(r["event"] == "repartition" for r in h.jsonl(events)), 60)
        assert main([*ctl, "resize", "--workers", "3"]) == 0
        job.join(timeout=300)
        final = status()
    finally:
        job.join(timeout=5)
        master.stop()
    assert result.get("rc") == 0, result.get("out", "")[-4000:]
    log = h.jsonl(tmp_path / "out" / "repartitions.jsonl")
    kinds = [(r["event"], r.get("source", "")) for r in log]
    assert kinds[0][0] == "repartition" and "command #1" in kinds[0][1]
    assert kinds[1][0] == "resize" and "command #2" in kinds[1][1]
    assert "resize: restarting on 3 workers" in result["out"]
    acks = {c["id"]: c["acks"] for c in final["commands"]}
    assert acks[1]["0"] == "applied" and acks[2]["0"] == "applied"
    assert len(final_plan(tmp_path)["stages"]) == 3
    assert metric_steps(tmp_path) == list(range(1, steps + 1))
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), h.reference(steps, m, sgd))
    # the step the master announced is the step the ranks switched after; every rank says so itself
    announced = next(c["at_step"] for c in final["commands"] if c["id"] == 1)
    assert log[0]["step"] == announced
    for rank in (0, 1):
        assert f"pipeshift train: rank {rank}: switched after step {announced} (operator command #1)" in result["out"]
        own = h.jsonl(tmp_path / "out" / f"rank{rank}" / "repartitions.jsonl")
        assert own[0]["step"] == announced and own[0]["rank"] == rank and "bytes_sent" in own[0]


POLICY = {"persist_windows": 2, "cooldown_windows": 2, "threshold": 0.5, "clear_threshold": 0.2, "fixed_pause_s": 0.0}


@pytest.mark.parametrize("where", ["in-process", "master"])
def test_the_policy_moves_layers_off_a_slowed_worker(tmp_path, where):
    h.package(tmp_path, [6], [[0], [1]])
    steps, m = 40, 2
    args = ["--steps", str(steps), "--microbatches", str(m), *SGD, "--report-every", "2", "--slowdown", "1:20@8"]
    master = None
    if where == "master":  # the master's PolicyDriver decides; rank 0 polls and broadcasts
        driver = load_policy_driver(str(tmp_path / "plan.json"), str(tmp_path / "graph.txt"), PolicyConfig(**POLICY),
                                    "momentum", steps)
        log = open(tmp_path / "master.jsonl", "w")
        master = Master("policy-token", port=0, policy=driver, log=log)
        host, port = master.start_in_thread()
        args += ["--master", f"{host}:{port}"]
    else:
        args += ["--policy", "auto", *[f"--policy-arg={k}={v}" for k, v in POLICY.items()]]
    try:
        rc, out = h.launch(tmp_path, 2, args, environ=h.env(PIPESHIFT_TOKEN="policy-token"))
    finally:
        if master is not None:
            master.stop()
            log.close()
    assert rc == 0, out[-4000:]
    if where == "master":
        decisions = [r for r in h.jsonl(tmp_path / "master.jsonl") if r["event"] == "policy_decision"]
    else:
        decisions = h.jsonl(tmp_path / "out" / "decisions.jsonl")
        assert decisions[0]["event"] == "policy_warmup" and decisions[1]["event"] == "policy_calibrated"
    taken = [d for d in decisions if d.get("repartition")]
    assert taken, decisions
    assert all(d["total_gain_s"] > d["migration_cost_s"] for d in taken)
    switches = [r for r in h.jsonl(tmp_path / "out" / "repartitions.jsonl") if r["event"] == "repartition"]
    assert switches and all(r["source"].startswith("policy") for r in switches)
    # the slowed rank 1 ends with fewer layers than the even split gave it
    assert len(final_plan(tmp_path)["stages"][1]["nodes"]) < 6
    h.assert_same_weights(h.final_weights(tmp_path / "ck"), h.reference(steps, m, sgd))
