"""Schedules as data, and the simulator against the pipeline closed forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeshift.cli import main
from pipeshift.errors import PipeshiftError
from pipeshift.schedule.order import Pass, max_in_flight, schedule_actions, stage_warmup
from pipeshift.schedule.registry import SCHEDULES
from pipeshift.optimizer.simulator import SimStage, simulate


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("S,M", [(1, 1), (1, 5), (3, 1), (4, 8), (6, 4)])
def test_schedule_lists_run_every_microbatch_once(kind: str, S: int, M: int) -> None:
    for s in range(S):
        acts = schedule_actions(kind, S, s, M)
        assert sorted(a.microbatch for a in acts if a.kind == "F") == list(range(M))
        assert sorted(a.microbatch for a in acts if a.kind == "B") == list(range(M))
        pos = {a: i for i, a in enumerate(acts)}
        assert all(pos[Pass("F", i)] < pos[Pass("B", i)] for i in range(M))
        expected = M if kind == "gpipe" else min(S - s, M)
        assert max_in_flight(acts) == expected
        # replicas split the microbatches round-robin and keep the stage's order
        parts = [schedule_actions(kind, S, s, M, replica=q, num_replicas=3) for q in range(3)]
        assert sorted(a for p in parts for a in p) == sorted(acts)
        for q, part in enumerate(parts):
            assert part == [a for a in acts if a.microbatch % 3 == q]


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(PipeshiftError, match="unknown schedule"):
        schedule_actions("zigzag", 2, 0, 4)
    with pytest.raises(ValueError):
        schedule_actions("flush", 2, 2, 4)
    with pytest.raises(ValueError):
        schedule_actions("flush", 2, 0, 0)
    assert stage_warmup([1, 1, 1, 1], 0) == 3 and stage_warmup([2, 1], 0) == 2 and stage_warmup([2, 1], 1) == 0


def _equal(S: int, f: float, b: float, **kw) -> list[SimStage]:
    return [SimStage(forward_s=f, backward_s=b, ranks=(s,), **kw) for s in range(S)]


@pytest.mark.parametrize("kind", ["flush", "gpipe"])
@pytest.mark.parametrize("S,M,f,b", [(1, 4, 1.0, 2.0), (2, 2, 1.0, 2.0), (4, 8, 0.3, 0.7), (5, 3, 2.0, 1.0)])
def test_flushing_schedules_match_closed_form(kind: str, S: int, M: int, f: float, b: float) -> None:
    steps = 3
    r = simulate(_equal(S, f, b), kind, M, steps=steps)
    per_step = (M + S - 1) * (f + b)
    assert r.makespan_s == pytest.approx(steps * per_step)
    assert r.time_per_minibatch_s == pytest.approx(per_step)
    assert r.bubble_fraction == pytest.approx((S - 1) / (M + S - 1))
    peak = [x.peak_in_flight for x in sorted(r.ranks, key=lambda x: x.stage)]
    assert peak == [M if kind == "gpipe" else min(S - s, M) for s in range(S)]


@pytest.mark.parametrize("kind", ["1f1b", "2bw"])
@pytest.mark.parametrize("S,M,steps", [(2, 2, 2), (4, 4, 3), (3, 8, 2)])
def test_continuous_schedules_match_closed_form(kind: str, S: int, M: int, steps: int) -> None:
    f, b = 0.4, 0.9
    r = simulate(_equal(S, f, b), kind, M, steps=steps)
    N = M * steps
    assert r.makespan_s == pytest.approx((N + S - 1) * (f + b))
    assert r.steady_time_per_microbatch_s == pytest.approx(f + b)


def test_gpipe_with_transfers_matches_closed_form() -> None:
    S, M, f, b, c = 4, 6, 1.0, 2.0, 0.25
    stages = _equal(S, f, b, output_bytes=c * 1e9, link_bandwidth=1e9)
    r = simulate(stages, "gpipe", M)
    assert r.makespan_s == pytest.approx((M + S - 1) * (f + b) + 2 * (S - 1) * c)


@pytest.mark.parametrize("S,reps", [(3, [2, 1, 1]), (3, [1, 3, 1]), (4, [3, 2, 2, 1])])
def test_replicated_schedules_run_and_replicas_share_the_work(S: int, reps: list[int]) -> None:
    stages = [SimStage(0.5 * r, 1.0 * r, replicas=r) for r in reps]
    for kind in SCHEDULES:
        r = simulate(stages, kind, 12, steps=2)
        assert sum(x.busy_s for x in r.ranks) == pytest.approx(sum(1.5 * rep * 24 for rep in reps))
        per_rank = {(x.stage, x.replica): x.busy_s for x in r.ranks}
        for s, rep in enumerate(reps):  # round-robin: each replica runs 24/rep microbatches
            assert all(per_rank[(s, q)] == pytest.approx(1.5 * rep * 24 / rep) for q in range(rep))


def test_replicated_stage_keeps_pace_and_pays_allreduce() -> None:
    f, b = 1.0, 2.0
    stages = [SimStage(2 * f, 2 * b, replicas=2, ranks=(0, 1)), SimStage(f, b, ranks=(2,))]
    r = simulate(stages, "1f1b", 16, steps=4)
    assert r.steady_time_per_microbatch_s == pytest.approx(f + b, rel=1e-6)
    assert sorted(x.rank for x in r.ranks) == [0, 1, 2]
    base = simulate(stages, "flush", 8).makespan_s
    ar = [SimStage(2 * f, 2 * b, replicas=2, ranks=(0, 1), allreduce_s=0.5), SimStage(f, b, ranks=(2,))]
    assert simulate(ar, "flush", 8).makespan_s == pytest.approx(base + 0.5)


def test_trace_is_chrome_trace_events() -> None:
    S, M, steps = 3, 4, 2
    r = simulate(_equal(S, 0.001, 0.002, output_bytes=1e6, link_bandwidth=1e9), "flush", M, steps=steps)
    doc = json.loads(json.dumps(r.trace()))
    events = doc["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert all(isinstance(e["pid"], int) and e["tid"] in (0, 1) and e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    compute = [e for e in spans if e["tid"] == 0]
    assert len(compute) == 2 * S * M * steps
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {f"rank {s} (stage {s}, replica 0)" for s in range(S)}
    # a rank never runs two things at once on its compute stream
    for pid in range(S):
        mine = sorted((e["ts"], e["ts"] + e["dur"]) for e in compute if e["pid"] == pid)
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(mine, mine[1:]))


def test_simulate_rejects_bad_arguments() -> None:
    with pytest.raises(PipeshiftError):
        simulate([], "flush", 4)
    with pytest.raises(PipeshiftError):
        simulate(_equal(2, 1, 1), "flush", 0)


def test_cli_plan_then_simulate(profiles_dir: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan"
    assert main(["plan", str(profiles_dir / "gnmt" / "graph.txt"), "-n", "4", "--straight_pipeline",
                 "--schedule", "flush", "--microbatches", "4", "-o", str(plan), "-q"]) == 0
    trace = tmp_path / "t.json"
    assert main(["simulate", str(plan), "--schedule", "gpipe", "--microbatches", "6", "-o", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "bubble fraction" in out and "peak memory GB" in out
    doc = json.loads(trace.read_text())
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "X" and e["tid"] == 0) == 2 * 4 * 6 * 4
    # the plan's own schedule is the default; the trace lands in the plan directory
    assert main(["simulate", str(plan / "plan.json")]) == 0
    assert (plan / "trace.json").is_file()


def test_cli_simulate_errors(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = [
        ([str(tmp_path / "nope")], "no such plan"),
        ([str(bad)], "no such plan"),
    ]
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "plan.json").write_text("{not json")
    cases.append(([str(tmp_path / "p1")], "invalid JSON"))
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "plan.json").write_text(json.dumps({"stages": [{"nodes": ["node1"], "replicas": 0, "ranks": []}]}))
    cases.append(([str(tmp_path / "p2")], "replicas must be a positive integer"))
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "plan.json").write_text(json.dumps({"stages": [{"nodes": ["node1"], "replicas": 1, "costs": {"forward_s": -1}}]}))
    cases.append(([str(tmp_path / "p3")], "forward_s must be a non-negative number"))
    cases.append(([str(tmp_path / "p2"), "--microbatches", "zero"], "not an integer"))
    for argv, message in cases:
        rc = main(["simulate", *argv])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and err.count("\n") == 1, err
