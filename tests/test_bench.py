"""The benchmark harness: shared helpers, the report runner, and bench_prediction's file parsing.

Benchmarks themselves are measurements and are not run here; these tests pin down the code
that turns their output into the report (medians, gaps, tables, failures, time limits).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import textwrap
from pathlib import Path

import pytest


from benchmarks import run_all
from benchmarks.bench_prediction import measure, traced_compute
from benchmarks.common import Spread, fmt_gap, markdown_table, relative_gap

# -- common ---------------------------------------------------------------------------------


def test_spread_matches_statistics_and_skips_non_finite():
    values = [3.0, 1.5, 9.0, 2.25, 4.0, math.nan]
    s = Spread.of(values)
    finite = values[:-1]
    assert (s.median, s.low, s.high, s.count) == (statistics.median(finite), min(finite), max(finite), 5)
    assert s.format(lambda x: f"{x:.2f}") == f"{statistics.median(finite):.2f} (1.50–9.00)"
    assert Spread.of([7.0]).format(str) == "7.0"
    assert Spread.of([]).format() == "–" and Spread.of([]).count == 0


def test_relative_gap_and_its_format():
    assert relative_gap(11.0, 10.0) == pytest.approx(0.1)
    assert relative_gap(9.0, 12.0) == pytest.approx(9.0 / 12.0 - 1)
    assert math.isnan(relative_gap(1.0, 0.0)) and math.isnan(relative_gap(math.nan, 1.0))
    assert fmt_gap(0.05, target=0.1) == "+5.0%"
    assert fmt_gap(-0.25, target=0.1).startswith("**-25.0%**")
    assert fmt_gap(math.nan) == "–"


def test_markdown_table_shape_alignment_and_escaping():
    text = markdown_table(["name", "value"], [["a|b", 1], ["c", 2.5]], right=[1])
    lines = text.splitlines()
    assert lines[0] == "| name | value |"
    assert lines[1] == "|---|---:|"
    assert lines[2] == "| a\\|b | 1 |"  # the pipe cannot split the row
    assert len(lines) == 4
    with pytest.raises(ValueError):
        markdown_table(["one"], [["a", "b"]])


# -- run_all --------------------------------------------------------------------------------


def test_nest_headings_shifts_to_the_section_level_and_leaves_code_blocks_alone():
    text = "## Speed\n\n| a |\n```\n# not a heading\n```\n### Deeper"
    assert run_all.nest_headings(text).splitlines() == [
        "### Speed", "", "| a |", "```", "# not a heading", "```", "#### Deeper"]
    # an author who started at ### lands at the same level; text without headings is unchanged
    assert run_all.nest_headings("### A\n#### B").splitlines() == ["### A", "#### B"]
    assert run_all.nest_headings("plain\n#hashtag") == "plain\n#hashtag"


def test_tail_keeps_last_lines_and_final_progress_redraw():
    text = "one\ntwo\nbar 10%\rbar 50%\rbar 100%\n\nlast\n"
    assert run_all.tail(text, 2) == "bar 100%\nlast"


def test_discover_orders_known_sections_first_and_titles(tmp_path):
    for stem in ("bench_zeta", "bench_prediction", "bench_alpha", "bench_planner"):
        (tmp_path / f"{stem}.py").write_text(f'"""Measure {stem}: `python {stem}.py [--quick]`."""\n')
    (tmp_path / "helper.py").write_text("")
    names = [p.stem for p in run_all.discover(tmp_path)]
    assert names == ["bench_planner", "bench_prediction", "bench_alpha", "bench_zeta"]
    assert run_all.title_of(tmp_path / "bench_alpha.py") == "Measure bench_alpha"
    assert run_all.title_of(tmp_path / "bench_planner.py") == run_all.SECTIONS["bench_planner"]


def _fake_benchmarks(root: Path) -> None:
    (root / "bench_ok.py").write_text(textwrap.dedent('''
        """A passing benchmark."""
        import sys
        quick = "--quick" in sys.argv
        print("## Numbers\\n\\n| quick |\\n|---|\\n| " + str(quick) + " |")
        print("progress", file=sys.stderr)
    '''))
    (root / "bench_broken.py").write_text(textwrap.dedent('''
        """A failing benchmark."""
        import sys
        print("partial table")
        for i in range(40):
            print(f"stderr line {i}", file=sys.stderr)
        sys.exit(3)
    '''))
    (root / "bench_slow.py").write_text(textwrap.dedent('''
        """A benchmark that never finishes."""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a child: killed too
        print("started", file=sys.stderr, flush=True)
        time.sleep(60)
    '''))


@pytest.mark.timeout(60)
def test_run_all_reports_successes_failures_and_timeouts(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    _fake_benchmarks(bench)
    report = tmp_path / "out" / "REPORT.md"
    code = run_all.main(["--quick", "--bench-dir", str(bench), "-o", str(report), "--timeout", "3"])
    assert code == 1
    text = report.read_text()
    assert text.startswith("# pipeshift benchmark report")
    for key in ("date", "load average (1 min)", "python / torch", "git commit", "cores"):
        assert key in text
    # the passing one: its table nested under its section, --quick passed through
    assert "## A passing benchmark" in text and "### Numbers" in text and "| True |" in text
    # the failing one: marked, with the end of its stderr (not the beginning) and what it printed
    assert "FAILED (exit 3)" in text
    assert "stderr line 39" in text and "stderr line 5\n" not in text
    assert "partial table" in text
    # the one past its limit
    assert "FAILED (timed out after 3 s)" in text
    # the sections issue 8 expects but that have no file here are listed, not silently dropped
    for stem in run_all.SECTIONS:
        assert f"`{stem}.py`" in text
    assert (tmp_path / "out" / "logs" / "bench_broken.stderr.txt").read_text().count("stderr line") == 40


@pytest.mark.timeout(60)
def test_run_all_exits_zero_when_everything_passes(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    _fake_benchmarks(bench)
    report = tmp_path / "REPORT.md"
    assert run_all.main(["--bench-dir", str(bench), "-o", str(report), "--only", "bench_ok"]) == 0
    text = report.read_text()
    assert "| False |" in text and "FAILED" not in text and "bench_broken" not in text


# -- bench_prediction's parsing of a run's files --------------------------------------------


def _write_run(root: Path, stage: int, rank: int, rows: list[tuple[float, float, float]], events: list[tuple[str, float]]):
    """rows: (samples_per_s, compute_s, time_s) per step; events: (name, duration s) in order."""
    d = root / f"rank{rank}"
    d.mkdir(parents=True)
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "split", "stage", "rank", "samples_per_s", "compute_s", "time_s"])
        w.writeheader()
        for i, (rate, compute, t) in enumerate(rows, 1):
            w.writerow({"step": i, "split": "train", "stage": stage, "rank": rank, "samples_per_s": rate,
                        "compute_s": compute, "time_s": t})
        w.writerow({"step": len(rows), "split": "val", "stage": stage, "rank": rank, "compute_s": 99.0})
    ts, trace = 0.0, [{"name": "thread_name", "ph": "M", "pid": rank, "tid": 0}]
    for name, dur in events:
        trace.append({"name": name, "ph": "X", "pid": rank, "tid": 0, "ts": ts, "dur": dur * 1e6})
        trace.append({"name": f"wait {name}", "ph": "X", "pid": rank, "tid": 1, "ts": ts, "dur": 5e6})  # ignored
        ts += dur * 1e6 + 1
    (d / "trace.json").write_text(json.dumps({"traceEvents": trace}))


def test_measure_reads_traces_and_metrics_past_the_warmup(tmp_path):
    m, batch, warmup = 2, 8, 1
    steps = [[("load 0", 0.001), ("F0", 0.010 * k), ("F1", 0.011 * k), ("B0", 0.020 * k), ("B1", 0.021 * k),
              ("step", 0.003 * k)] for k in (5, 1, 2, 3)]  # the first (warm-up) step is slow
    events = [e for s in steps for e in s]
    rows0 = [(100.0, 0.5, 1.0), (200.0, 0.06, 2.0), (300.0, 0.08, 3.0), (250.0, 0.07, 4.0)]
    rows1 = [(110.0, 0.5, 1.5), (210.0, 0.05, 2.0), (330.0, 0.09, 2.5), (270.0, 0.07, 3.5)]
    _write_run(tmp_path, 0, 0, rows0, events)
    _write_run(tmp_path, 1, 1, rows1, events)

    timing = traced_compute(tmp_path / "rank0" / "trace.json", warmup, m)
    assert timing["forward_s"] == pytest.approx(statistics.median([0.010 * k for k in (1, 2, 3)] + [0.011 * k for k in (1, 2, 3)]))
    assert timing["backward_s"] == pytest.approx(statistics.median([0.020 * k for k in (1, 2, 3)] + [0.021 * k for k in (1, 2, 3)]))
    assert timing["step_s"] == pytest.approx(0.006)

    stages, rate, overall = measure(tmp_path, num_stages=2, microbatches=m, batch_size=batch, warmup=warmup)
    assert rate == statistics.median(r[0] for r in rows1[warmup:])  # the last stage's steps after warm-up
    assert overall == pytest.approx(3 * m * batch / (3.5 - 1.5))
    assert stages[0]["runtime_compute_s"] == pytest.approx(statistics.median([0.06, 0.08, 0.07]) / m)
    assert stages[1]["runtime_compute_s"] == pytest.approx(0.07 / m)


def test_measure_rejects_a_run_missing_a_stage(tmp_path):
    from benchmarks.bench_prediction import StepFailed

    _write_run(tmp_path, 0, 0, [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)], [("F0", 0.1), ("B0", 0.1), ("step", 0.1)] * 2)
    with pytest.raises(StepFailed, match="expected 0..1"):
        measure(tmp_path, num_stages=2, microbatches=1, batch_size=1, warmup=1)


def test_summary_and_report_carry_the_gaps(tmp_path):
    from benchmarks.bench_prediction import CASES, Config, RunResult, report, stage_times, summarize

    plan = {"stages": [{"nodes": ["node1", "node2"], "replicas": 1, "ranks": [0],
                        "costs": {"forward_s": 0.010, "backward_s": 0.020}},
                       {"nodes": ["node3"], "replicas": 1, "ranks": [1],
                        "costs": {"forward_s": 0.012, "backward_s": 0.018}}],
            "predicted": {"throughput_samples_per_s": 1000.0}}
    graph = tmp_path / "graph.txt"
    graph.write_text(
        "node1 -- Input0 -- forward_compute_time=1.0, backward_compute_time=0.0, activation_size=4.0, parameter_size=0.0\n"
        "node2 -- Linear -- forward_compute_time=8.0, backward_compute_time=16.0, activation_size=4.0, parameter_size=4.0\n"
        "node3 -- Linear -- forward_compute_time=11.0, backward_compute_time=17.0, activation_size=4.0, parameter_size=4.0\n"
        "\tnode1 -- node2\n\tnode2 -- node3\n")
    tuned = stage_times(graph, plan)
    assert tuned == [pytest.approx((0.009, 0.016)), pytest.approx((0.011, 0.017))]

    alone = [{"forward_cpu_s": 0.009, "backward_cpu_s": 0.018, "forward_s": 0.009, "backward_s": 0.019}] * 2
    runs = [RunResult([{"forward_s": f, "backward_s": 2 * f, "step_s": 0.001, "runtime_compute_s": 3 * f}] * 2,
                      samples_per_s=rate, overall_samples_per_s=rate, load_before=1.0, load_after=1.5)
            for f, rate in ((0.011, 700.0), (0.012, 650.0), (0.010, 720.0))]
    cfg = Config(CASES["mlp"], workers=2, microbatches=4, steps=10, warmup=2, repeats=3, threads=1)
    result = summarize(cfg, plan, alone, tuned, runs)

    st = result["stages"][0]
    assert st["measured_s"].median == pytest.approx(3 * 0.011)
    assert st["gap"] == pytest.approx(3 * 0.011 / 0.030 - 1)
    assert st["gap_tuned"] == pytest.approx(3 * 0.011 / 0.025 - 1)
    assert st["gap_alone"] == pytest.approx(0.027 / 0.030 - 1)
    t = result["throughput"]
    assert t["measured"].median == 700.0
    assert t["gap_steady"] == pytest.approx(700.0 / 1000.0 - 1)
    assert t["gap"] == pytest.approx(700.0 / t["simulated"] - 1)
    text = report([result], failures=["gpt on 2 ranks: boom"])
    assert f"{100 * st['gap']:+.1f}%" in text and f"{100 * t['gap']:+.1f}%" in text
    assert "**failed:** gpt on 2 ranks: boom" in text


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
@pytest.mark.timeout(30)
def test_runnable_sampler_counts_a_busy_process():
    import subprocess

    from benchmarks.common import RunnableSampler

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        import time

        time.sleep(0.3)  # past the interpreter's start-up
        with RunnableSampler(interval_s=0.02) as s:
            time.sleep(0.5)
    finally:
        spinner.wait(timeout=10)
    assert len(s.samples) >= 5
    assert min(s.samples) >= 1  # the spinner is always runnable; the sampler does not count itself


def test_every_benchmark_imports_as_a_module_of_the_package():
    """`python -m benchmarks.NAME` is how they run: a sibling import that only works as a script fails here."""
    import subprocess

    root = Path(run_all.__file__).resolve().parent
    names = sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module('benchmarks.' + name)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=root.parent, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bench_noisy" in names and "run_all" in names
