"""Command-line start-up: `python -m benchmarks.bench_startup [--quick]`.

Whole-process wall and CPU time (interpreter start included) of ``pipeshift --help`` and of
``pipeshift plan`` on a 96-node graph (a random DAG, 2 levels of 4 workers), median and range of
repeats, plus the import time of each subcommand's module alone (``python -X importtime``'s
cumulative figure). The goals: ``--help`` at most 0.2 s, ``plan`` at most 0.6 s on the 2-core
development machine. The CLI imports only the subcommand named, so these measure what a user
waits for, not the cost of the other steps' dependencies.
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Spread, load_average, markdown_table
from pipeshift.graph import Graph, Node, write_graph_txt

SUBCOMMAND_MODULES = ["pipeshift.cli", "pipeshift.optimizer.cli", "pipeshift.optimizer.simulate_cli",
                      "pipeshift.launch.ctl_cli", "pipeshift.show", "pipeshift.launch.train"]


def random_graph(n: int, seed: int = 0) -> Graph:
    """node1 is the input; each later node reads one or two earlier ones."""
    rng = random.Random(seed)
    g = Graph()
    g.add_node(Node("node1", "Input0"))
    for i in range(2, n + 1):
        g.add_node(Node(f"node{i}", rng.choice(["Conv2d(3, 3)", "ReLU()", "Linear(4, 4)", "add"]),
                        forward_ms=round(rng.uniform(0.1, 5.0), 3), backward_ms=round(rng.uniform(0.1, 9.0), 3),
                        activation_size=float(rng.randrange(1, 64) * 2**20),
                        parameter_size=float(rng.choice([0, 0, 1, 4, 16]) * 2**20)))
    g.add_edge("node1", "node2")
    for i in range(3, n + 1):
        for p in rng.sample(range(max(2, i - 4), i), min(rng.choice([1, 1, 2]), i - max(2, i - 4))):
            g.add_edge(f"node{p}", f"node{i}")
    return g


def timed_runs(argv: list[str], repeats: int, cwd: Path) -> tuple[Spread, Spread]:
    """Wall time and CPU time (user + system) of the process: on a loaded machine the CPU time is the steadier."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return Spread.of(walls), Spread.of(cpus)


def import_seconds(module: str, repeats: int) -> Spread:
    out = []
    for _ in range(repeats):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                             capture_output=True, text=True, check=True).stderr
        m = re.search(rf"\|\s*(\d+) \| {re.escape(module)}$", err, re.MULTILINE)
        out.append(int(m.group(1)) / 1e6 if m else float("nan"))
    return Spread.of(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 repeats instead of 15")
    args = ap.parse_args()
    repeats = 5 if args.quick else 15
    exe = [sys.executable, "-m", "pipeshift"]
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_graph_txt(random_graph(96), work / "graph.txt")
        commands = [
            ("`pipeshift --help`", ["--help"], "0.2 s"),
            ("`pipeshift plan graph.txt -n 4 4 -b 10e9 1.25e9 -o plan -q` (96 nodes)",
             ["plan", "graph.txt", "-n", "4", "4", "-b", "10e9", "1.25e9", "-o", "plan", "-q"], "0.6 s"),
        ]
        rows = []
        for title, words, goal in commands:
            walls, cpus = timed_runs([*exe, *words], repeats, work)
            rows.append([title, walls.format(lambda x: f"{x:.3f} s"), cpus.format(lambda x: f"{x:.3f} s"), goal])
    print(f"## Whole-process wall time ({repeats} repeats, median (min–max); load average {load_before:.2f} before, "
          f"{load_average():.2f} after)\n")
    print(markdown_table(["command", "wall time", "CPU time", "goal (wall)"], rows))
    print("\n## Import time of each subcommand's module (cumulative, `python -X importtime`)\n")
    print(markdown_table(["module", "import time"],
                         [[f"`{m}`", import_seconds(m, max(3, repeats // 3)).format(lambda x: f"{x:.3f} s")]
                          for m in SUBCOMMAND_MODULES]))


if __name__ == "__main__":
    main()
