"""Summarise a pipeshift file: a graph.txt, a plan.json, or a stage package directory.

``pipeshift show FILE`` prints a table (pandas) and, with ``--picture``, draws the graph with
graphviz where it is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeshift.jsonfile import read_json_object
from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.graph import read_graph_txt
from pipeshift.graph.render import render_graph


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="graph.txt, plan.json (or its directory), or a stage package directory")
    p.add_argument("--top", type=int, default=15, help="rows of the heaviest-node table")
    p.add_argument("--picture", default=None, metavar="STEM", help="also draw the graph to STEM.svg (or STEM.dot)")


def _graph_table(path: Path, top: int) -> pd.DataFrame:
    g = read_graph_txt(path)
    rows = [
        {
            "node": n.node_id,
            "desc": n.desc[:40],
            "fwd_ms": n.forward_ms,
            "bwd_ms": n.backward_ms,
            "act_MB": n.activation_bytes / 1e6,
            "param_MB": n.parameter_size / 1e6,
            "stage": n.stage_id,
        }
        for n in g
    ]
    df = pd.DataFrame(rows)
    total = df["fwd_ms"].sum() + df["bwd_ms"].sum()
    print(f"{path}: {len(g)} nodes, {len(g.edges)} edges, {total:.3f} ms fwd+bwd, {df['param_MB'].sum():.2f} MB params")
    return df.assign(total_ms=df.fwd_ms + df.bwd_ms).nlargest(top, "total_ms").drop(columns="total_ms")


def _plan_table(path: Path) -> pd.DataFrame:
    plan = read_json_object(path)
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages:
        raise InputFileError(str(path), None, "no 'stages' list: not a plan.json")
    rows = []
    for s in stages:
        if not isinstance(s, dict):
            raise InputFileError(str(path), None, "each stage must be an object")
        pred = s.get("predicted", {}) if isinstance(s.get("predicted"), dict) else {}
        rows.append(
            {
                "stage": s.get("stage_id"),
                "nodes": len(s.get("nodes", [])),
                "replicas": s.get("replicas"),
                "tp": s.get("tp", 1),
                "ranks": " ".join(",".join(map(str, g)) for g in s["tp_groups"])
                if isinstance(s.get("tp_groups"), list) else ",".join(map(str, s.get("ranks", []))),
                "time_ms": (pred.get("time_s") or 0) * 1e3,
                "memory_MB": (pred.get("memory_bytes") or 0) / 1e6,
            }
        )
    p = plan.get("predicted", {})
    print(f"{path}: {len(stages)} stages on {plan.get('num_workers')} workers, cost model {plan.get('cost_model')}")
    if isinstance(p, dict) and p:
        print("  " + ", ".join(f"{k}={v:.4g}" for k, v in p.items() if isinstance(v, (int, float))))
    return pd.DataFrame(rows)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        if (path / "conf.json").is_file():
            conf = read_json_object(path / "conf.json")
            print(f"{path}: stage package, stage_to_rank_map={conf.get('stage_to_rank_map')}")
            path = path / "plan.json"
        elif (path / "plan.json").is_file():
            path = path / "plan.json"
        elif (path / "graph.txt").is_file():
            path = path / "graph.txt"
        else:
            raise PipeshiftError(f"{path}: no graph.txt, plan.json or conf.json inside")
    if not path.exists():
        raise InputFileError(str(path), None, "no such file")
    if path.suffix == ".json":
        table = _plan_table(path)
    else:
        table = _graph_table(path, args.top)
        if args.picture:
            picture = render_graph(read_graph_txt(path), args.picture, title=str(path))
            if picture.warning:
                print(f"warning: {picture.warning}", file=sys.stderr)
            if picture.path is not None:
                print(f"picture: {picture.path}")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False))
    return 0
