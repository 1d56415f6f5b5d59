"""Several models on one set of serving ranks: plans whose stages keep every rank's resident budget.

``pipeshift plan a/graph.txt b/graph.txt … --objective serve -n N --memory-size B [--max-loaded K]``
plans every model for serving on the same N workers and then places them together: a rank of a
multi-model server (``pipeshift serve --model …``) holds one shard of each model that is resident,
and at most K models are resident at once, so what must fit in a rank's budget B is the sum of
its K largest shards (every model when K is not given).

Each model is first planned alone within B (the serving objective: weights plus activations in
flight). Their stages are then *rotated* over the ranks — stage ranks ``r → (r + shift) mod W``,
which changes no predicted time on a one-level topology, and on a hierarchical one only shifts by
whole innermost groups are tried — choosing, largest model first, the shift that keeps the worst
rank's resident bytes lowest, so big stages of different models land on different ranks. If some
rank still exceeds B, every model is re-planned within B / K (then any K shards fit by
construction) and placed again; if that is impossible, the error names the rank, its bytes and
the models.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence
from typing import Any

from pipeshift.errors import PipeshiftError


@dataclasses.dataclass
class Placed:
    name: str
    doc: dict[str, Any]  # plan.json (ranks rotated)
    shift: int = 0


def shard_bytes(doc: dict[str, Any]) -> dict[int, float]:
    """Resident bytes per rank of one plan: each stage's weights on each of its ranks."""
    out: dict[int, float] = {}
    for st in doc["stages"]:
        for r in st["ranks"]:
            out[r] = out.get(r, 0.0) + float(st["costs"]["parameter_bytes"])
    return out


def worst_rank(docs: Sequence[dict[str, Any]], max_loaded: int | None) -> tuple[int, float, list[int]]:
    """The rank whose K largest shards weigh most: (rank, bytes, indices of those models)."""
    per_rank: dict[int, list[tuple[float, int]]] = {}
    for i, doc in enumerate(docs):
        for r, n in shard_bytes(doc).items():
            per_rank.setdefault(r, []).append((n, i))
    best: tuple[int, float, list[int]] = (-1, -1.0, [])
    for r, items in sorted(per_rank.items()):
        top = heapq.nlargest(max_loaded or len(items), items)
        total = sum(n for n, _ in top)
        if total > best[1]:
            best = (r, total, [i for _, i in top])
    return best


def rotated(doc: dict[str, Any], shift: int) -> dict[str, Any]:
    """``doc`` with every stage on ranks (and workers) moved by ``shift`` modulo the plan's width."""
    width = doc["num_workers"]
    out = dict(doc)
    stages = []
    for st in doc["stages"]:
        st = dict(st)
        st["ranks"] = [(r + shift) % width for r in st["ranks"]]
        st["workers"] = [(w + shift) % width for w in st["workers"]]
        stages.append(st)
    out["stages"] = stages
    by_rank = sorted((r, w, st["predicted"]["memory_bytes"]) for st in stages for r, w in zip(st["ranks"], st["workers"]))
    out["rank_to_worker"] = [w for _, w, _ in by_rank]
    out["memory_per_worker_bytes"] = [m for _, _, m in by_rank]
    return out


def _shifts(doc: dict[str, Any], inner: int | None) -> list[int]:
    """Rotations that keep the predicted times: any on one level; whole innermost groups otherwise."""
    width = doc["num_workers"]
    if width != doc["available_workers"] or any(sorted(st["ranks"]) != sorted(st["workers"]) for st in doc["stages"]):
        return [0]  # a plan on chosen workers (measured links, fewer machines): keep it where it is
    step = 1 if inner is None else inner
    return list(range(0, width, step)) if width % step == 0 else [0]


def place(plans: dict[str, dict[str, Any]], max_loaded: int | None, inner: int | None) -> list[Placed]:
    """Rotate each plan, largest first, to keep the worst rank's K largest shards smallest."""
    order = sorted(plans, key=lambda n: -sum(shard_bytes(plans[n]).values()))
    placed: list[Placed] = []
    for name in order:
        doc = plans[name]
        best: tuple[float, int] | None = None
        for s in _shifts(doc, inner):
            trial = [p.doc for p in placed] + [rotated(doc, s)]
            worst = worst_rank(trial, max_loaded)[1]
            if best is None or worst < best[0] - 1e-9:
                best = (worst, s)
        assert best is not None
        placed.append(Placed(name, rotated(doc, best[1]) if best[1] else doc, best[1]))
    by_name = {p.name: p for p in placed}
    return [by_name[n] for n in plans]


def colocate(names: Sequence[str], plan_one: Callable[[str, float | None], dict[str, Any]], budget: float | None,
             max_loaded: int | None, inner: int | None) -> tuple[list[Placed], dict[str, Any]]:
    """Plan every model (``plan_one(name, memory_limit)``) and place them together within ``budget`` per rank."""
    if max_loaded is not None and max_loaded < 1:
        raise PipeshiftError("--max-loaded must be >= 1")
    k = min(max_loaded or len(names), len(names))
    plans = {n: plan_one(n, budget) for n in names}
    placed = place(plans, max_loaded, inner)
    tightened = False
    if budget is not None and worst_rank([p.doc for p in placed], max_loaded)[1] > budget and k > 1:
        tightened = True
        try:
            plans = {n: plan_one(n, budget / k) for n in names}
        except PipeshiftError as e:
            r, total, who = worst_rank([p.doc for p in placed], max_loaded)
            raise PipeshiftError(
                f"no placement keeps every rank within --memory-size {budget:.4g} bytes with {k} models resident: "
                f"rank {r} would hold {total:.4g} bytes of {', '.join(placed[i].name for i in who)}, and planning "
                f"each model within {budget / k:.4g} bytes fails ({e})") from None
        placed = place(plans, max_loaded, inner)
    r, total, who = worst_rank([p.doc for p in placed], max_loaded)
    if budget is not None and total > budget:
        raise PipeshiftError(f"no placement keeps every rank within --memory-size {budget:.4g} bytes: rank {r} would "
                             f"hold {total:.4g} bytes of {', '.join(placed[i].name for i in who)}")
    per_rank: dict[int, dict[str, float]] = {}
    for p in placed:
        for rank, n in shard_bytes(p.doc).items():
            per_rank.setdefault(rank, {})[p.name] = n
    summary = {
        "version": 1, "objective": "serve", "budget_bytes": budget, "max_loaded": max_loaded,
        "models": {p.name: {"plan": f"{p.name}/plan.json", "rank_shift": p.shift,
                            "stage_ranks": [st["ranks"] for st in p.doc["stages"]],
                            "batch_latency_s": p.doc["predicted"].get("batch_latency_s")} for p in placed},
        "resident_bytes_per_rank": {str(rank): d for rank, d in sorted(per_rank.items())},
        "worst_rank": {"rank": r, "bytes": total, "models": [placed[i].name for i in who]},
        "replanned_within_budget_over_k": tightened,
    }
    return placed, summary
