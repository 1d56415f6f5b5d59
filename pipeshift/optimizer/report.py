"""Turning a :class:`~pipeshift.optimizer.planner.PlanResult` into the files of a plan directory.

``plan.json`` (CONTRIBUTING.md's schema, plus per-stage ``costs`` the simulator reads),
``gpus=N.txt`` (the graph with ``stage_id``, readable by PipeDream's tools), a graphviz picture
coloured by stage, and the terminal summary table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeshift.graph import Graph, write_graph_txt
from pipeshift.graph.render import render_graph
from pipeshift.optimizer import cost as ps_cost
from pipeshift.optimizer import pipedream_cost as pd_cost
from pipeshift.optimizer.planner import PlanOptions, PlanResult, predicted_latency_s
from pipeshift.optimizer.states import stash_bytes
from pipeshift.optimizer.topology import Topology
from pipeshift.textable import text_table


def _fqns(graph: Graph, nodes: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for nid in nodes:
        fqn = graph[nid].meta.get("fqn") if graph[nid].meta else None
        if isinstance(fqn, str) and fqn:
            seen.setdefault(fqn, None)
    return list(seen)


def _tie_terms(graph: Graph, result: PlanResult, topo: Topology) -> tuple[list[float], list[float]]:
    """Per stage: the tied bytes its node sums count more than once (it holds one copy), and the
    seconds of one all-reduce of the ties it shares with other stages — a ring over every rank of
    every holder, on the outermost level a cut between the holders crosses (cost.py's docstring)."""
    K = len(result.stages)
    stage_of = {nid: i for i, st in enumerate(result.stages) for nid in st.nodes}
    count: dict[str, dict[int, int]] = {}
    size: dict[str, float] = {}
    for nid, i in stage_of.items():
        for name, nbytes in ((graph[nid].meta or {}).get("shared_parameters") or {}).items():
            count.setdefault(name, {}).setdefault(i, 0)
            count[name][i] += 1
            size[name] = float(nbytes)
    dup, tie_s = [0.0] * K, [0.0] * K
    for name, per_stage in count.items():
        for i, c in per_stage.items():
            dup[i] += (c - 1) * size[name]
        if len(per_stage) < 2:
            continue
        lo, hi = min(per_stage), max(per_stage)
        level = max((result.stages[s].cut_level or 0) for s in range(lo + 1, hi + 1))
        ranks = sum(result.stages[s].replicas * result.stages[s].tp for s in per_stage)
        ring = float(ps_cost.ring_allreduce(np.float64(size[name]), ranks, topo.levels[level].bandwidth,
                                            topo.levels[level].latency))
        for i in per_stage:
            tie_s[i] += ring
    return dup, tie_s


def stage_table(graph: Graph, result: PlanResult, topo: Topology, opt: PlanOptions) -> list[dict[str, Any]]:
    """Per-stage facts and predictions, in pipeline order (the ``stages`` of plan.json)."""
    stage_of = {nid: i for i, st in enumerate(result.stages) for nid in st.nodes}
    K = len(result.stages)
    # bytes crossing the cut after each stage: produced at or before it, consumed after it
    last_use = {nid: max((stage_of[s] for s in graph.successors(nid)), default=-1) for nid in graph.nodes}
    cut_bytes = [0.0] * K
    for nid, use in last_use.items():
        for s in range(stage_of[nid], use):
            cut_bytes[s] += graph[nid].activation_bytes / (opt.compression or 1.0)
    n_levels = len(topo.levels)
    rows: list[dict[str, Any]] = []
    next_rank = 0
    downstream = [sum(st.replicas for st in result.stages[i + 1 :]) for i in range(K)]
    memory = opt.memory()
    index = {nid: i for i, nid in enumerate(result.arrays.node_ids)}
    tied_twice, tie_s = _tie_terms(graph, result, topo) if opt.cost_model == "pipeshift" else ([0.0] * K, [0.0] * K)
    for i, st in enumerate(result.stages):
        nodes = [graph[n] for n in st.nodes]
        fwd = sum(n.forward_ms for n in nodes) / 1000.0
        bwd = 0.0 if opt.serving else sum(n.backward_ms for n in nodes) / 1000.0
        params = float(sum(n.parameter_size for n in nodes)) - tied_twice[i]
        tp_extra: dict[str, Any] = {}
        if st.tp > 1:  # the cost model's view of the TP group (cost.py): shards' share, all-reduces, 1/t weights
            fwd, bwd, params, tp_extra = _tp_stage(st, nodes, index, result, topo, opt, fwd, bwd)
        activation = float(sum(n.activation_bytes for n in nodes))
        stash = activation if opt.serving else float(sum(stash_bytes(n) for n in nodes))
        speed = min(topo.speed_of(w) for w in st.workers)
        per_level = {n_levels - 1 - pos: count for pos, (_, count) in enumerate(st.slots)}
        if opt.cost_model == "pipedream":
            allreduce = sum(
                (4 * (per_level.get(lv, 1) - 1) * params) / (topo.levels[lv].bandwidth * per_level.get(lv, 1))
                for lv in range(n_levels)
            )
            mem = pd_cost.stage_memory(activation, params, downstream[i], st.replicas)
        else:
            allreduce = float(
                sum(
                    ps_cost.ring_allreduce(np.float64(params), per_level.get(lv, 1), topo.levels[lv].bandwidth, topo.levels[lv].latency)
                    for lv in range(n_levels)
                )
            )
            sched = opt.schedule
            mem = ps_cost.stage_memory(sched, memory, params, stash, downstream[i], st.replicas)
        link = None
        if i + 1 < K and topo.links is not None:
            link = _measured_link(topo, st.workers, result.stages[i + 1].workers, cut_bytes[i])
        elif i + 1 < K:
            lv = result.stages[i + 1].cut_level
            level = topo.levels[lv if lv is not None else 0]
            link = {"level": lv, "bandwidth_bytes_per_s": level.bandwidth, "latency_s": level.latency}
        ranks = list(range(next_rank, next_rank + len(st.workers)))
        next_rank += len(st.workers)
        rows.append(
            {
                "stage_id": i,
                "nodes": list(st.nodes),
                "fqns": _fqns(graph, st.nodes),
                "replicas": st.replicas,
                **({"tp": st.tp, "tp_groups": [ranks[k:k + st.tp] for k in range(0, len(ranks), st.tp)]}
                   if st.tp > 1 else {}),
                "ranks": ranks,
                "workers": list(st.workers),
                "predicted": {"compute_s": (fwd + bwd) / speed, "time_s": st.dp_value, "memory_bytes": float(mem)},
                "costs": {
                    "forward_s": fwd / speed,
                    "backward_s": bwd / speed,
                    "parameter_bytes": params,
                    "stash_bytes_per_microbatch": stash,
                    "output_bytes": cut_bytes[i] if i + 1 < K else 0.0,
                    "output_link": link,
                    "allreduce_s": allreduce,
                    **({"tie_allreduce_s": tie_s[i]} if tie_s[i] and not opt.serving else {}),
                    **tp_extra,
                },
            }
        )
    return rows


def _tp_stage(st: Any, nodes: list[Any], index: dict[str, int], result: PlanResult, topo: Topology,
              opt: PlanOptions, fwd: float, bwd: float) -> tuple[float, float, float, dict[str, Any]]:
    """Forward/backward seconds, per-worker parameter bytes and the TP all-reduce time of a TP stage."""
    t, tp = st.tp, opt.tp
    assert tp.shard is not None
    level = topo.levels[0]
    ids = np.array([index[n.node_id] for n in nodes if n.node_id in index], dtype=np.int64)
    g = result.arrays
    f = float(tp.node_compute(g.forward_ms[ids], t, ids).sum()) / 1000.0
    b = 0.0 if opt.serving else float(tp.node_compute(g.backward_ms[ids], t, ids).sum()) / 1000.0
    comm = float(tp.node_time_s(np.zeros(len(ids)), t, level.bandwidth, level.latency, ids).sum())  # the rings alone
    params = float(tp.node_params(g.parameter[ids], t, ids).sum())
    shard_fqns = int(np.count_nonzero(tp.shard[ids]))
    return f, b, params, {"tp_allreduce_s": comm, "tp_sharded_nodes": shard_fqns,
                          "tp_bandwidth_bytes_per_s": tp.bandwidth or level.bandwidth}


def _measured_link(topo: Topology, senders: list[int], receivers: list[int], nbytes: float) -> dict[str, Any]:
    """The slowest measured pair a boundary crosses (every sender may feed every receiver)."""
    assert topo.links is not None
    times = topo.links.cut_time(nbytes)
    a, b = max(((x, y) for x in senders for y in receivers), key=lambda xy: times[xy])
    return {"level": None, "from_worker": a, "to_worker": b, "from": topo.worker_name(a), "to": topo.worker_name(b),
            "bandwidth_bytes_per_s": float(topo.links.bandwidth[a, b]), "latency_s": float(topo.links.latency[a, b]),
            "time_s": float(times[a, b])}


def plan_document(
    graph: Graph,
    graph_path: str,
    result: PlanResult,
    topo: Topology,
    opt: PlanOptions,
    profile: dict[str, Any],
) -> dict[str, Any]:
    stages = stage_table(graph, result, topo, opt)
    total_compute = sum(n.forward_ms + (0.0 if opt.serving else n.backward_ms) for n in graph) / 1000.0
    g = result.arrays
    # one replica of the whole model holds each tied parameter once
    total_params = float(sum(n.parameter_size for n in graph)) - float(((g.tie_nodes.sum(axis=1) - 1) * g.tie_bytes).sum())
    if opt.cost_model == "pipedream":
        comp = result.arrays.compute_ms.sum() / 1000.0
        dp = pd_cost.data_parallel_time(comp, float(result.arrays.parameter.sum()), [(lv.workers, lv.bandwidth) for lv in topo.levels])
        one = comp
    else:
        slowest = min(topo.speed_of(w) for w in range(topo.num_workers))
        fastest = max(topo.speed_of(w) for w in range(topo.num_workers))
        dp = ps_cost.data_parallel_time(
            total_compute / slowest, total_params, [(lv.workers, lv.bandwidth, lv.latency) for lv in topo.levels], opt.schedule
        )
        one = total_compute / fastest
    t = result.optimum
    notes = list(result.notes)
    if t > one * (1 + 1e-9):
        slow = [st["costs"]["output_link"] for st in stages if st["costs"]["output_link"]]
        worst = max(slow, key=lambda lk: lk.get("time_s") or 0.0, default=None)
        where = (f"; its slowest boundary crosses {worst['from']} -> {worst['to']} "
                 f"({worst['bandwidth_bytes_per_s'] / 1e6:.4g} MB/s)") if worst and "from" in worst else ""
        notes.append(f"the plan is slower than one worker ({one / t:.3g}x){where}: "
                     "the network costs more than the split saves; try --use-fewer-machines")
    batch = profile.get("batch_size")
    memory_per_worker = [st["predicted"]["memory_bytes"] for st in stages for _ in st["ranks"]]
    tp_doc = {}
    if opt.tp.active:
        tp_doc = {"tp": {"degrees": list(opt.tp.degrees), "bandwidth_bytes_per_s": opt.tp.bandwidth,
                         "latency_s": opt.tp.latency, "efficiency": opt.tp.efficiency}}
    if profile.get("tp_plan") is not None:
        tp_doc["tp_plan"] = profile["tp_plan"]
    rank_to_worker = [w for st in stages for w in st["workers"]]
    return {
        "version": 1,
        "graph": graph_path,
        "model": profile.get("model"),
        "leaf_policy": profile.get("leaf_policy"),
        "batch_size": batch,
        "cost_model": opt.cost_model,
        "topology": topo.to_json(),
        "num_workers": len(rank_to_worker),
        "available_workers": topo.num_workers,
        "objective": "serve" if opt.serving else "train",
        "schedule": {"kind": opt.schedule.kind, "microbatches": opt.schedule.microbatches},
        "memory": {"limit_bytes": opt.memory_limit, "optimizer_states": opt.optimizer_states},
        "search": {
            "mode": result.states.mode,
            "states": result.states.size,
            "order": result.states.order_name,
            "candidates": result.search_candidates,
            "straight_pipeline": opt.straight,
            "use_fewer_machines": opt.fewer_machines,
            "activation_compression_ratio": opt.compression,
            "level_splits": [[list(s) for s in level] for level in result.level_splits],
        },
        "stages": stages,
        "predicted": {
            "time_per_minibatch_s": t,
            "throughput_samples_per_s": (batch / t) if isinstance(batch, (int, float)) and t > 0 else None,
            "minibatches_per_s": 1.0 / t if t > 0 else None,
            "one_worker_time_s": one,
            "data_parallel_time_s": dp,
            "speedup_over_data_parallel": dp / t if t > 0 else None,
            "speedup_over_one_worker": one / t if t > 0 else None,
            **({"batch_latency_s": predicted_latency_s(graph, result.stages, result.states, result.arrays, topo, opt),
                "latency_slo_s": opt.latency_slo_s} if opt.serving else {}),
        },
        "memory_per_worker_bytes": memory_per_worker,
        "rank_to_worker": rank_to_worker,
        "placement": "measured links" if any(st.placed for st in result.stages) else "levels",
        **tp_doc,
        "notes": notes,
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_plan_dir(out_dir: Path, graph: Graph, doc: dict[str, Any]) -> list[Path]:
    """Write plan.json, gpus=N.txt and the picture; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    plan_file = out_dir / "plan.json"
    plan_file.write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
    written.append(plan_file)
    staged = graph.copy()
    for st in doc["stages"]:
        for nid in st["nodes"]:
            staged[nid].stage_id = st["stage_id"]
    n = doc["available_workers"]
    txt = out_dir / f"gpus={n}.txt"
    write_graph_txt(staged, txt)
    written.append(txt)
    title = "; ".join(f"stage {st['stage_id']}: {st['replicas']} x tp {st['tp']} on ranks "
                      + " ".join(",".join(map(str, g)) for g in st["tp_groups"])
                      for st in doc["stages"] if "tp" in st)
    written.extend(write_picture(staged, out_dir / f"gpus={n}", title))
    return written


def write_picture(graph: Graph, stem: Path, title: str = "") -> list[Path]:
    """The graph coloured by stage: ``stem.dot`` always, ``stem.svg`` when graphviz's dot exists."""
    picture = render_graph(graph, stem, title=title)
    if picture.warning:
        print(f"warning: {picture.warning}", file=sys.stderr)
    return picture.written


def _ranks(r: list[int]) -> str:
    return f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" if r == list(range(r[0], r[-1] + 1)) else ",".join(map(str, r))


def summary(doc: dict[str, Any]) -> str:
    """The terminal table: one row per stage, then the predicted totals."""
    rows = []
    for st in doc["stages"]:
        nodes = st["nodes"]
        rows.append(
            {
                "stage": st["stage_id"],
                "layers": len(nodes),
                "first..last": f"{nodes[0]}..{nodes[-1]}" if len(nodes) > 1 else nodes[0],
                "replicas": st["replicas"],
                **({"tp": st.get("tp", 1)} if any("tp" in s for s in doc["stages"]) else {}),
                "ranks": " ".join(_ranks(g) for g in st["tp_groups"]) if "tp_groups" in st else _ranks(st["ranks"]),
                "workers": ",".join(map(str, st["workers"])),
                "compute ms": round(st["predicted"]["compute_s"] * 1000, 3),
                "time ms": round(st["predicted"]["time_s"] * 1000, 3),
                "memory GB": round(st["predicted"]["memory_bytes"] / 1e9, 3),
            }
        )
    table = text_table(rows)
    p = doc["predicted"]
    tput = p["throughput_samples_per_s"]
    lines = [
        table,
        "",
        f"cost model {doc['cost_model']}, search {doc['search']['mode']} ({doc['search']['states']} states), "
        f"{doc['num_workers']} of {doc['available_workers']} workers",
        f"predicted time per minibatch: {p['time_per_minibatch_s'] * 1000:.4f} ms"
        + (f"  ({tput:.1f} samples/s)" if tput else ""),
        f"speed-up over data parallelism: {p['speedup_over_data_parallel']:.3f}x   "
        f"over one worker: {p['speedup_over_one_worker']:.3f}x",
    ]
    for st in doc["stages"]:
        link = st["costs"].get("output_link")
        if link and "from" in link:
            lines.append(f"boundary {st['stage_id']}->{st['stage_id'] + 1}: {st['costs']['output_bytes'] / 1e6:.4g} MB "
                         f"over {link['from']} -> {link['to']} ({link['bandwidth_bytes_per_s'] / 1e6:.4g} MB/s, "
                         f"{link['latency_s'] * 1e6:.4g} us): {link['time_s'] * 1000:.4g} ms per microbatch")
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    return "\n".join(lines)
