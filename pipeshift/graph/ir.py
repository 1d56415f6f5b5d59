"""The dataflow graph every step shares: profiled layers (nodes) and the tensors between them (edges).

A node is one operation of the model at the granularity the profiler chose (a leaf module, or a
function/method call such as ``add`` or ``flatten``). Its numbers are PipeDream's: forward and
backward milliseconds per minibatch, bytes of the activation(s) it outputs, bytes of the
parameters it owns. Anything richer (module FQN, op kind, shapes, dtypes) lives in ``meta`` and
travels in a JSON sidecar, so graph.txt stays readable by PipeDream's own tools.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from pipeshift.errors import PipeshiftError

ActivationSize = float | list[float]


@dataclasses.dataclass
class Node:
    node_id: str
    desc: str
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    activation_size: ActivationSize = 0.0
    parameter_size: float = 0.0
    stage_id: int | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def activation_bytes(self) -> float:
        """Total bytes of all outputs (PipeDream sums the list for multi-output nodes)."""
        if isinstance(self.activation_size, list):
            return float(sum(self.activation_size))
        return float(self.activation_size)

    @property
    def is_input(self) -> bool:
        """PipeDream marks raw model inputs with a description starting with ``Input``."""
        return self.desc.startswith("Input")


class GraphError(PipeshiftError):
    """A structurally invalid graph (unknown node, duplicate, cycle)."""


class Graph:
    """A DAG of :class:`Node` with insertion-ordered nodes and edges.

    Node order is kept as inserted (graph.txt order), so a read/write round trip is stable;
    :meth:`topological_order` gives an execution order that is deterministic (Kahn's algorithm,
    ties broken by insertion order).
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self._succ: dict[str, list[str]] = {}
        self._pred: dict[str, list[str]] = {}
        self.edges: list[tuple[str, str]] = []

    # -- construction -----------------------------------------------------------------
    def add_node(self, node: Node) -> Node:
        if node.node_id in self.nodes:
            raise GraphError(f"duplicate node {node.node_id!r}")
        self.nodes[node.node_id] = node
        self._succ[node.node_id] = []
        self._pred[node.node_id] = []
        return node

    def add_edge(self, src: str, dst: str) -> None:
        for n in (src, dst):
            if n not in self.nodes:
                raise GraphError(f"edge {src} -- {dst} refers to unknown node {n!r}")
        if dst in self._succ[src]:
            return  # PipeDream writes an edge once; a repeated one carries no information
        self._succ[src].append(dst)
        self._pred[dst].append(src)
        self.edges.append((src, dst))

    # -- queries ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __getitem__(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def predecessors(self, node_id: str) -> list[str]:
        return list(self._pred[node_id])

    def successors(self, node_id: str) -> list[str]:
        return list(self._succ[node_id])

    def sources(self) -> list[str]:
        return [n for n in self.nodes if not self._pred[n]]

    def sinks(self) -> list[str]:
        return [n for n in self.nodes if not self._succ[n]]

    def topological_order(self) -> list[str]:
        """Kahn's algorithm; raises :class:`GraphError` naming a node on a cycle."""
        indeg = {n: len(p) for n, p in self._pred.items()}
        position = {n: i for i, n in enumerate(self.nodes)}
        import heapq

        ready = [(position[n], n) for n, d in indeg.items() if d == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, n = heapq.heappop(ready)
            order.append(n)
            for s in self._succ[n]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    heapq.heappush(ready, (position[s], s))
        if len(order) != len(self.nodes):
            stuck = next(n for n, d in indeg.items() if d > 0)
            raise GraphError(f"the graph has a cycle through {stuck}")
        return order

    def find_cycle(self) -> list[str] | None:
        """One cycle as a node list (first == last), or None for a DAG."""
        color: dict[str, int] = {n: 0 for n in self.nodes}
        parent: dict[str, str] = {}
        for root in self.nodes:
            if color[root]:
                continue
            stack: list[tuple[str, Iterator[str]]] = [(root, iter(self._succ[root]))]
            color[root] = 1
            while stack:
                n, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    color[n] = 2
                    stack.pop()
                elif color[nxt] == 0:
                    color[nxt] = 1
                    parent[nxt] = n
                    stack.append((nxt, iter(self._succ[nxt])))
                elif color[nxt] == 1:
                    cycle = [nxt, n]
                    while cycle[-1] != nxt:
                        cycle.append(parent[cycle[-1]])
                    return list(reversed(cycle))
        return None

    def ancestors(self, node_id: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self._pred[node_id])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self._pred[n])
        return seen

    def subgraph(self, node_ids: Iterable[str]) -> Graph:
        keep = set(node_ids)
        g = Graph()
        for n in self.nodes.values():
            if n.node_id in keep:
                g.add_node(dataclasses.replace(n, meta=dict(n.meta)))
        for a, b in self.edges:
            if a in keep and b in keep:
                g.add_edge(a, b)
        return g

    def copy(self) -> Graph:
        return self.subgraph(self.nodes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return self.nodes == other.nodes and sorted(self.edges) == sorted(other.edges)

    def __repr__(self) -> str:
        return f"Graph({len(self.nodes)} nodes, {len(self.edges)} edges)"
