"""Planner: the DP's optimum equals brute force on small graphs, and PipeDream's published optima.

The brute force here is written from the cost models' definitions, independently of the DP
code: it enumerates every chain of states (every legal split into stages) and every way of
giving the stages workers, evaluates each plan stage by stage, and keeps the cheapest.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shlex
import shutil
from pathlib import Path

import pytest

from pipeshift.cli import build_parser
from pipeshift.errors import PipeshiftError
from pipeshift.graph import Graph, Node, read_graph_txt, write_graph_txt
from pipeshift.optimizer.cli import options_from_args, topology_from_args
from pipeshift.optimizer.cost import Schedule
from pipeshift.optimizer.planner import PlanOptions, make_plan
from pipeshift.optimizer.topology import Level, Topology

INF = math.inf


# -- graphs -----------------------------------------------------------------------------
def random_dag(seed: int, n: int, chain: bool = False, extra_input: bool = False) -> Graph:
    """node1 is the raw input; node2 its consumer; later nodes read one or two earlier ones."""
    rng = random.Random(seed)
    g = Graph()
    g.add_node(Node("node1", "Input0"))
    for i in range(2, n + 2):
        g.add_node(
            Node(
                f"node{i}",
                rng.choice(["Conv2d(3, 3)", "ReLU()", "Linear(4, 4)", "add"]),
                forward_ms=round(rng.uniform(0.1, 5.0), 3),
                backward_ms=round(rng.uniform(0.1, 9.0), 3),
                activation_size=float(rng.randrange(1, 64) * 1024 * 1024),
                parameter_size=float(rng.choice([0, 0, 1, 4, 16]) * 1024 * 1024),
            )
        )
    g.add_edge("node1", "node2")
    for i in range(3, n + 2):
        if chain:
            g.add_edge(f"node{i - 1}", f"node{i}")
            continue
        k = rng.choice([1, 1, 2])
        for p in rng.sample(range(2, i), min(k, i - 2)):
            g.add_edge(f"node{p}", f"node{i}")
    if extra_input:
        g.add_node(Node(f"node{n + 2}", "Input1"))
        g.add_edge(f"node{n + 2}", f"node{n + 1}")
    return g


# -- brute force: states -----------------------------------------------------------------
def _anc_or_self(g: Graph, nodes: set[str]) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for nid in g.topological_order():
        if nid in nodes:
            s = {nid}
            for p in g.predecessors(nid):
                if p in nodes:
                    s |= out[p]
            out[nid] = frozenset(s)
    return out


def pipedream_view(g: Graph) -> set[str]:
    """Nodes PipeDream plans: raw inputs and unused ``__getitem__`` sinks removed."""
    inputs = {n for n in g.sources() if g[n].desc.startswith("Input")}
    keep = set(g.nodes) - inputs
    sinks = {n for n in keep if not [s for s in g.successors(n) if s in keep] and g[n].desc.startswith("__getitem__")}
    return keep - sinks


def pipedream_state_set(g: Graph, nodes: set[str]) -> list[frozenset[str]]:
    """From the first source, add any node with a predecessor inside, with all its ancestors."""
    anc = _anc_or_self(g, nodes)
    order = [n for n in g.nodes if n in nodes]
    first = next(n for n in order if not [p for p in g.predecessors(n) if p in nodes])
    seen = {frozenset({first})}
    todo = [frozenset({first})]
    while todo:
        d = todo.pop()
        for v in order:
            if v not in d and any(p in d for p in g.predecessors(v)):
                nd = d | anc[v]
                if nd not in seen:
                    seen.add(nd)
                    todo.append(nd)
    return sorted(seen, key=len)


def all_downset_set(g: Graph, base: frozenset[str]) -> list[frozenset[str]]:
    nodes = set(g.nodes)
    seen = set()
    todo = [base]
    while todo:
        d = todo.pop()
        for v in nodes - d:
            if all(p in d for p in g.predecessors(v)):
                nd = d | {v}
                if nd not in seen:
                    seen.add(nd)
                    todo.append(nd)
    return sorted(seen, key=len)


def pipedream_out_bytes(g: Graph, nodes: set[str], d: frozenset[str]) -> float:
    """Activation bytes of PipeDream's augmented antichain of downset d."""
    anc = {k: v - {k} for k, v in _anc_or_self(g, nodes).items()}
    maximal = [a for a in d if not any(s in d for s in g.successors(a) if s in nodes)]
    aug = set(maximal)
    for a in maximal:
        for p in anc[a]:
            if any(o not in anc[a] and o != a for o in g.successors(p) if o in nodes):
                aug.add(p)
    return sum(g[x].activation_bytes for x in aug)


def cut_bytes(g: Graph, d: frozenset[str]) -> float:
    return sum(g[a].activation_bytes for a in d if any(s not in d for s in g.successors(a)))


# -- brute force: costs ------------------------------------------------------------------
def _sums(g: Graph, nodes) -> tuple[float, float, float, float]:
    comp = sum(g[n].forward_ms + g[n].backward_ms for n in nodes) / 1000.0
    par = sum(g[n].parameter_size for n in nodes)
    act = sum(g[n].activation_bytes for n in nodes)
    return comp, par, act, act  # stash = activations (no profile.json here)


def brute_force(stage_cost, states: list[frozenset[str]], final: frozenset[str], N: int, straight: bool, fewer: bool,
                start: frozenset[str] = frozenset()) -> float:
    """min over chains start ⊂ D1 ⊂ … ⊂ final and replica counts of the slowest stage."""
    best = INF

    def rec(prev: frozenset[str], used: int, worst: float, first: bool) -> None:
        nonlocal best
        for d in states:
            if not (prev < d <= final):
                continue
            for r in ([1] if straight else range(1, N - used + 1)):
                if used + r > N:
                    continue
                c = stage_cost(prev, d, r, used, first)
                w = max(worst, c)
                if w >= best:
                    continue
                if d == final:
                    if used + r == N or (fewer and len(states) > 1):
                        best = w
                else:
                    rec(d, used + r, w, False)

    rec(start, 0, 0.0, True)
    return best


def bf_pipedream(g: Graph, N: int, bw: float, straight=False, fewer=False, memory=None, ratio=None) -> float:
    nodes = pipedream_view(g)
    states = pipedream_state_set(g, nodes)
    final = states[-1]

    def cost(prev, d, r, used, first):
        comp, par, act, _ = _sums(g, d - prev)
        t = (comp + (4 * (r - 1) * par) / (bw * r)) / r
        if ratio is not None and not first:
            t = max(t, 2.0 * pipedream_out_bytes(g, nodes, prev) / (bw * r) / ratio)
        if ratio is not None and not first and d != final:
            t = max(t, 2.0 * pipedream_out_bytes(g, nodes, d) / (bw * r) / ratio)
        if memory is not None and math.ceil((N - (used + r)) / r) * (act + par) > memory:
            return INF
        return t

    return brute_force(cost, states, final, N, straight, fewer)


def ours_stage_time(g, prev, d, r, start_slot, first, level: Level, sched: Schedule, speeds, memory, opt_states,
                    downstream_extra=0, inner=None):
    """pipeshift's model for one stage: the docstring of pipeshift.optimizer.cost, spelled out."""
    comp, par, _, stash = _sums(g, d - prev)
    if inner is not None:
        comp = inner
    else:
        comp /= min(speeds[start_slot:start_slot + r])
    M = sched.microbatches
    share = math.ceil(M / r) / M if sched.kind in ("flush", "gpipe") else 1 / r
    sync = r if sched.kind == "1f1b" else M
    ring = 0.0 if r == 1 else 2 * (r - 1) / r * par / level.bandwidth + 2 * (r - 1) * level.latency
    t = comp * share + ring / sync
    if not first:
        t = max(t, 2 * (level.latency + cut_bytes(g, prev) / level.bandwidth) / r)
    if memory is not None and inner is None:
        downstream = downstream_extra
        depth = math.ceil((downstream + r) / r)
        per = math.ceil(M / r)
        fl = {"1f1b": depth, "2bw": depth, "flush": min(depth, per), "gpipe": per}[sched.kind]
        versions = {"1f1b": fl, "2bw": 2, "flush": 1, "gpipe": 1}[sched.kind]
        if par * (versions + 1 + opt_states) + fl * stash > memory:
            return INF
    return t


def bf_ours(g: Graph, level: Level, N: int, sched: Schedule, straight=False, fewer=False, memory=None,
            speeds=None, opt_states=2.0) -> float:
    base = frozenset(n for n in g.sources() if g[n].desc.startswith("Input"))
    states = all_downset_set(g, base)
    final = states[-1]
    speeds = speeds or [1.0] * N

    def cost(prev, d, r, used, first):
        return ours_stage_time(g, prev, d, r, used, first, level, sched, speeds, memory, opt_states,
                               downstream_extra=N - used - r)

    return brute_force(cost, states, final, N, straight, fewer)


def bf_ours_two_levels(g: Graph, inner: Level, outer: Level, sched: Schedule, memory=None) -> float:
    base = frozenset(n for n in g.sources() if g[n].desc.startswith("Input"))
    states = all_downset_set(g, base)
    final = states[-1]
    total = inner.workers * outer.workers
    cache: dict[tuple, float] = {}

    def inner_best(prev, d):
        key = (prev, d)
        if key not in cache:
            sub = [s for s in states if prev < s <= d]

            def cost(p, q, r, used, first):
                return ours_stage_time(g, p, q, r, used, first, inner, sched, [1.0] * inner.workers, memory, 2.0,
                                       downstream_extra=inner.workers - used - r + (total - inner.workers))

            cache[key] = brute_force(cost, sub, d, inner.workers, False, False, start=prev)
        return cache[key]

    def cost(prev, d, r, used, first):
        t_in = inner_best(prev, d)
        if t_in == INF:
            return INF
        return ours_stage_time(g, prev, d, r, used, first, outer, sched, None, None, 2.0, inner=t_in)

    return brute_force(cost, states, final, outer.workers, False, False)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    if a == INF or b == INF:
        return a == b
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def _plan_value(g: Graph, topo: Topology, opt: PlanOptions) -> float:
    try:
        return make_plan(g, topo, opt).optimum
    except PipeshiftError:
        return INF


def _check_plan_shape(g: Graph, result, topo: Topology) -> None:
    seen: dict[str, int] = {}
    for i, st in enumerate(result.stages):
        assert st.nodes, "no stage may be empty"
        for n in st.nodes:
            assert n not in seen, f"{n} in stages {seen[n]} and {i}"
            seen[n] = i
    assert set(seen) == set(g.nodes)
    for a, b in g.edges:
        assert seen[a] <= seen[b], f"edge {a}->{b} goes backwards"
    workers = [w for st in result.stages for w in st.workers]
    assert len(workers) == len(set(workers)) and len(workers) <= topo.num_workers


# -- tests: brute force ------------------------------------------------------------------
CASES = [(seed, n, chain) for seed, n, chain in [(1, 5, False), (2, 6, False), (3, 6, True), (4, 7, False), (5, 5, True), (6, 6, False)]]


@pytest.mark.parametrize("seed,n,chain", CASES)
def test_pipedream_dp_equals_brute_force(seed: int, n: int, chain: bool) -> None:
    g = random_dag(seed, n, chain=chain, extra_input=seed % 2 == 0)
    rng = random.Random(seed)
    for N in (1, 2, 3, 4):
        for straight, fewer, ratio, mem in [(False, False, None, None), (False, False, 1.0, None),
                                            (True, False, 2.0, None), (False, True, 1.0, None),
                                            (True, True, None, None), (False, False, 1.0, "tight")]:
            bw = rng.choice([1e8, 1e9, 1e10])
            memory = None
            if mem == "tight":
                total = sum(x.activation_bytes + x.parameter_size for x in g)
                memory = total * rng.uniform(0.3, 1.2)
            want = bf_pipedream(g, N, bw, straight, fewer, memory, ratio)
            opt = PlanOptions(cost_model="pipedream", straight=straight, fewer_machines=fewer, memory_limit=memory,
                              compression=ratio, search="exact")
            topo = Topology((Level(N, bw),))
            got = _plan_value(g, topo, opt)
            assert _close(got, want), (N, straight, fewer, ratio, memory, got, want)


@pytest.mark.parametrize("seed,n,chain", CASES)
def test_pipeshift_dp_equals_brute_force(seed: int, n: int, chain: bool) -> None:
    g = random_dag(seed, n, chain=chain, extra_input=seed % 3 == 0)
    rng = random.Random(100 + seed)
    for N in (1, 2, 3, 4):
        for kind in ("1f1b", "flush", "gpipe", "2bw"):
            sched = Schedule(kind, rng.choice([1, 2, 4, 8]))
            level = Level(N, rng.choice([1e8, 1e9, 1e10]), rng.choice([0.0, 1e-4, 1e-3]))
            straight = rng.random() < 0.3
            fewer = rng.random() < 0.3
            memory = None
            speeds = None
            if not fewer and rng.random() < 0.4:
                total = sum(x.activation_bytes + 4 * x.parameter_size for x in g)
                memory = total * rng.uniform(0.2, 1.5)
            if not fewer and rng.random() < 0.4:
                speeds = [rng.choice([0.5, 1.0, 2.0]) for _ in range(N)]
            want = bf_ours(g, level, N, sched, straight, fewer, memory, speeds)
            opt = PlanOptions(straight=straight, fewer_machines=fewer, memory_limit=memory, schedule=sched, search="exact")
            topo = Topology((level,), tuple(speeds) if speeds else None)
            got = _plan_value(g, topo, opt)
            assert _close(got, want), (N, kind, straight, fewer, memory, speeds, got, want)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_pipeshift_two_levels_equal_brute_force(seed: int) -> None:
    g = random_dag(seed, 5, chain=seed == 11)
    inner, outer = Level(2, 1e10, 1e-5), Level(2, 1e9, 1e-4)
    for kind in ("1f1b", "flush"):
        sched = Schedule(kind, 4)
        for memory in (None, sum(x.activation_bytes + 4 * x.parameter_size for x in g) * 0.8):
            want = bf_ours_two_levels(g, inner, outer, sched, memory)
            got = _plan_value(g, Topology((inner, outer)), PlanOptions(schedule=sched, memory_limit=memory, search="exact"))
            assert _close(got, want), (kind, memory, got, want)


@pytest.mark.parametrize("model", ["pipeshift", "pipedream"])
def test_returned_stages_are_a_legal_split_that_costs_the_optimum(model: str) -> None:
    for seed in range(5):
        g = random_dag(40 + seed, 7)
        topo = Topology((Level(3, 1e9), Level(2, 1e8)))
        opt = PlanOptions(cost_model=model, compression=1.0 if model == "pipedream" else None, search="exact")
        result = make_plan(g, topo, opt)
        _check_plan_shape(g, result, topo)
        # the slowest stage, as the DP charged it, is the plan's time
        assert _close(max(st.dp_value for st in result.stages), result.optimum, 1e-12)


# -- tests: prefix states ----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_prefix_search_is_never_better_than_exact_and_close_on_compute_only(seed: int) -> None:
    g = random_dag(200 + seed, 8)
    for x in g:  # compute only: no parameters, no transfers
        x.parameter_size = 0.0
    for N in (2, 3, 4):
        topo = Topology((Level(N, 1e9),))
        base = dict(cost_model="pipedream", straight=True)
        exact = make_plan(g, topo, PlanOptions(**base, search="exact")).optimum
        prefix = make_plan(g, topo, PlanOptions(**base, search="prefix"))
        assert prefix.optimum >= exact * (1 - 1e-12)
        # a contiguous split of any topological order balances to within one node's time
        biggest = max((x.forward_ms + x.backward_ms) / 1000.0 for x in g)
        assert prefix.optimum <= exact + biggest + 1e-12
        _check_plan_shape(g, prefix, topo)


def test_auto_falls_back_to_prefixes_on_branchy_graphs() -> None:
    g = Graph()
    g.add_node(Node("node1", "Input0"))
    g.add_node(Node("node2", "stem", 1.0, 2.0, 1e6, 1e3))
    g.add_edge("node1", "node2")
    nid = 3
    join_prev = "node2"
    for _module in range(4):  # four 4-branch modules: far more downsets than the cap below
        ends = []
        for length in (2, 3, 3, 2):
            prev = join_prev
            for _ in range(length):
                g.add_node(Node(f"node{nid}", "Conv2d", 0.5, 1.0, 1e6, 1e4))
                g.add_edge(prev, f"node{nid}")
                prev = f"node{nid}"
                nid += 1
            ends.append(prev)
        g.add_node(Node(f"node{nid}", "cat", 0.1, 0.1, 4e6, 0))
        for e in ends:
            g.add_edge(e, f"node{nid}")
        join_prev = f"node{nid}"
        nid += 1
    topo = Topology((Level(4, 1e9),))
    result = make_plan(g, topo, PlanOptions(max_states=200))
    assert result.states.mode == "prefix" and result.states.size <= g.__len__()
    _check_plan_shape(g, result, topo)
    with pytest.raises(PipeshiftError, match="more than 200 states"):
        make_plan(g, topo, PlanOptions(max_states=200, search="exact"))


# -- tests: PipeDream's published optima -------------------------------------------------
def _reference_entries(profiles_dir: Path) -> list[dict]:
    return json.loads((profiles_dir / "reference.json").read_text())["entries"]


def test_reference_matches_pipedream(profiles_dir: Path) -> None:
    """Every entry of reference.json, through our command line with PipeDream's flags."""
    entries = _reference_entries(profiles_dir)
    assert len(entries) >= 11
    parser = build_parser("plan")
    for e in entries:
        argv = ["plan", "-f", str(profiles_dir / e["profile"]), *shlex.split(e["flags"]), "--cost-model", "pipedream"]
        args = parser.parse_args(argv)
        g = read_graph_txt(args.profile_filename)
        result = make_plan(g, topology_from_args(args), options_from_args(args))
        want = e["time_per_stage_s"]
        assert abs(result.optimum - want) <= 1e-6 * want, (e["profile"], e["flags"], result.optimum, want)
        assert result.states.mode == "exact" and result.states.size == e["states"]
        _check_plan_shape(g, result, topology_from_args(args))


# -- tests: command line and errors ------------------------------------------------------
def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    from pipeshift.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_writes_plan_dir(profiles_dir: Path, tmp_path: Path, capsys) -> None:
    # a profile with a sidecar profile.json: model, policy, batch size and FQNs reach the plan
    src = profiles_dir / "vgg16" / "graph.txt"
    work = tmp_path / "prof"
    work.mkdir()
    (work / "graph.txt").write_text(src.read_text())
    g = read_graph_txt(src)
    nodes = {nid: {"fqn": f"features.{i}"} for i, nid in enumerate(g.nodes) if not g[nid].is_input}
    model = {"callable": "pipeshift.models:vgg16", "kwargs": {}, "inputs": None, "input_shape": None}
    (work / "profile.json").write_text(json.dumps({"version": 1, "model": model, "leaf_policy": None,
                                                    "batch_size": 128, "nodes": nodes}))
    out = tmp_path / "plan"
    rc, stdout, stderr = _run(["plan", str(work / "graph.txt"), "-n", "2", "2", "-b", "1e10", "1e9",
                               "--schedule", "flush", "--microbatches", "8", "-o", str(out)], capsys)
    assert rc == 0, stderr
    assert "speed-up over data parallelism" in stdout and "replicas" in stdout
    plan = json.loads((out / "plan.json").read_text())
    for key in ("version", "graph", "model", "leaf_policy", "batch_size", "cost_model", "topology", "num_workers",
                "stages", "predicted", "memory_per_worker_bytes"):
        assert key in plan
    assert plan["model"] == model and plan["batch_size"] == 128
    assert plan["topology"]["levels"][1] == {"workers": 2, "bandwidth_bytes_per_s": 1e9, "latency_s": 0.0}
    ranks = [r for st in plan["stages"] for r in st["ranks"]]
    assert ranks == list(range(len(ranks))) and len(ranks) == plan["num_workers"]
    assert len(plan["memory_per_worker_bytes"]) == len(ranks)
    for st in plan["stages"]:
        assert st["replicas"] == len(st["ranks"]) and st["nodes"]
        assert st["fqns"] == [nodes[n]["fqn"] for n in st["nodes"] if n in nodes]
    p = plan["predicted"]
    assert p["throughput_samples_per_s"] == pytest.approx(128 / p["time_per_minibatch_s"])
    assert max(st["predicted"]["time_s"] for st in plan["stages"]) == pytest.approx(p["time_per_minibatch_s"])
    staged = read_graph_txt(out / "gpus=4.txt", sidecar=False)
    by_stage = {n: st["stage_id"] for st in plan["stages"] for n in st["nodes"]}
    assert {x.node_id: x.stage_id for x in staged} == by_stage
    assert (out / "gpus=4.dot").is_file()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["-n", "4", "4", "-b", "1e9"], "one bandwidth per level"),
        (["-n", "4", "x"], "not an integer"),
        (["-n", "0"], "positive integer"),
        (["-n", "2", "2"], "give one bandwidth per level"),
        (["-n", "4", "-b", "-5"], "positive number"),
        (["-n", "4", "--straight_pipeline", "-n", "64"], "places to cut"),
        (["-n", "4", "--memory-size", "1000"], "no plan fits"),
        (["-n", "2", "--worker-speeds", "1", "1", "1"], "3 values but the topology has 2 workers"),
        (["-n", "2", "--microbatches", "0"], "--microbatches"),
    ],
)
def test_impossible_requests_are_one_line_errors(profiles_dir: Path, capsys, flags, message) -> None:
    rc, stdout, stderr = _run(["plan", str(profiles_dir / "vgg16" / "graph.txt"), *flags], capsys)
    assert rc == 1
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "a_file").write_text("")
    good = tmp_path / "good.txt"
    write_graph_txt(random_dag(2, 4), good)
    rc, _, stderr = _run(["plan", str(good), "-n", "2", "-o", str(tmp_path / "a_file")], capsys)
    assert rc == 1 and "not a directory" in stderr
    bad = tmp_path / "graph.txt"
    bad.write_text("node1 -- Input0 -- forward_compute_time=x, backward_compute_time=0, activation_size=0, parameter_size=0\n")
    for argv, message in [
        (["plan", str(tmp_path / "missing.txt"), "-n", "2"], "no such file"),
        (["plan", str(bad), "-n", "2"], "graph.txt:1"),
        (["plan", "-n", "2"], "which graph"),
    ]:
        rc, _, stderr = _run(argv, capsys)
        assert rc == 1 and message in stderr and "Traceback" not in stderr, stderr
    topo = tmp_path / "topo.json"
    for content, message in [
        ("{", "invalid JSON"),
        ('{"levels": []}', "non-empty"),
        ('{"levels": [{"workers": 2}]}', "bandwidth_bytes_per_s"),
        ('{"hosts": ["a", "b"], "bandwidth_bytes_per_s": [[0, 1e9]]}', "2x2 matrix"),
    ]:
        topo.write_text(content)
        g = random_dag(1, 4)
        write_graph_txt(g, tmp_path / "g.txt")
        rc, _, stderr = _run(["plan", str(tmp_path / "g.txt"), "--topology", str(topo)], capsys)
        assert rc == 1 and message in stderr, stderr


def test_topology_file_shapes(tmp_path: Path, capsys) -> None:
    g = random_dag(3, 6)
    write_graph_txt(g, tmp_path / "g.txt")
    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps({"levels": [{"workers": 2, "bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5},
                                             {"workers": 2, "bandwidth_bytes_per_s": 1e9}]}))
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"hosts": ["a", "b"], "bandwidth_bytes_per_s": [[0, 2e9], [1e9, 0]],
                                 "latency_s": [[0, 1e-4], [2e-4, 0]], "workers_per_host": 2,
                                 "intra_host": {"bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5}}))
    rc, _, err = _run(["plan", str(tmp_path / "g.txt"), "--topology", str(levels), "-o", str(tmp_path / "a"), "-q"], capsys)
    assert rc == 0, err
    rc, _, err = _run(["plan", str(tmp_path / "g.txt"), "--topology", str(hosts), "-o", str(tmp_path / "b"), "-q"], capsys)
    assert rc == 0, err
    b = json.loads((tmp_path / "b" / "plan.json").read_text())["topology"]["levels"]
    assert b == [{"workers": 2, "bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5},
                 {"workers": 2, "bandwidth_bytes_per_s": 1e9, "latency_s": 2e-4}]


def test_worker_speeds_move_work_to_fast_workers() -> None:
    g = random_dag(9, 8, chain=True)
    for x in g:
        x.parameter_size = 0.0
        x.activation_size = 0.0
    topo = Topology((Level(2, 1e9),), (1.0, 3.0))
    result = make_plan(g, topo, PlanOptions(straight=True))
    slow, fast = result.stages  # worker 0 (speed 1) runs stage 0
    assert result.stages[0].workers == [0]
    work = [sum(g[n].forward_ms + g[n].backward_ms for n in st.nodes) for st in (slow, fast)]
    assert work[1] > work[0]
    with pytest.raises(PipeshiftError, match="worker-speeds"):
        make_plan(g, topo, PlanOptions(cost_model="pipedream"))


def test_every_node_placed_with_getitem_sinks_and_late_inputs() -> None:
    g = random_dag(21, 6, extra_input=True)
    g.add_node(Node("node99", "__getitem__", 0.0, 0.0, 4.0, 0.0))
    g.add_edge("node4", "node99")
    for model in ("pipedream", "pipeshift"):
        topo = Topology((Level(3, 1e9),))
        result = make_plan(g, topo, PlanOptions(cost_model=model, straight=True))
        _check_plan_shape(g, result, topo)
        stage_of = {n: i for i, st in enumerate(result.stages) for n in st.nodes}
        assert stage_of["node1"] == 0 and stage_of["node8"] == 0  # raw inputs pinned to stage 0
        if model == "pipedream":  # it drops unused __getitem__ sinks; they go back with their producer
            assert stage_of["node99"] == stage_of["node4"]


def test_exhaustive_small_chain_all_split_counts() -> None:
    """On a chain, the number of stages a straight pipeline uses equals the workers asked for."""
    g = random_dag(7, 6, chain=True)
    for N in range(1, 7):
        result = make_plan(g, Topology((Level(N, 1e9),)), PlanOptions(straight=True))
        assert len(result.stages) == N
    with pytest.raises(PipeshiftError, match="places to cut"):
        make_plan(g, Topology((Level(8, 1e9),)), PlanOptions(straight=True))
    result = make_plan(g, Topology((Level(8, 1e9),)), PlanOptions(straight=True, fewer_machines=True))
    assert len(result.stages) <= 6


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_glueing_zero_cost_nodes_keeps_the_optimum(seed: int) -> None:
    """Zero-cost sinks (unused __getitem__) and sources only multiply states; glued, the optimum stays."""
    from pipeshift.optimizer.planner import planning_graph
    from pipeshift.optimizer.states import all_downsets

    g = random_dag(seed, 6)
    for i, p in enumerate(["node3", "node4", "node5"]):
        g.add_node(Node(f"node{50 + i}", "__getitem__(1)", 0.0, 0.0, 2e6, 0.0))
        g.add_edge(p, f"node{50 + i}")
    g.add_node(Node("node60", "hidden", 0.0, 0.0, 1e6, 0.0))
    g.add_edge("node60", "node5")
    g.add_edge("node60", "node6")
    arrays = planning_graph(g, "pipeshift")
    full = all_downsets(arrays, 10**6)
    glued = all_downsets(arrays, 10**6, glue=True)
    assert glued.size < full.size
    assert full.size == len(all_downset_set(g, frozenset({"node1"})))
    for N in (2, 3, 4):
        topo = Topology((Level(N, 1e9, 1e-4),))
        for sched, fewer in itertools.product((Schedule("1f1b", 1), Schedule("flush", 4)), (True, False)):
            want = make_plan(g, topo, PlanOptions(schedule=sched, fewer_machines=fewer, max_states=full.size)).optimum
            result = make_plan(g, topo, PlanOptions(schedule=sched, fewer_machines=fewer, max_states=glued.size))
            assert result.states.order_name == "glued" and result.states.size == glued.size
            _check_plan_shape(g, result, topo)
            if fewer:  # idle workers allowed: the glued space keeps an optimal plan
                assert _close(result.optimum, want), (N, sched, result.optimum, want)
            else:  # a subset of the full space: never better (a zero-cost-only stage may idle a worker)
                assert result.optimum >= want * (1 - 1e-12)


def test_heterogeneous_machines_on_two_levels() -> None:
    """Two machines of two workers, the second machine half as fast: a legal plan that costs its optimum."""
    g = random_dag(77, 8)
    topo = Topology((Level(2, 1e10, 1e-5), Level(2, 1e9, 1e-4)), (1.0, 1.0, 0.5, 0.5))
    result = make_plan(g, topo, PlanOptions(schedule=Schedule("flush", 4)))
    _check_plan_shape(g, result, topo)
    assert _close(max(st.dp_value for st in result.stages), result.optimum, 1e-12)
    homogeneous = make_plan(g, Topology(topo.levels), PlanOptions(schedule=Schedule("flush", 4)))
    assert result.optimum >= homogeneous.optimum  # slower machines never help


def test_picture_falls_back_to_dot_source(profiles_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)  # what pipeshift.graph.render asks
    rc, _, err = _run(["plan", str(profiles_dir / "vgg16" / "graph.txt"), "-n", "2", "-o", str(tmp_path), "-q"], capsys)
    assert rc == 0
    assert (tmp_path / "gpus=2.dot").is_file() and not (tmp_path / "gpus=2.svg").exists()
    assert err.count("\n") == 1 and "warning" in err and "dot" in err
