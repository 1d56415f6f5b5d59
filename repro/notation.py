"""The PipeDream paper's notation for a pipeline configuration.

PipeDream (SOSP'19) writes a configuration as the replication factor of each stage in pipeline
order, joined by dashes: "15-1" is a first stage replicated on 15 workers followed by a stage on
one worker; "2-1-1" is three stages, the first on two workers. One stage on every worker is pure
data parallelism, written as the worker count ("16"); a pipeline whose stages all run on one
worker is called "straight". Comparing our plans with the paper's table needs exactly this
mapping, so it lives in one place and is tested on hand-made stage lists.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

STRAIGHT = "straight"


def stage_replicas(stages: Iterable[object]) -> list[int]:
    """Each stage's replication factor, in pipeline order.

    Accepts plan.json stage dicts (``{"replicas": 3, ...}``), the planner's ``Stage`` objects
    (``.replicas``) or plain integers, so the notation reads any form a plan comes in.
    """
    out: list[int] = []
    for stage in stages:
        if isinstance(stage, Mapping):
            value = stage.get("replicas")
        elif isinstance(stage, int) and not isinstance(stage, bool):
            value = stage
        else:
            value = getattr(stage, "replicas", None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"stage {len(out)}: replicas must be a positive integer, got {value!r}")
        out.append(value)
    return out


def paper_notation(replicas: Sequence[int]) -> str:
    """"16" for one stage on 16 workers, "straight" for ≥ 2 unreplicated stages, else "15-1"."""
    counts = stage_replicas(replicas)
    if not counts:
        raise ValueError("a configuration needs at least one stage")
    if len(counts) == 1:
        return str(counts[0])
    if all(r == 1 for r in counts):
        return STRAIGHT
    return "-".join(str(r) for r in counts)


def canonical(config: str) -> str:
    """The paper's spelling of a configuration written either way ("Straight", "1-1-1-1", "15-1")."""
    text = config.strip().lower()
    if text == STRAIGHT:
        return STRAIGHT
    parts = text.split("-")
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"not a configuration in the paper's notation: {config!r}")
    return paper_notation([int(p) for p in parts])


def same_configuration(ours: str, paper: str) -> bool:
    """Whether two configurations in the paper's notation describe the same replication pattern."""
    return canonical(ours) == canonical(paper)


def hierarchical_replica_counts(level_workers: Sequence[int]) -> set[int]:
    """Replication factors a hierarchical plan can give one stage on this topology.

    PipeDream's hierarchical optimizer (and ours) replicates a stage over whole units of each
    level — k of the servers, then j of the GPUs inside each — so a stage's factor is a product
    of one count per level, each at most that level's size. On 4 servers of 4 GPUs that is
    {1, 2, 3, 4, 6, 8, 9, 12, 16}: 15 is not among them.
    """
    return {math.prod(combo) for combo in itertools.product(*(range(1, n + 1) for n in level_workers))}


def expressible(config: str, level_workers: Sequence[int]) -> bool:
    """Whether a hierarchical plan on ``level_workers`` (innermost first) can have this configuration.

    "straight" is always expressible (every stage on one worker); otherwise each stage's factor
    must be a product of per-level counts (:func:`hierarchical_replica_counts`) and the factors
    must fit in the workers there are.
    """
    text = canonical(config)
    if text == STRAIGHT:
        return True
    counts = [int(p) for p in text.split("-")]
    allowed = hierarchical_replica_counts(level_workers)
    return all(r in allowed for r in counts) and sum(counts) <= math.prod(level_workers)
