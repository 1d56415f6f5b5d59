"""Who sends which named tensor to whom: the routing of a partitioned model.

A partition is the stage package's contract in memory: the module list
``[(module, input_names, output_names), …, (criterion, [..., "target"], ["loss"])]``, the
``module_to_stage`` map and the ranks of every stage. From the *names* alone this module works
out, for every stage, which tensors it receives and from which stage, and which it sends where —
including raw inputs (``input0``, …) and the ``target``, which the data loader produces on the
first stage and which go straight to the stages that read them. Nothing here touches a tensor, so
a repartitioning can build the new routing, compare it with the old one, and test it without
processes.

Microbatch ``i`` of stage ``s`` runs on replica ``i % replicas(s)``, so the peer rank of any
transfer is known to both ends without asking. A stage with tensor-parallel degree ``t`` has
``replicas × t`` ranks, replica-major (:mod:`pipeshift.runtime.tp`); a transfer's peer is the
first rank of the replica's TP group, so a tensor crosses a boundary once per group.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

from pipeshift.errors import PipeshiftError
from pipeshift.plan import RankLayout

RAW_NAME_RE = re.compile(r"^input[0-9]+$")
TARGET = "target"
LOSS = "loss"


@dataclasses.dataclass(frozen=True)
class Edge:
    """Tensor ``name`` made by stage ``src`` and read by stage ``dst`` (``src < dst``)."""

    name: str
    src: int
    dst: int
    raw: bool  # data (inputs/target): never differentiated


@dataclasses.dataclass(frozen=True)
class Topology(RankLayout):
    """The routing of one partition; build it with :func:`build_topology`."""

    io: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]  # per module: (inputs, outputs)
    module_to_stage: tuple[int, ...]
    stage_ranks: tuple[tuple[int, ...], ...]
    edges: tuple[Edge, ...]
    raw_inputs: tuple[str, ...]  # the input0, input1, … some module reads, in order
    tags: Mapping[str, int]  # every exchanged name -> a small integer, identical on all ranks
    tp_degrees: tuple[int, ...] = ()  # per stage; () = 1 everywhere

    def stage_of(self, rank: int) -> int:
        for s, ranks in enumerate(self.stage_ranks):
            if rank in ranks:
                return s
        raise PipeshiftError(f"rank {rank} is in no stage of stage_to_rank_map")

    def tp_degree(self, stage: int) -> int:
        return self.tp_degrees[stage] if self.tp_degrees else 1

    def replica_of(self, rank: int) -> int:
        stage = self.stage_of(rank)
        return self.stage_ranks[stage].index(rank) // self.tp_degree(stage)

    def tp_index_of(self, rank: int) -> int:
        """The rank's place in its TP group (0: the group's leader, which talks to other stages)."""
        stage = self.stage_of(rank)
        return self.stage_ranks[stage].index(rank) % self.tp_degree(stage)

    def replicas(self, stage: int) -> int:
        return len(self.stage_ranks[stage]) // self.tp_degree(stage)

    def rank_for(self, stage: int, mb: int) -> int:
        """The rank of ``stage`` that sends and receives microbatch ``mb`` (its TP group's leader)."""
        ranks, t = self.stage_ranks[stage], self.tp_degree(stage)
        return ranks[(mb % (len(ranks) // t)) * t]

    def modules_of(self, stage: int) -> list[int]:
        return [i for i, s in enumerate(self.module_to_stage) if s == stage]

    def inbound(self, stage: int) -> list[Edge]:
        return [e for e in self.edges if e.dst == stage]

    def outbound(self, stage: int) -> list[Edge]:
        return [e for e in self.edges if e.src == stage]

    def describe(self) -> str:
        lines = []
        for s, ranks in enumerate(self.stage_ranks):
            ins = ", ".join(f"{e.name}<-s{e.src}" for e in self.inbound(s)) or "-"
            outs = ", ".join(f"{e.name}->s{e.dst}" for e in self.outbound(s)) or "-"
            tp = f" tp {self.tp_degree(s)}" if self.tp_degree(s) > 1 else ""
            lines.append(f"stage {s} ranks {list(ranks)}{tp} modules {self.modules_of(s)}: in {ins}; out {outs}")
        return "\n".join(lines)


def build_topology(io: Sequence[tuple[Sequence[str], Sequence[str]]], module_to_stage: Sequence[int],
                   stage_ranks: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
                   source: str = "conf.json", tp_degrees: Mapping[int, int] | Sequence[int] | None = None) -> Topology:
    """Check a partition's names and maps and derive its edges; errors name ``source``.

    ``tp_degrees`` gives each stage's tensor-parallel degree (missing stages: 1).
    """

    def bad(msg: str) -> PipeshiftError:
        return PipeshiftError(f"{source}: {msg}")

    pairs = [(tuple(i), tuple(o)) for i, o in io]
    m2s = [int(s) for s in module_to_stage]
    if len(m2s) != len(io):
        raise bad(f"module_to_stage_map has {len(m2s)} entries but the package has {len(io)} modules")
    if not io:
        raise bad("the package has no modules")
    if any(b < a for a, b in zip(m2s, m2s[1:])) or m2s[0] != 0:
        raise bad(f"module_to_stage_map {m2s} must start at 0 and never decrease")
    num_stages = m2s[-1] + 1
    if sorted(set(m2s)) != list(range(num_stages)):
        raise bad(f"module_to_stage_map {m2s} skips a stage")
    ranks = _stage_ranks(stage_ranks, num_stages, bad)
    degrees = _tp_degrees(tp_degrees, ranks, bad)
    if pairs[-1][1] != (LOSS,):
        raise bad(f"the last module (the criterion) must output ['loss'], not {list(pairs[-1][1])}")

    producer: dict[str, int] = {}
    raw: set[str] = set()
    edges: dict[tuple[str, int], Edge] = {}
    for k, ((ins, outs), stage) in enumerate(zip(pairs, m2s)):
        for name in ins:
            if name in producer:
                src = producer[name]
            elif RAW_NAME_RE.match(name) or name == TARGET:
                raw.add(name)
                src = 0
            else:
                raise bad(f"module {k} (stage {stage}) reads {name!r}, which no earlier module produces")
            if src != stage:
                edges.setdefault((name, stage), Edge(name, src, stage, raw=name in raw))
        for name in outs:
            if name in producer or RAW_NAME_RE.match(name) or name == TARGET:
                raise bad(f"module {k} (stage {stage}) outputs {name!r}, which already has a producer")
            producer[name] = stage
    if TARGET not in raw:
        raise bad("no module reads 'target': the criterion must take [last_output, 'target']")
    raw_inputs = tuple(sorted((n for n in raw if n != TARGET), key=lambda n: int(n[5:])))
    names = sorted({e.name for e in edges.values()})
    return Topology(io=tuple(pairs), module_to_stage=tuple(m2s), stage_ranks=ranks,
                    edges=tuple(sorted(edges.values(), key=lambda e: (e.src, e.dst, e.name))),
                    raw_inputs=raw_inputs, tags={n: i for i, n in enumerate(names)},
                    tp_degrees=degrees if any(d > 1 for d in degrees) else ())


def _tp_degrees(tp_degrees: Mapping[int, int] | Sequence[int] | None, ranks: tuple[tuple[int, ...], ...],
                bad: Callable[[str], PipeshiftError]) -> tuple[int, ...]:
    if tp_degrees is None:
        return (1,) * len(ranks)
    table = dict(tp_degrees) if isinstance(tp_degrees, Mapping) else dict(enumerate(tp_degrees))
    unknown = sorted(set(table) - set(range(len(ranks))))
    if unknown:
        raise bad(f"tensor-parallel degrees given for stages {unknown}, which do not exist")
    out = []
    for s, row in enumerate(ranks):
        t = table.get(s, 1)
        if not isinstance(t, int) or isinstance(t, bool) or t < 1 or len(row) % t:
            raise bad(f"stage {s}: tensor-parallel degree {t!r} must be a positive integer dividing its "
                      f"{len(row)} ranks {list(row)}")
        out.append(t)
    return tuple(out)


def _stage_ranks(stage_ranks: Mapping[int, Sequence[int]] | Sequence[Sequence[int]], num_stages: int,
                 bad: Callable[[str], PipeshiftError]) -> tuple[tuple[int, ...], ...]:
    if isinstance(stage_ranks, Mapping):
        try:
            table = {int(k): v for k, v in stage_ranks.items()}
        except (TypeError, ValueError):
            raise bad(f"stage_to_rank_map keys must be stage numbers, got {list(stage_ranks)}") from None
        if sorted(table) != list(range(num_stages)):
            raise bad(f"stage_to_rank_map has stages {sorted(table)}, expected 0..{num_stages - 1}")
        rows = [table[s] for s in range(num_stages)]
    else:
        rows = list(stage_ranks)
        if len(rows) != num_stages:
            raise bad(f"{len(rows)} rank lists for {num_stages} stages")
    out = []
    for s, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or not row or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in row):
            raise bad(f"stage {s}: expected a non-empty list of ranks, got {row!r}")
        out.append(tuple(row))
    flat = sorted(r for row in out for r in row)
    if flat != list(range(len(flat))):
        raise bad(f"stage_to_rank_map must use every rank 0..{len(flat) - 1} exactly once, got {flat}")
    return tuple(out)
