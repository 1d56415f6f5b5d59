"""Split a profiled graph into pipeline stages: `pipeshift plan graph.txt -n 4 4 -b 10e9 1.25e9 -o plan/`.

PipeDream's optimizer flags work unchanged (``-f``, ``-n/--all_num_machines``,
``-b/--network_bandwidths``, ``-s/--memory_size``, ``--straight_pipeline``,
``--use_memory_constraint``, ``--use_fewer_machines``, ``--activation_compression_ratio``,
``-o/--output_directory``); ``--cost-model pipedream`` reproduces its optimum exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.jsonfile import read_json_object
from pipeshift.graph import Graph, read_graph_txt
from pipeshift.optimizer import cost as ps_cost
from pipeshift.optimizer.planner import COST_MODELS, SEARCHES, PlanOptions, TPOptions, make_plan, planning_graph, with_tp_nodes
from pipeshift.optimizer.report import plan_document, summary, write_plan_dir
from pipeshift.optimizer.topology import Topology, from_flags, read_topology, with_speeds
from pipeshift.schedule.registry import SCHEDULES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("graph", nargs="*", metavar="GRAPH",
                   help="graph.txt written by `pipeshift profile` (or PipeDream's profiler); with --objective serve, "
                        "several ([NAME=]GRAPH) for one multi-model server: a plan each, placed together")
    p.add_argument("-f", "--profile_filename", "--profile-filename", dest="profile_filename", help="same as GRAPH (PipeDream's flag)")
    p.add_argument("-o", "--output_directory", "--output-directory", dest="output", help="plan directory to write")
    p.add_argument("-n", "--all_num_machines", "--num-workers", dest="num_workers", nargs="+", metavar="N",
                   help="workers per level, innermost first (e.g. -n 4 4: 4 machines of 4 GPUs)")
    p.add_argument("-b", "--network_bandwidths", "--bandwidths", dest="bandwidths", nargs="+", metavar="BYTES_PER_S",
                   help="bandwidth of each level in bytes/s, innermost first (default 1e9 for one level)")
    p.add_argument("--latencies", nargs="+", metavar="SECONDS", help="per-message latency of each level (default 0)")
    p.add_argument("--topology", metavar="FILE", help="topology JSON (e.g. from `pipeshift netcheck`) instead of -n/-b")
    p.add_argument("--worker-speeds", nargs="+", metavar="X", help="relative speed of each worker (1 = the profiled machine)")
    p.add_argument("-s", "--memory_size", "--memory-size", dest="memory_size", metavar="BYTES",
                   help="memory per worker; pipeshift's model enforces it when given, PipeDream's with --use_memory_constraint")
    p.add_argument("--use_memory_constraint", "--use-memory-constraint", dest="use_memory_constraint", action="store_true")
    p.add_argument("--straight_pipeline", "--straight-pipeline", dest="straight", action="store_true",
                   help="no replication: one worker per stage")
    p.add_argument("--use_fewer_machines", "--use-fewer-machines", dest="fewer", action="store_true",
                   help="allow plans that leave workers idle when that is faster")
    p.add_argument("--activation_compression_ratio", "--activation-compression-ratio", dest="compression",
                   metavar="R", help="activations shrink by R on the wire (PipeDream counts transfers only when given)")
    p.add_argument("--cost-model", choices=COST_MODELS, default="pipeshift")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule the plan is for")
    p.add_argument("--objective", choices=("train", "serve"), default="train",
                   help="serve: forward-only costs, replicas never synchronise, memory for weights + activations "
                        "in flight (for `pipeshift serve`)")
    p.add_argument("--max-loaded", metavar="K", default=None,
                   help="several graphs: models resident at once on the server (default: all); each rank's K "
                        "largest shards must fit --memory-size")
    p.add_argument("--latency-slo", metavar="MS", default=None,
                   help="with --objective serve: the fastest plan whose predicted batch latency is at most MS")
    p.add_argument("--microbatches", type=str, default="4", metavar="M", help="microbatches per minibatch (default 4)")
    p.add_argument("--optimizer-states", default="2", metavar="K",
                   help="optimizer state per weight, in weight copies (2 = Adam, 1 = SGD momentum, 0 = SGD)")
    p.add_argument("--search", choices=SEARCHES, default="auto",
                   help="exact: every downset; prefix: prefixes of topological orders; auto: exact while small")
    p.add_argument("--max-states", default="2000", metavar="S", help="largest exact state space (auto/exact)")
    p.add_argument("--batch-size", metavar="B", help="samples per profiled batch (default: profile.json's)")
    tp = p.add_argument_group("tensor parallelism (a stage is stage × replicas × TP degree)")
    tp.add_argument("--tp", nargs="+", default=["1"], metavar="T",
                    help="allowed TP degrees per stage, e.g. --tp 1 2 4 (default 1: none); sharded layers come from "
                         "profile.json's tp_plan")
    tp.add_argument("--tp-bandwidth", metavar="BYTES_PER_S", help="bandwidth of a TP group's all-reduces "
                                                                 "(default: the innermost level's)")
    tp.add_argument("--tp-latency", metavar="SECONDS", help="per-message latency of a TP group's all-reduces "
                                                           "(default: the innermost level's)")
    tp.add_argument("--tp-efficiency", default="1", metavar="E",
                    help="fraction of the ideal 1/t speed-up a sharded layer reaches (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary table")


MAX_WORKERS = 4096
MAX_MICROBATCHES = 1 << 16


def _numbers(values: list[str] | None, flag: str, kind: type[float] | type[int] = float) -> list[Any] | None:
    if values is None:
        return None
    out = []
    for v in values:
        try:
            x = kind(v) if kind is float else int(v)
        except ValueError:
            raise PipeshiftError(f"{flag}: {v!r} is not {'a number' if kind is float else 'an integer'}") from None
        if kind is float and not math.isfinite(x):
            raise PipeshiftError(f"{flag}: {v!r} is not a finite number")
        out.append(x)
    return out


def _one(value: str | None, flag: str, kind: type[float] | type[int] = float, minimum: float = 0.0,
         strict: bool = True, maximum: float | None = None) -> Any:
    if value is None:
        return None
    [x] = _numbers([value], flag, kind) or [None]
    if x < minimum or (strict and x == minimum):
        raise PipeshiftError(f"{flag}: {value!r} must be {'>' if strict else '>='} {minimum:g}")
    if maximum is not None and x > maximum:
        raise PipeshiftError(f"{flag}: {value!r} is more than {maximum:g}")
    return x


def _workers(values: list[str] | None) -> list[int] | None:
    """-n per level, each positive, their product at most :data:`MAX_WORKERS` (the DP's cost grows with it)."""
    counts = _numbers(values, "-n", int)
    if counts is None:
        return None
    total = 1
    for c in counts:
        if c < 1:
            raise PipeshiftError(f"-n: {c} workers; each level needs a positive integer")
        total *= c
        if total > MAX_WORKERS:
            raise PipeshiftError(f"-n {' '.join(map(str, counts))}: more than {MAX_WORKERS} workers in all; "
                                 "plan a smaller cluster (or a replicated stage's share of it)")
    return counts


def read_profile_json(graph_path: Path) -> dict[str, Any]:
    """The sibling profile.json's top-level fields the plan records (empty if there is none)."""
    side = graph_path.with_name("profile.json")
    if not side.is_file():
        return {}
    data = read_json_object(side, "profile.json")
    batch = data.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise InputFileError(str(side), None, f"batch_size must be a positive integer, got {batch!r}")
    return {k: data.get(k) for k in ("model", "leaf_policy", "batch_size", "tp_plan")}


def options_from_args(args: argparse.Namespace) -> PlanOptions:
    microbatches = int(_one(args.microbatches, "--microbatches", int, 1, strict=False, maximum=MAX_MICROBATCHES))
    memory = _one(args.memory_size, "--memory_size")
    if args.cost_model == "pipedream":
        limit = (memory if memory is not None else 16e9) if args.use_memory_constraint else None
    else:
        limit = memory if memory is not None else (16e9 if args.use_memory_constraint else None)
    serving = args.objective == "serve"
    slo = _one(args.latency_slo, "--latency-slo")
    if slo is not None and not serving:
        raise PipeshiftError("--latency-slo needs --objective serve")
    return PlanOptions(
        cost_model=args.cost_model,
        straight=args.straight,
        fewer_machines=args.fewer,
        memory_limit=limit,
        compression=_one(args.compression, "--activation_compression_ratio"),
        schedule=ps_cost.Schedule(ps_cost.SERVE if serving else args.schedule, microbatches),
        latency_slo_s=slo / 1000.0 if slo is not None else None,
        optimizer_states=float(_one(args.optimizer_states, "--optimizer-states", float, 0.0, strict=False)),
        search=args.search,
        max_states=int(_one(args.max_states, "--max-states", int, 1, strict=False, maximum=10 ** 7)),
        tp=TPOptions(
            degrees=tuple(sorted(set(_numbers(args.tp, "--tp", int) or [1]))),
            bandwidth=_one(args.tp_bandwidth, "--tp-bandwidth"),
            latency=_one(args.tp_latency, "--tp-latency", float, 0.0, strict=False),
            efficiency=float(_one(args.tp_efficiency, "--tp-efficiency")),
        ),
    )


def _with_tp_plan(opt: PlanOptions, profile: dict[str, Any], graph: Graph, graph_path: Path) -> PlanOptions:
    """The TP plan profile.json recorded, checked, and the per-node TP arrays (when --tp allows t > 1)."""
    if any(t < 1 for t in opt.tp.degrees):
        raise PipeshiftError(f"--tp: degrees must be positive integers, got {list(opt.tp.degrees)}")
    if not opt.tp.active:
        return opt
    if opt.tp.efficiency > 1:
        raise PipeshiftError("--tp-efficiency must be in (0, 1]")
    recorded = profile.get("tp_plan")
    modules = recorded.get("modules") if isinstance(recorded, dict) else None
    side = graph_path.with_name("profile.json")
    if not isinstance(modules, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in modules.items()):
        raise InputFileError(str(side), None, "--tp needs the 'tp_plan' that `pipeshift profile` records "
                                              "(an object {\"modules\": {FQN: style}}); re-run profile")
    leaves = recorded.get("leaves", {}) if isinstance(recorded, dict) else {}
    if not isinstance(leaves, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())
            for v in leaves.values()):
        raise InputFileError(str(side), None, "tp_plan.leaves must be an object {FQN: {\"sharded_fraction\": "
                                              "number, \"row_parallel\": number}}")
    opt = dataclasses.replace(opt, tp=dataclasses.replace(opt.tp, modules=modules, leaves=leaves))
    return with_tp_nodes(graph, planning_graph(graph, opt.cost_model), opt)


def topology_from_args(args: argparse.Namespace) -> Topology:
    speeds = _numbers(args.worker_speeds, "--worker-speeds")
    if args.topology:
        if args.num_workers or args.bandwidths or args.latencies:
            raise PipeshiftError("give either --topology or -n/-b/--latencies, not both")
        return with_speeds(read_topology(args.topology), speeds)
    return from_flags(
        _workers(args.num_workers),
        _numbers(args.bandwidths, "-b"),
        _numbers(args.latencies, "--latencies"),
        speeds,
    )


def graph_reference(graph_path: Path, output: str | None) -> str:
    """plan.json's ``graph``: relative to the plan's own directory, so the plan can be read from anywhere
    (``master --plan``, a copy beside the stage package) without knowing where ``plan`` ran."""
    if not output:
        return str(graph_path)
    return os.path.relpath(graph_path.resolve(), Path(output).resolve())


def run(args: argparse.Namespace) -> int:
    if args.graph and args.profile_filename and args.graph != [args.profile_filename]:
        raise PipeshiftError("give the graph once: as GRAPH or as -f, not both")
    if len(args.graph) > 1:
        return run_several(args)
    if args.max_loaded is not None:
        raise PipeshiftError("--max-loaded is for several graphs (a plan for a multi-model server)")
    graph_arg = args.graph[0] if args.graph else args.profile_filename
    if not graph_arg:
        raise PipeshiftError("which graph? give GRAPH (graph.txt) or -f graph.txt")
    opt = options_from_args(args)
    topo = topology_from_args(args)
    graph_path = Path(graph_arg)
    graph = read_graph_txt(graph_path)
    profile = read_profile_json(graph_path)
    opt = _with_tp_plan(opt, profile, graph, graph_path)
    if args.batch_size is not None:
        profile["batch_size"] = int(_one(args.batch_size, "--batch-size", int, 1, strict=False))
    t0 = time.perf_counter()
    result = make_plan(graph, topo, opt)
    elapsed = time.perf_counter() - t0
    doc = plan_document(graph, graph_reference(graph_path, args.output), result, topo, opt, profile)
    doc["search"]["planner_seconds"] = elapsed
    if args.output:
        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise PipeshiftError(f"{out}: exists and is not a directory (-o names the plan directory)")
        try:
            write_plan_dir(out, graph, doc)
        except OSError as e:
            raise PipeshiftError(f"{out}: cannot write the plan ({e.strerror or e})") from None
    if not args.quiet:
        print(summary(doc))
        if args.output:
            print(f"wrote {Path(args.output) / 'plan.json'} (planned in {elapsed:.3f} s)")
    return 0


def run_several(args: argparse.Namespace) -> int:
    """One plan per graph for a multi-model server, placed so that every rank's resident budget holds."""
    import dataclasses
    import json

    from pipeshift.optimizer.colocate import colocate

    if args.objective != "serve":
        raise PipeshiftError("several graphs make a plan for a multi-model server: add --objective serve")
    if not args.output:
        raise PipeshiftError("several graphs: -o DIR (each model's plan goes to DIR/NAME/)")
    max_loaded = _one(args.max_loaded, "--max-loaded", int, 1, strict=False)
    models: dict[str, tuple[Path, Any, dict[str, Any]]] = {}
    for k, text in enumerate(args.graph):
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text).parent.name or f"model{k}", text
        if not name or "/" in name or name in (".", ".."):
            raise PipeshiftError(f"{text!r}: a model name cannot be empty or a path")
        if name in models:
            raise PipeshiftError(f"{text!r}: the model name {name} is given twice (name them: NAME=GRAPH)")
        graph_path = Path(path)
        models[name] = (graph_path, read_graph_txt(graph_path), read_profile_json(graph_path))
    opt = options_from_args(args)
    topo = topology_from_args(args)
    if args.batch_size is not None:
        for _, _, profile in models.values():
            profile["batch_size"] = int(_one(args.batch_size, "--batch-size", int, 1, strict=False))
    out = Path(args.output)

    def plan_one(name: str, limit: float | None) -> dict[str, Any]:
        graph_path, graph, profile = models[name]
        try:
            result = make_plan(graph, topo, dataclasses.replace(opt, memory_limit=limit))
        except PipeshiftError as e:
            raise PipeshiftError(f"model {name} ({graph_path}): {e}") from None
        return plan_document(graph, graph_reference(graph_path, str(out / name)), result, topo, opt, profile)

    inner = topo.levels[0].workers if len(topo.levels) > 1 else None
    t0 = time.perf_counter()
    placed, summary_doc = colocate(list(models), plan_one, opt.memory_limit, max_loaded, inner)
    summary_doc["planner_seconds"] = time.perf_counter() - t0
    if out.exists() and not out.is_dir():
        raise PipeshiftError(f"{out}: exists and is not a directory (-o names the plan directory)")
    try:
        for p in placed:
            write_plan_dir(out / p.name, models[p.name][1], p.doc)
        (out / "placement.json").write_text(json.dumps(summary_doc, indent=1) + "\n")
    except OSError as e:
        raise PipeshiftError(f"{out}: cannot write the plans ({e.strerror or e})") from None
    if not args.quiet:
        for p in placed:
            print(f"== {p.name} (ranks shifted by {p.shift})")
            print(summary(p.doc))
        worst = summary_doc["worst_rank"]
        print(f"resident bytes per rank (the {max_loaded or len(placed)} largest shards): worst rank "
              f"{worst['rank']} holds {worst['bytes']:.4g} bytes of {', '.join(worst['models'])}")
        print(f"wrote {out}/NAME/plan.json for {', '.join(models)} and {out / 'placement.json'}")
    return 0
