"""Run every benchmark and write one markdown report: `python -m benchmarks.run_all [--quick] [-o FILE]`.

``make bench`` runs this. Each ``benchmarks/bench_*.py`` runs as its own process, one after the
other (the machine may have two cores; benchmarks running side by side would measure each
other), under a time limit, with ``--quick`` passed on when given. Its standard output — markdown
tables — becomes a section of ``bench-out/REPORT.md``; its standard error goes to
``bench-out/logs/``. A benchmark that fails or runs out of time is reported as failed, with the
last lines it wrote to standard error, and the command exits non-zero.

The header records what the figures depend on: date, cores, load average before and after,
torch version and git commit.

Duration on this project's 2-core machine (measured under a load average of 2–6): ``--quick``
about 5 minutes (planner 55 s, runtime 42 s, prediction 54 s, repartition 155 s). Without it,
planner 1.7 min, runtime 2.2 min and prediction 4–5 min were measured, and the repartition
benchmark's full run (three repeats, a 100M-parameter move) adds several more: expect about
20 minutes for ``make bench``, and use ``python -m benchmarks.run_all --quick`` for a look.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import load_average, markdown_table

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"

# The sections issue 8 asks for, in report order: benchmark file stem -> section title.
SECTIONS = {
    "bench_planner": "Planner time against graph size",
    "bench_runtime": "Runtime samples/s against torch.distributed.pipelining",
    "bench_prediction": "Predicted against measured per-stage time and throughput",
    "bench_repartition": "Repartition recovery and pause",
    "bench_startup": "Command-line start-up",
}
STDERR_TAIL = 20


@dataclass
class Outcome:
    """What one benchmark process did."""

    name: str
    command: list[str]
    returncode: int | None  # None: killed at the time limit
    seconds: float
    stdout: str
    stderr: str
    load_before: float
    load_after: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def status(self, timeout_s: float) -> str:
        if self.returncode is None:
            return f"FAILED (timed out after {timeout_s:.0f} s)"
        return "ok" if self.ok else f"FAILED (exit {self.returncode})"


def discover(bench_dir: Path = BENCH_DIR) -> list[Path]:
    """``bench_*.py`` files: the known sections first in report order, then the rest by name."""
    found = sorted(bench_dir.glob("bench_*.py"))
    order = list(SECTIONS)
    return sorted(found, key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem))


def title_of(path: Path) -> str:
    """A known section's title, else the first line of the file's docstring, else its name."""
    if path.stem in SECTIONS:
        return SECTIONS[path.stem]
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except (OSError, SyntaxError, UnicodeDecodeError):
        doc = None
    first = (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""
    first = re.sub(r":\s*`[^`]*`\s*\.?$", "", first).strip().rstrip(".")  # drop a trailing ": `usage`"
    return first or path.stem


def _heading_level(line: str) -> int:
    match = re.match(r"(#{1,6}) ", line)
    return len(match.group(1)) if match else 0


def nest_headings(markdown: str, top: int = 3) -> str:
    """Shift a benchmark's ATX headings so its shallowest becomes level ``top``.

    Each benchmark's output goes under its own ``##`` section, whatever level its author
    started at; lines inside fenced code blocks are not headings and stay as they are.
    """
    lines = markdown.splitlines()
    fenced, levels, in_fence = False, [], []
    for line in lines:
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            in_fence.append(True)
            continue
        in_fence.append(fenced)
        if not fenced and _heading_level(line):
            levels.append(_heading_level(line))
    if not levels:
        return markdown
    shift = top - min(levels)
    out = []
    for line, fence in zip(lines, in_fence):
        level = 0 if fence else _heading_level(line)
        out.append("#" * max(1, min(6, level + shift)) + line[level:] if level else line)
    return "\n".join(out)


def tail(text: str, lines: int = STDERR_TAIL) -> str:
    """The last ``lines`` lines, progress-bar carriage returns resolved to their final state."""
    # splitlines() would split at "\r" too; split at newlines only, then keep each line's last redraw
    cleaned = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in cleaned if line.strip()][-lines:])


def run_benchmark(path: Path, quick: bool, timeout_s: float, log_dir: Path | None = None) -> Outcome:
    """Run one benchmark in its own process group, so a timeout also ends what it started."""
    # ours run as modules of the benchmarks package (they import benchmarks.common); others as scripts
    ours = path.resolve().parent == BENCH_DIR.resolve()
    cmd = [sys.executable, "-m", f"benchmarks.{path.stem}"] if ours else [sys.executable, str(path)]
    if quick:
        cmd.append("--quick")
    load_before = load_average()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        code = None
    outcome = Outcome(path.stem, cmd, code, time.perf_counter() - t0, out or "", err or "", load_before, load_average())
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{path.stem}.stdout.md").write_text(outcome.stdout)
        (log_dir / f"{path.stem}.stderr.txt").write_text(outcome.stderr)
    return outcome


# -- the header --------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "pipeshift", "benchmarks"):
        commit += " (with uncommitted changes in pipeshift/ or benchmarks/)"
    return commit


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "not installed"


def fmt_load(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


def header(started: datetime.datetime, quick: bool, load_before: float, load_after: float, seconds: float) -> str:
    rows = [
        ["date", started.astimezone().strftime("%Y-%m-%d %H:%M %Z")],
        ["mode", "`--quick` (fewer repeats, smaller runs)" if quick else "full"],
        ["machine", f"{platform.node()}: {os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}"],
        ["load average (1 min)", f"{fmt_load(load_before)} before, {fmt_load(load_after)} after"],
        ["python / torch", f"{platform.python_version()} / {torch_version()}"],
        ["git commit", git_commit()],
        ["total time", f"{seconds / 60:.1f} min"],
    ]
    return "# pipeshift benchmark report\n\n" + markdown_table(["", ""], rows) + "\n"


# -- the report --------------------------------------------------------------------------------


def section(outcome: Outcome, path: Path, timeout_s: float) -> str:
    lines = [f"## {title_of(path)}", "",
             f"`{' '.join(outcome.command[1:])}` — {outcome.status(timeout_s)}, {outcome.seconds:.0f} s, "
             f"load average {fmt_load(outcome.load_before)} → {fmt_load(outcome.load_after)}", ""]
    if not outcome.ok:
        lines += ["**This benchmark failed.** Last lines of its standard error:", "", "```",
                  tail(outcome.stderr) or "(nothing)", "```", ""]
        if outcome.stdout.strip():
            lines += ["What it printed before failing:", ""]
    if outcome.stdout.strip():
        lines += [nest_headings(outcome.stdout.strip()), ""]
    return "\n".join(lines)


def missing_section(stem: str) -> str:
    return f"## {SECTIONS[stem]}\n\nNot run: `benchmarks/{stem}.py` does not exist yet.\n"


def build_report(outcomes: list[tuple[Path, Outcome]], missing: list[str], head: str, timeout_s: float) -> str:
    summary = markdown_table(
        ["benchmark", "section", "status", "time"],
        [[f"`{p.name}`", title_of(p), o.status(timeout_s), f"{o.seconds:.0f} s"] for p, o in outcomes]
        + [[f"`{m}.py`", SECTIONS[m], "missing", "–"] for m in missing])
    parts = [head, summary, ""]
    by_stem = {p.stem: (p, o) for p, o in outcomes}
    for stem in [*SECTIONS, *(p.stem for p, _ in outcomes if p.stem not in SECTIONS)]:
        if stem in by_stem:
            parts.append(section(by_stem[stem][1], by_stem[stem][0], timeout_s))
        elif stem in missing:
            parts.append(missing_section(stem))
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (minutes instead of ~20)")
    p.add_argument("-o", "--output", default="bench-out/REPORT.md", help="report file (default %(default)s)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="per-benchmark time limit in seconds (default 900; --quick: 600)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (e.g. bench_planner)")
    p.add_argument("--bench-dir", default=str(BENCH_DIR), help="where the bench_*.py files are (default: this folder)")
    args = p.parse_args(argv)
    bench_dir = Path(args.bench_dir)
    timeout_s = args.timeout or (600.0 if args.quick else 900.0)
    out = Path(args.output)
    if not out.is_absolute():
        out = Path.cwd() / out
    paths = discover(bench_dir)
    if args.only:
        wanted = {n.removesuffix(".py") for n in args.only}
        unknown = wanted - {q.stem for q in paths}
        if unknown:
            p.error(f"no benchmark named {', '.join(sorted(unknown))} (have {', '.join(q.stem for q in paths)})")
        paths = [q for q in paths if q.stem in wanted]
    missing = [] if args.only else [stem for stem in SECTIONS if not (bench_dir / f"{stem}.py").exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"run_all: cannot create {out.parent}: {e.strerror}", file=sys.stderr)
        return 1

    started, t0, load_before = datetime.datetime.now(datetime.timezone.utc), time.perf_counter(), load_average()
    outcomes: list[tuple[Path, Outcome]] = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} …", file=sys.stderr, flush=True)
        outcome = run_benchmark(path, args.quick, timeout_s, out.parent / "logs")
        print(f"[{i}/{len(paths)}] {path.name}: {outcome.status(timeout_s)} in {outcome.seconds:.0f} s",
              file=sys.stderr, flush=True)
        if not outcome.ok:
            print(tail(outcome.stderr, 5), file=sys.stderr, flush=True)
        outcomes.append((path, outcome))
    head = header(started, args.quick, load_before, load_average(), time.perf_counter() - t0)
    out.write_text(build_report(outcomes, missing, head, timeout_s))
    failed = [p.name for p, o in outcomes if not o.ok]
    print(f"wrote {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
