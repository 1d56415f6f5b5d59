"""Forward-only routing of a stage package: who receives what from whom, and what the outputs are.

Training's :class:`~pipeshift.runtime.topology.Topology` routes the criterion and the target
too; serving drops both. The package's last entry is the criterion reading
``[output, …, "target"]``: its other inputs are the model's outputs, which go back to the
front end from whichever stage makes them. Raw inputs come from the front end to every stage
that reads them. Batch ``b`` of stage ``s`` runs on replica ``b % replicas(s)``, so both ends of
every transfer know their peer without asking (as in training); a replica of a tensor-parallel
stage is its TP group, whose first rank talks to the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from pipeshift.errors import PipeshiftError
from pipeshift.runtime.topology import TARGET, Topology, build_topology

FRONTEND = -1  # the source of raw inputs, in ``Routing.inbound``


@dataclasses.dataclass(frozen=True)
class Routing:
    topology: Topology  # the package's own routing (stages, ranks, replicas), criterion included
    modules: tuple[tuple[int, ...], ...]  # per stage: the package entries it runs (criterion excluded)
    inbound: tuple[dict[int, tuple[str, ...]], ...]  # per stage: source stage (or FRONTEND) -> names
    outbound: tuple[dict[int, tuple[str, ...]], ...]  # per stage: destination stage -> names
    outputs: tuple[str, ...]  # the model's outputs, in order
    returns: tuple[tuple[str, ...], ...]  # per stage: the outputs it sends to the front end

    @property
    def stage_ranks(self) -> tuple[tuple[int, ...], ...]:
        return self.topology.stage_ranks

    @property
    def num_stages(self) -> int:
        return self.topology.num_stages

    @property
    def raw_inputs(self) -> tuple[str, ...]:
        return self.topology.raw_inputs

    def stage_of(self, rank: int) -> int:
        return self.topology.stage_of(rank)

    def rank_for(self, stage: int, batch: int) -> int:
        return self.topology.rank_for(stage, batch)

    def group_for(self, stage: int, batch: int) -> list[int]:
        """The ranks of ``stage`` that compute ``batch``: one rank, or a whole TP group (leader first)."""
        leader = self.rank_for(stage, batch)
        ranks = self.stage_ranks[stage]
        start = ranks.index(leader)
        return list(ranks[start:start + self.topology.tp_degree(stage)])

    def ranks_for(self, batch: int) -> list[int]:
        """Every rank that runs ``batch`` (all of a TP group: its ranks compute together)."""
        return [r for s in range(self.num_stages) for r in self.group_for(s, batch)]


def build_routing(io: Sequence[tuple[Sequence[str], Sequence[str]]], module_to_stage: Sequence[int],
                  stage_ranks, source: str = "conf.json", tp_degrees: Mapping[int, int] | None = None) -> Routing:
    """``tp_degrees``: a TP stage's group computes each batch together and only its first rank
    (the leader, :meth:`Topology.rank_for`) receives and sends; None serves every rank of a
    stage as a replica of it."""
    topo = build_topology(io, module_to_stage, stage_ranks, source=source, tp_degrees=tp_degrees)
    io = [(tuple(i), tuple(o)) for i, o in io]
    crit = len(io) - 1
    outputs = tuple(n for n in io[crit][0] if n != TARGET)
    stages = topo.num_stages
    modules = tuple(tuple(i for i in topo.modules_of(s) if i != crit) for s in range(stages))
    producer: dict[str, int] = {}
    for k, (_ins, outs) in enumerate(io[:crit]):
        for n in outs:
            producer[n] = topo.module_to_stage[k]
    inbound: list[dict[int, list[str]]] = [{} for _ in range(stages)]
    outbound: list[dict[int, list[str]]] = [{} for _ in range(stages)]
    for s in range(stages):
        made_here = {n for k in modules[s] for n in io[k][1]}
        needed = sorted({n for k in modules[s] for n in io[k][0]} - made_here)
        for n in needed:
            src = producer.get(n, FRONTEND)
            inbound[s].setdefault(src, []).append(n)
            if src != FRONTEND:
                outbound[src].setdefault(s, []).append(n)
    missing = [n for n in outputs if n not in producer]
    if missing:
        raise PipeshiftError(f"{source}: the model's outputs {missing} are made by no stage")
    returns = tuple(tuple(n for n in outputs if producer[n] == s) for s in range(stages))
    return Routing(
        topology=topo, modules=modules,
        inbound=tuple({k: tuple(v) for k, v in d.items()} for d in inbound),
        outbound=tuple({k: tuple(v) for k, v in d.items()} for d in outbound),
        outputs=outputs, returns=returns,
    )
