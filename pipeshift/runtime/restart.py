"""How a job restarts: the exit code that asks for it, and the plan the restarted job runs.

After a failure or a resize every rank ends; the elastic supervisor (``pipeshift launch --local N
--elastic``) or torchrun starts the job again, possibly on another number of ranks, and
:func:`resume_plan` picks the plan: the partition recorded in the checkpoint it resumes from,
re-split for the new number of workers when that changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan, parse_plan, read_plan
from pipeshift.runtime import checkpoint as ckpt

if TYPE_CHECKING:  # the policy (numpy, the graph) is imported only when a restart re-plans
    from pipeshift.runtime.policy import Chain

EXIT_REGROUP = 75  # every rank exits with this after a resize: restart me with elastic.json's world size
ELASTIC_FILE = "elastic.json"


# -- plans after a restart ----------------------------------------------------------------------


def find_graph(plan: Plan, package_dir: Path | None, explicit: str | None) -> Path | None:
    """The profiled graph.txt behind ``plan``: ``--graph``, else the plan's ``graph`` where it resolves."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise PipeshiftError(f"--graph {explicit}: no such file")
        return p
    named = plan.graph
    if named is None or "\x00" in named:
        return None
    g = Path(named)
    candidates = [g]
    if package_dir is not None and not g.is_absolute():  # plan.json's graph is relative to the plan's directory
        candidates = [package_dir / g, g, package_dir.parent / g, package_dir / g.name, package_dir.parent / g.name]
    return next((c for c in candidates if c.is_file()), None)


def load_chain(graph: Path | None, optimizer: str) -> Chain | None:
    """The policy's view of the model (per-node times); ``None`` without a graph."""
    if graph is None:
        return None
    from pipeshift.graph.graphtxt import read_graph_txt
    from pipeshift.runtime.policy import chain_from_graph

    return chain_from_graph(read_graph_txt(graph), optimizer=optimizer)


def replan_for_workers(plan: Plan, workers: int, chain: Chain | None = None) -> Plan:
    """``plan`` re-split into ``workers`` single-rank stages (after a shrink or a grow).

    With the profiled graph (``chain``) this is the policy's exact straight-pipeline DP on the
    profiled times; without it, the nodes in plan order are split into equal counts.
    """
    from pipeshift.runtime.policy import ReplanRequest, builtin_replan, stages_of

    order = [n for stage in stages_of(plan) for n in stage]
    if chain is not None and sorted(chain.node_ids) == sorted(order):
        cut = np.zeros(len(chain) + 1)
        request = ReplanRequest(node_ids=list(chain.node_ids), node_times_s=np.tile(chain.node_times_s, (workers, 1)),
                                speed_factors=np.ones(workers), cut_comm_s=cut, current_stages=stages_of(plan),
                                glued=chain.glued)
        stages = builtin_replan(request)
        fqn_of = chain.node_fqns
        how = "profiled times"
    else:
        # without times: equal node counts, inputs kept with the next node
        bounds = np.linspace(0, len(order), workers + 1).round().astype(int)
        stages = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        fqn_of = {}
        how = "equal node counts"
    if len(stages) != workers or any(not s for s in stages):
        raise PipeshiftError(f"cannot split {len(order)} nodes over {workers} workers")
    out = {k: v for k, v in plan.doc.items() if k not in ("stages", "predicted", "memory_per_worker_bytes")}
    out["num_workers"] = workers
    out["stages"] = [{"stage_id": k, "nodes": list(nodes), "fqns": list(dict.fromkeys(fqn_of[n] for n in nodes
                                                                                     if n in fqn_of)),
                      "replicas": 1, "ranks": [k]} for k, nodes in enumerate(stages)]
    out["replanned"] = {"workers": workers, "from": how}
    return parse_plan(out, f"{plan.source} re-planned for {workers} workers")


def resume_plan(checkpoint_dir: str | None, world_size: int, package_plan: Plan | None,
                chain: Chain | None = None) -> tuple[Plan | None, str]:
    """The plan a (re)started job runs: the checkpoint's, re-planned if the worker count changed.

    ``None`` means "the stage package as it is". The checkpoint records the plan in force when it
    was written (``plan.json`` in its step directory), so a restart after any number of switches
    resumes on the same partition — every FQN loads onto any partition anyway.
    """
    if not checkpoint_dir:
        return None, ""
    root = Path(checkpoint_dir)
    if not (root / ckpt.LATEST).exists() and not (root / "meta.json").exists():
        return None, ""
    where = ckpt.choose(root, lambda meta: {"plan.json"})[0]  # the stage files are each rank's to check
    saved = where / "plan.json"
    plan = read_plan(saved) if saved.is_file() else None
    base = plan or package_plan
    if base is None:
        return None, ""
    if base.world_size == world_size:
        return plan, (f"the partition of checkpoint {where.name}" if plan else "")
    new = replan_for_workers(base, world_size, chain)
    return new, (f"checkpoint {where.name} ran on {base.world_size} workers; re-planned for {world_size} "
                 f"({new.doc['replanned']['from']})")
