"""``pipeshift plan A B C --objective serve``: one plan per model, placed so every rank's resident budget holds.

The graphs are written here: chains whose first layer holds most of the weights. Planned alone,
every model puts that layer on rank 0; placed together, the big stages must land on different
ranks for the resident bytes of each rank to stay within ``--memory-size``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pipeshift.cli import main
from pipeshift.errors import PipeshiftError
from pipeshift.optimizer.cli import add_arguments, run_several
from pipeshift.optimizer.colocate import shard_bytes, worst_rank
from pipeshift.plan import read_plan

BIG = 4e8


def chain(path: Path, params: list[float]) -> Path:
    lines = ["node1 -- Input0 -- forward_compute_time=0.000, backward_compute_time=0.000, activation_size=1000.0, "
             "parameter_size=0.000"]
    for k, p in enumerate(params, start=2):
        lines.append(f"node{k} -- Linear(in_features=10, out_features=10) -- forward_compute_time=5.000, "
                     f"backward_compute_time=10.000, activation_size=1000.0, parameter_size={p:.3f}")
    lines += [f"\tnode{k} -- node{k + 1}" for k in range(1, len(params) + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_models(tmp_path: Path, n_models: int, budget: float, *extra: str) -> int:
    graphs = [f"m{i}={chain(tmp_path / f'm{i}' / 'graph.txt', [BIG, 1e6, 1e6, 1e6])}" for i in range(n_models)]
    return main(["plan", *graphs, "--objective", "serve", "-n", "4", "--straight-pipeline",
                 "--memory-size", str(budget), "-o", str(tmp_path / "plans"), "-q", *extra])


def test_big_stages_of_several_models_land_on_different_ranks(tmp_path):
    budget = 1.5 * BIG  # one big stage per rank, never two
    assert plan_models(tmp_path, 3, budget) == 0
    placement = json.loads((tmp_path / "plans" / "placement.json").read_text())
    docs = []
    for name in ("m0", "m1", "m2"):
        path = tmp_path / "plans" / name / "plan.json"
        read_plan(path)  # a valid plan, as codegen reads it
        docs.append(json.loads(path.read_text()))
    big_rank = [next(r for r, n in shard_bytes(d).items() if n >= BIG) for d in docs]
    assert len(set(big_rank)) == 3, big_rank
    for rank, per_model in placement["resident_bytes_per_rank"].items():
        assert sum(per_model.values()) <= budget, (rank, per_model)
    assert worst_rank(docs, None)[1] <= budget
    # alone, each of them would have put its big stage on rank 0
    assert main(["plan", str(tmp_path / "m0" / "graph.txt"), "--objective", "serve", "-n", "4", "--straight-pipeline",
                 "-o", str(tmp_path / "alone"), "-q"]) == 0
    alone = json.loads((tmp_path / "alone" / "plan.json").read_text())
    assert next(r for r, n in shard_bytes(alone).items() if n >= BIG) == 0


def test_max_loaded_counts_only_the_largest_shards_and_impossible_budgets_say_why(tmp_path, capsys):
    # five models, four ranks: two big stages share a rank; with two resident at most that still fits 2 x BIG
    assert plan_models(tmp_path, 5, 2.2 * BIG, "--max-loaded", "2") == 0
    placement = json.loads((tmp_path / "plans" / "placement.json").read_text())
    assert placement["worst_rank"]["bytes"] <= 2.2 * BIG
    # with every model resident it cannot fit: one line naming the rank and the models
    assert plan_models(tmp_path / "all", 5, 1.5 * BIG) == 1
    err = capsys.readouterr().err
    assert "rank" in err and "bytes of" in err and len(err.strip().splitlines()) == 1
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(PipeshiftError, match="--objective serve"):
        run_several(p.parse_args(["a.txt", "b.txt", "-o", str(tmp_path / "x")]))
