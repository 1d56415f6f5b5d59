"""Planner speed and quality: `python -m benchmarks.bench_planner [--quick]`.

Prints markdown tables:

1. **Speed vs PipeDream** on its own profiles (../shared/pipedream-profiles): our wall time for
   reading graph.txt and planning (median, min–max over repeats) with ``--cost-model
   pipedream``, PipeDream's wall time on this kind of machine (reference.json; GNMT on 16
   workers from issue #4), the speed-up, and whether the optimum matches PipeDream's.
2. **Prefix states vs exact search**: the optimum over prefixes of each topological order (and
   the best of them, which is what ``--search prefix`` returns) against the exact optimum, on
   graphs small enough to solve exactly, for both cost models.
3. **Branchy graphs**: Inception-v3-, DenseNet-121- and NASNet-like graphs (synthetic, with
   realistic node counts and branch structure): how many exact states they have, which search
   ``auto`` picks, time and peak memory (tracemalloc) of planning.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

from pipeshift.errors import PipeshiftError
from pipeshift.graph import Graph, Node, read_graph_txt
from pipeshift.optimizer.planner import PlanOptions, make_plan, planning_graph
from pipeshift.optimizer.states import TooManyStates, all_downsets, pipedream_states
from pipeshift.optimizer.topology import Level, Topology

REPO = Path(__file__).resolve().parents[1]

PROFILES = REPO.parent / "shared" / "pipedream-profiles"
GNMT16_PIPEDREAM_S = 91.0  # issue #4: PipeDream's optimizer, GNMT on 16 workers, on these machines


# -- synthetic branchy graphs ------------------------------------------------------------
class Builder:
    """Append nodes with made-up but plausible costs; activations shrink with depth."""

    def __init__(self, seed: int):
        self.g = Graph()
        self.rng = random.Random(seed)
        self.n = 0
        self.add("Input0", [], fwd=0.0, act=3 * 299 * 299 * 4 * 32, params=0.0)

    def add(self, desc: str, preds: list[str], fwd: float | None = None, act: float | None = None,
            params: float | None = None) -> str:
        self.n += 1
        nid = f"node{self.n}"
        depth = self.n
        f = self.rng.uniform(0.05, 1.5) if fwd is None else fwd
        a = (self.rng.uniform(0.5, 2.0) * 32 * 2**20 / (1 + depth / 60)) if act is None else act
        p = (self.rng.choice([0.0, 0.1, 0.5, 2.0]) * 2**20) if params is None else params
        self.g.add_node(Node(nid, desc, forward_ms=round(f, 3), backward_ms=round(2 * f, 3), activation_size=float(int(a)),
                             parameter_size=float(int(p))))
        for q in preds:
            self.g.add_edge(q, nid)
        return nid

    def conv(self, x: str, k: int = 1) -> str:
        """BasicConv2d as the profiler sees it: conv, bn, relu."""
        for _ in range(k):
            x = self.add("Conv2d", [x])
            x = self.add("BatchNorm2d", [x], params=2048.0)
            x = self.add("relu", [x], params=0.0)
        return x

    def cat(self, xs: list[str]) -> str:
        return self.add("cat", xs, fwd=0.05, params=0.0)


def inception_like(modules_a: int = 3, modules_c: int = 4, modules_e: int = 2, aux: bool = True, seed: int = 0) -> Graph:
    b = Builder(seed)
    x = b.conv("node1", 3)
    x = b.add("max_pool2d", [x], params=0.0)
    x = b.conv(x, 2)
    x = b.add("max_pool2d", [x], params=0.0)
    for _ in range(modules_a):  # InceptionA: 1x1 | 5x5 (2 convs) | 3x3dbl (3) | pool + 1x1
        x = b.cat([b.conv(x, 1), b.conv(x, 2), b.conv(x, 3), b.conv(b.add("avg_pool2d", [x], params=0.0), 1)])
    if modules_c or modules_e:  # InceptionB
        x = b.cat([b.conv(x, 1), b.conv(x, 3), b.add("max_pool2d", [x], params=0.0)])
    for _ in range(modules_c):  # InceptionC: 1x1 | 7x7 (3 convs) | 7x7dbl (5) | pool + 1x1
        x = b.cat([b.conv(x, 1), b.conv(x, 3), b.conv(x, 5), b.conv(b.add("avg_pool2d", [x], params=0.0), 1)])
    aux_out = None
    if aux:  # auxiliary classifier: runs beside everything after it
        a = b.add("avg_pool2d", [x], params=0.0)
        a = b.conv(a, 2)
        a = b.add("adaptive_avg_pool2d", [a], params=0.0)
        a = b.add("flatten", [a], params=0.0)
        aux_out = b.add("Linear", [a], params=768 * 1000 * 4.0)
    if modules_e:  # InceptionD
        x = b.cat([b.conv(x, 2), b.conv(x, 4), b.add("max_pool2d", [x], params=0.0)])
    for _ in range(modules_e):  # InceptionE: branches that fork again before the cat
        t = b.conv(x, 1)
        d = b.conv(x, 2)
        x = b.cat([b.conv(x, 1), b.conv(t, 1), b.conv(t, 1), b.conv(d, 1), b.conv(d, 1),
                   b.conv(b.add("avg_pool2d", [x], params=0.0), 1)])
    x = b.add("adaptive_avg_pool2d", [x], params=0.0)
    x = b.add("dropout", [x], params=0.0)
    x = b.add("flatten", [x], params=0.0)
    b.add("Linear", [x], params=2048 * 1000 * 4.0)
    del aux_out
    return b.g


def densenet_like(blocks: tuple[int, ...] = (6, 12, 24, 16), seed: int = 1) -> Graph:
    b = Builder(seed)
    x = b.conv("node1", 1)
    x = b.add("max_pool2d", [x], params=0.0)
    for i, layers in enumerate(blocks):
        feats = [x]
        for _ in range(layers):  # cat(all previous) → bn relu conv1x1 bn relu conv3x3
            y = b.cat(list(feats)) if len(feats) > 1 else feats[0]
            y = b.add("BatchNorm2d", [y], params=2048.0)
            y = b.add("relu", [y], params=0.0)
            y = b.add("Conv2d", [y])
            y = b.add("BatchNorm2d", [y], params=2048.0)
            y = b.add("relu", [y], params=0.0)
            feats.append(b.add("Conv2d", [y]))
        x = b.cat(feats)
        if i + 1 < len(blocks):  # transition
            x = b.add("BatchNorm2d", [x], params=2048.0)
            x = b.add("relu", [x], params=0.0)
            x = b.add("Conv2d", [x])
            x = b.add("avg_pool2d", [x], params=0.0)
    x = b.add("adaptive_avg_pool2d", [x], params=0.0)
    b.add("Linear", [b.add("flatten", [x], params=0.0)], params=1024 * 1000 * 4.0)
    return b.g


def random_dag(n: int, seed: int, window: int = 8) -> Graph:
    """Each node reads one to three of the previous ``window``: wide, irregular branching."""
    b = Builder(seed)
    rng = random.Random(seed)
    ids = [b.add("Conv2d", ["node1"])]
    for _ in range(n - 1):
        recent = ids[-window:]
        ids.append(b.add(rng.choice(["Conv2d", "add", "relu"]), rng.sample(recent, min(len(recent), rng.choice([1, 1, 2, 3])))))
    return b.g


def nasnet_like(cells: int = 12, blocks: int = 5, seed: int = 2, max_ops: int = 3) -> Graph:
    """Cells of blocks; each block adds two op chains read from the cell's inputs or earlier blocks."""
    b = Builder(seed)
    rng = random.Random(seed)
    prev2 = prev1 = b.conv("node1", 1)
    for _ in range(cells):
        states = [prev2, prev1]
        used: set[str] = set()
        for _ in range(blocks):
            ins = rng.sample(states, 2)
            outs = []
            for src in ins:
                y = src
                for _ in range(rng.randint(1, max_ops)):  # sep-conv: relu, depthwise, pointwise, bn
                    y = b.add("relu", [y], params=0.0)
                    y = b.add("Conv2d", [y])
                    y = b.add("BatchNorm2d", [y], params=2048.0)
                outs.append(y)
                used.add(src)
            states.append(b.add("add", outs, fwd=0.05, params=0.0))
        prev2, prev1 = prev1, b.cat([s for s in states[2:] if s not in used] or states[-1:])
    x = b.add("adaptive_avg_pool2d", [prev1], params=0.0)
    b.add("Linear", [b.add("flatten", [x], params=0.0)], params=1056 * 1000 * 4.0)
    return b.g


# -- helpers -----------------------------------------------------------------------------
def parse_flags(flags: str) -> tuple[Topology, PlanOptions]:
    from pipeshift.optimizer.cli import add_arguments, options_from_args, topology_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["-f", "x", *flags.split(), "--cost-model", "pipedream"])
    return topology_from_args(args), options_from_args(args)


def timed(fn, repeats: int) -> tuple[float, float, float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def fmt_s(x: float) -> str:
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def count_states(g: Graph, model: str, cap: int) -> str:
    arrays = planning_graph(g, model)
    try:
        if model == "pipedream":
            return str(pipedream_states(arrays, cap).size)
        return str(all_downsets(arrays, cap).size)
    except TooManyStates:
        return f"> {cap}"


# -- sections ----------------------------------------------------------------------------
def speed_section(repeats: int) -> None:
    ref = json.loads((PROFILES / "reference.json").read_text())["entries"]
    rows = [(e["profile"], e["flags"], e["time_per_stage_s"], e["pipedream_wall_s"]) for e in ref]
    rows.append(("gnmt/graph.txt", "-n 16 --activation_compression_ratio 1", None, GNMT16_PIPEDREAM_S))
    print("## Speed against PipeDream's optimizer (`--cost-model pipedream`, read graph.txt + plan)\n")
    print("| profile | nodes | flags | ours: median (min–max) | PipeDream | speed-up | optimum |")
    print("|---|---:|---|---|---|---|---|")
    for profile, flags, want, pd_wall in rows:
        topo, opt = parse_flags(flags)
        path = PROFILES / profile
        nodes = len(read_graph_txt(path))
        med, lo, hi, result = timed(lambda path=path, topo=topo, opt=opt: make_plan(read_graph_txt(path), topo, opt), repeats)
        got = result.optimum
        match = "n/a" if want is None else ("same" if abs(got - want) <= 1e-6 * want else f"DIFFERS ({got:.6g} vs {want:.6g})")
        print(f"| {profile.split('/')[0]} | {nodes} | `{flags}` | {fmt_s(med)} ({fmt_s(lo)}–{fmt_s(hi)}) | {pd_wall:.2f} s | "
              f"{pd_wall / med:.0f}× | {match} |")
    print()


def gap_section(quick: bool) -> None:
    graphs = {
        "vgg16": read_graph_txt(PROFILES / "vgg16" / "graph.txt"),
        "resnet50": read_graph_txt(PROFILES / "resnet50" / "graph.txt"),
        "gnmt": read_graph_txt(PROFILES / "gnmt" / "graph.txt"),
        "inception (1 A module)": inception_like(1, 0, 0, aux=False),
        "nasnet (1 cell, 3 blocks, short ops)": nasnet_like(1, 3, max_ops=1),
        "random DAG (30 nodes, window 3)": random_dag(30, seed=5, window=3),
    }
    if not quick:
        graphs["inception (2 A modules)"] = inception_like(2, 0, 0, aux=False)
        graphs["nasnet (2 cells, 2 blocks, short ops)"] = nasnet_like(2, 2, max_ops=1)
        graphs["random DAG (60 nodes, window 3)"] = random_dag(60, seed=6, window=3)
    topologies = {"-n 4": Topology((Level(4, 1e9),)), "-n 16": Topology((Level(16, 1e9),)),
                  "-n 4 4": Topology((Level(4, 1e10), Level(4, 1.25e9)))}
    if quick:
        topologies.pop("-n 4 4")
    print("## Prefix states vs exact search (gap = prefix optimum / exact optimum − 1)\n")
    print("| graph | cost model | topology | exact states | exact optimum | best prefix | gap | gap per order |")
    print("|---|---|---|---|---|---|---|---|")
    for name, g in graphs.items():
        for model in ("pipedream", "pipeshift"):
            for tname, topo in topologies.items():
                extra = {"compression": 1.0} if model == "pipedream" else {}
                states = count_states(g, model, 6000)
                if tname == "-n 4 4" and (not states.isdigit() or int(states) > 600):
                    continue  # the exact hierarchical DP is O(S³): too slow to be worth a row here
                try:
                    exact = make_plan(g, topo, PlanOptions(cost_model=model, search="exact", max_states=6000,
                                                           work_budget=float("inf"), **extra))
                except PipeshiftError:
                    print(f"| {name} | {model} | `{tname}` | > 6000 | – | – | – | – |")
                    continue
                prefix = make_plan(g, topo, PlanOptions(cost_model=model, search="prefix", work_budget=float("inf"), **extra))
                per = ", ".join(f"{k} {100 * (v / exact.optimum - 1):+.2f}%" for k, v in prefix.search_candidates.items())
                print(f"| {name} | {model} | `{tname}` | {exact.states.size} | {exact.optimum * 1000:.3f} ms | "
                      f"{prefix.optimum * 1000:.3f} ms | {100 * (prefix.optimum / exact.optimum - 1):+.2f}% | {per} |")
    print()


def branchy_section(repeats: int, quick: bool) -> None:
    graphs = {
        "inception-v3-like": inception_like(),
        "densenet-121-like": densenet_like(),
        "nasnet-like": nasnet_like(6 if quick else 12),
    }
    topologies = {"-n 16": Topology((Level(16, 1e9),)), "-n 4 4": Topology((Level(4, 1e10), Level(4, 1.25e9)))}
    print("## Branchy graphs: `--search auto` (exact while affordable, else prefixes)\n")
    print("| graph | nodes | cost model | topology | exact states | search used | states | median (min–max) | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, g in graphs.items():
        for model in ("pipedream", "pipeshift"):
            states = count_states(g, model, 20000)
            for tname, topo in topologies.items():
                opt = PlanOptions(cost_model=model)
                med, lo, hi, result = timed(lambda g=g, topo=topo, opt=opt: make_plan(g, topo, opt), repeats)
                tracemalloc.start()
                make_plan(g, topo, opt)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                print(f"| {name} | {len(g)} | {model} | `{tname}` | {states} | {result.states.mode} | {result.states.size} | "
                      f"{fmt_s(med)} ({fmt_s(lo)}–{fmt_s(hi)}) | {peak / 2**20:.0f} MiB |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and graphs")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--only", choices=["speed", "gap", "branchy"], help="run one section")
    args = p.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    if not PROFILES.is_dir():
        sys.exit(f"PipeDream profiles not found at {PROFILES}")
    if args.only in (None, "speed"):
        speed_section(repeats)
    if args.only in (None, "gap"):
        gap_section(args.quick)
    if args.only in (None, "branchy"):
        branchy_section(repeats, args.quick)


if __name__ == "__main__":
    main()
