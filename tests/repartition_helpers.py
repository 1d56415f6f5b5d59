"""Shared by the repartitioning tests: a codegen package of a tiny MLP, plans over it, runs, references.

The plans are written by hand over the model's captured graph (node ids as codegen sees them),
with a graph.txt of made-up, equal node times beside them, so no profiler run is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from helpers import PY, REPO, accumulate, assert_same_weights, final_weights, run_bounded, wait_until
from pipeshift.codegen import generate_package
from pipeshift.graph.capture import capture, to_graph
from pipeshift.graph.graphtxt import write_graph_txt
from pipeshift.spec import ModelSpec

# the shared harness, re-exported for the repartitioning tests that reach it as ``h.<name>``
__all__ = ["BATCH", "NODES", "PY", "REPO", "SPEC", "assert_same_weights", "env", "final_weights", "graph_txt", "jsonl",
           "launch", "package", "plan", "reference", "wait_until"]

SPEC = ModelSpec("pipeshift.models:mlp", {"in_features": 8, "width": 12, "depth": 6, "num_classes": 4}, seed=11)
NODES = [f"node{i}" for i in range(1, 13)]  # node1 is the input, node2..node12 the layers
BATCH = 4


def graph_txt(out: Path) -> Path:
    """The MLP's graph with every operation at 1 ms forward + 1 ms backward."""
    bundle = SPEC.build()
    graph = to_graph(capture(bundle.model, bundle.example_inputs(BATCH)))
    for node in graph.nodes.values():
        if not node.is_input:
            node.forward_ms = node.backward_ms = 1.0
    path = out / "graph.txt"
    write_graph_txt(graph, path)
    return path


def plan(out: Path, name: str, bounds: list[int], ranks: list[list[int]]) -> Path:
    """A plan.json cutting node1..node12 at ``bounds`` (positions in NODES, 0 and 12 implied)."""
    cuts = [0, *bounds, len(NODES)]
    stages = [{"stage_id": k, "nodes": NODES[a:b], "replicas": len(r), "ranks": r}
              for k, (a, b, r) in enumerate(zip(cuts, cuts[1:], ranks))]
    data = {"version": 1, "graph": "graph.txt", "model": SPEC.to_json(), "leaf_policy": None, "batch_size": BATCH,
            "num_workers": sum(len(r) for r in ranks), "stages": stages}
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def package(out: Path, bounds: list[int], ranks: list[list[int]]) -> Path:
    """plan + graph.txt in ``out``, and the stage package generated from it in ``out/stages``."""
    out.mkdir(parents=True, exist_ok=True)
    graph_txt(out)
    start = plan(out, "plan", bounds, ranks)
    return generate_package(json.loads(start.read_text()), out / "stages")


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("PIPESHIFT_FAULT", None)
    e.pop("PIPESHIFT_ATTEMPT", None)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    e.update(extra)
    return e


def launch(workdir: Path, workers: int, args: list[str], *, elastic: list[str] | None = None, limit: float = 150,
           environ: dict[str, str] | None = None) -> tuple[int, str]:
    """``pipeshift launch --local N --elastic … train-args`` (always the supervisor: explicit ranks)."""
    cmd = [PY, "-m", "pipeshift", "launch", "--local", str(workers), "--elastic", *(elastic or []), "--",
           "stages", "--no-progress", "--threads", "1", "--timeout", "60", "--output-dir", "out",
           "--checkpoint-dir", "ck", *args]
    return run_bounded(cmd, workdir, limit, environ or env())


def reference(steps: int, microbatches: int, make_optimizer) -> torch.nn.Module:
    """Single-process training with the same minibatches: flush's exact equivalent."""
    return accumulate(SPEC.build(), steps, microbatches, BATCH, make_optimizer)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
