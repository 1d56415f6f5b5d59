"""Count the hostile-input probe's outcomes per category, for this checkout or another one.

``python -m benchmarks.probe_counts [--tree DIR] [--limit S] [--only ID …]`` runs every probe of
``tests/probes.py`` in its own subprocess against the pipeshift in ``--tree`` (default: this
checkout), so a hang (over ``--limit`` seconds) or a crash counts as what it is, and prints
one row per category: inputs tried, clean errors, tracebacks, hangs, silent acceptances, code
executed — and a line per probe that did not end in a clean error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))  # the probe table lives with the tests

import probes  # noqa: E402


def run_one(probe_id: str, tree: Path, work: Path, base: Path, limit: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    env.pop("PIPESHIFT_TOKEN", None)
    try:
        done = subprocess.run([sys.executable, str(HERE / "tests" / "probes.py"), probe_id, str(work), str(base)],
                              env=env, capture_output=True, text=True, timeout=limit, cwd=work.parent)
    except subprocess.TimeoutExpired:
        if (work / "MARKER").exists():  # it ran the injection, then went on for too long
            return {"outcome": "code executed", "code": None, "message": f"ran it, then no answer within {limit:g} s"}
        return {"outcome": "hang", "code": None, "message": f"no answer within {limit:g} s"}
    for line in done.stdout.splitlines():
        if line.startswith("PROBE-OUTCOME "):
            return json.loads(line[len("PROBE-OUTCOME "):])
    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
    return {"outcome": "traceback", "code": done.returncode, "message": f"the probe itself died: {tail}"[:300]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default=str(HERE), help="checkout whose pipeshift is probed (default: this one)")
    p.add_argument("--limit", type=float, default=90.0, help="seconds before a probe counts as a hang")
    p.add_argument("--only", nargs="*", default=None, help="probe ids to run (default: all)")
    p.add_argument("--json", default=None, help="also write every outcome here")
    args = p.parse_args(argv)
    tree = Path(args.tree).resolve()
    chosen = [pr for pr in probes.PROBES if not args.only or pr.id in args.only]
    results = {}
    with tempfile.TemporaryDirectory(prefix="pipeshift-probes-") as tmp:
        base = Path(tmp) / "base"
        build = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); import probes; "
                                "from pathlib import Path; probes.build_base(Path(sys.argv[1]))",
                                str(base), str(HERE / "tests")],
                               env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                               cwd=tmp)
        if build.returncode:
            print(build.stderr, file=sys.stderr)
            return 1
        for pr in chosen:
            results[pr.id] = run_one(pr.id, tree, Path(tmp) / pr.id, base, args.limit)
            print(f"{pr.id:28s} {results[pr.id]['outcome']:18s} {results[pr.id]['message'][:110]}", flush=True)
    cats: dict[str, Counter] = {}
    for pr in chosen:
        cats.setdefault(pr.category, Counter())[results[pr.id]["outcome"]] += 1
    print()
    print(f"tree: {tree}")
    header = ["category", "inputs tried", *probes.OUTCOMES]
    rows = [[c, sum(n.values()), *[n[o] for o in probes.OUTCOMES]] for c, n in cats.items()]
    total = Counter()
    for n in cats.values():
        total.update(n)
    rows.append(["all", sum(total.values()), *[total[o] for o in probes.OUTCOMES]])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
