"""DP states: the places a pipeline may be cut.

A legal split of a DAG into pipeline stages is a chain of *downsets* (sets of nodes closed
under predecessors) ∅ ⊂ D1 ⊂ D2 ⊂ … ⊂ V: stage i runs ``D_i \\ D_{i-1}``, and every edge goes
forward. The planner's dynamic program ranges over such states, so the state space decides both
the quality of the answer and the cost of finding it.

* **Exact** — every downset (for PipeDream's model: every antichain its optimizer visits, which
  is a slightly smaller family, see :func:`pipedream_states`). The optimum over all legal
  splits. On chain-like graphs (VGG, ResNet, GNMT) there are a few hundred states; on branchy
  graphs the count multiplies across parallel branches (an Inception module with branches of
  3, 6, 9 and 3 nodes alone has 4·7·10·4 = 1120 downsets, and an auxiliary head running beside
  the rest of the network multiplies everything again), and the DP's O(S²)–O(S³) work and
  memory explode.
* **Prefix** — the prefixes of one topological order: exactly ``n`` states, O(n²) pairs. Every
  prefix is a downset, so the prefix optimum is never better than the exact one, and it is
  worse only when the best cut runs "diagonally" across parallel branches in a way the chosen
  order never exposes. To keep that rare, :func:`prefix_orders` offers three orders (the
  profiler's execution order, depth-first "finish the branch you started", and greedy "keep the
  fewest bytes in flight") and the planner keeps the best. For compute-only costs on a straight
  pipeline any single order is within one node's time of the exact optimum (a contiguous split
  of a sequence can always balance to within its largest element); the benchmark measures the
  real gap on graphs small enough to solve both ways.

:func:`build_states` chooses: exact while the enumeration stays under ``max_states``, prefixes
otherwise.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Iterable

import numpy as np

from pipeshift.errors import PipeshiftError
from pipeshift.graph import Graph, Node


def tied_parameters(graph: Graph, node_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The parameters several of ``node_ids`` hold (node meta ``shared_parameters``: name → bytes,
    recorded by the profiler): a (T, n) holder mask and each one's bytes. A tie held by only one
    of the planned nodes costs nothing extra and is left out."""
    holders: dict[str, list[int]] = {}
    size: dict[str, float] = {}
    for i, nid in enumerate(node_ids):
        shared = (graph[nid].meta or {}).get("shared_parameters") or {}
        if not isinstance(shared, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for k, v in shared.items()):
            raise PipeshiftError(f"profile.json: node {nid}: 'shared_parameters' must map parameter names to "
                                 f"byte counts, got {shared!r:.80}")
        for name, nbytes in shared.items():
            holders.setdefault(name, []).append(i)
            size[name] = max(size.get(name, 0.0), float(nbytes))
    tied = [name for name, nodes in holders.items() if len(nodes) > 1]
    mask = np.zeros((len(tied), len(node_ids)), dtype=bool)
    for t, name in enumerate(tied):
        mask[t, holders[name]] = True
    return mask, np.array([size[name] for name in tied], dtype=np.float64)


@dataclasses.dataclass
class GraphArrays:
    """The graph as dense numpy arrays over the nodes the planner places.

    ``adj[a, b]`` is an edge a→b; ``closure[b]`` marks b and all its ancestors. Times are
    milliseconds per profiled batch, sizes bytes (graph.txt's units).
    """

    node_ids: list[str]
    adj: np.ndarray
    forward_ms: np.ndarray
    backward_ms: np.ndarray
    activation: np.ndarray
    parameter: np.ndarray
    stash: np.ndarray
    base: np.ndarray  # nodes pinned before every cut (raw inputs)
    # tied parameters (profile.json's ``shared_parameters``): which nodes hold each, its bytes
    tie_nodes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), dtype=bool))  # (T, n)
    tie_bytes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))  # (T,)

    @property
    def n(self) -> int:
        return len(self.node_ids)

    def _edge_groups(self, by: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Edges grouped by target (``by="dst"``) or source: (other end, group starts, group node, order)."""
        cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = self.__dict__.setdefault("_groups", {})
        if by not in cache:
            src, dst = np.nonzero(self.adj)
            key, other = (dst, src) if by == "dst" else (src, dst)
            order = np.argsort(key, kind="stable")
            key, other = key[order], other[order]
            nodes, starts = np.unique(key, return_index=True)
            cache[by] = (other, starts, nodes, order)
        return cache[by]

    def preds_inside(self, rows: np.ndarray) -> np.ndarray:
        """(f, n): how many predecessors of each node each row (a node set) holds."""
        other, starts, nodes, _ = self._edge_groups("dst")
        out = np.zeros((rows.shape[0], self.n), dtype=np.int32)
        if nodes.size:
            out[:, nodes] = np.add.reduceat(rows[:, other].astype(np.int32), starts, axis=1)
        return out

    def any_succ_in(self, rows: np.ndarray) -> np.ndarray:
        """(f, n): whether each node has a successor in each row (a node set)."""
        other, starts, nodes, _ = self._edge_groups("src")
        out = np.zeros((rows.shape[0], self.n), dtype=bool)
        if nodes.size:
            out[:, nodes] = np.logical_or.reduceat(rows[:, other], starts, axis=1)
        return out

    @property
    def compute_ms(self) -> np.ndarray:
        return np.asarray(self.forward_ms + self.backward_ms)

    @classmethod
    def from_graph(cls, graph: Graph, node_ids: list[str], base: Iterable[str] = (), zero: Iterable[str] = ()) -> GraphArrays:
        """Arrays for ``node_ids`` (a subset of ``graph``); ``zero`` nodes get all-zero costs."""
        index = {nid: i for i, nid in enumerate(node_ids)}
        n = len(node_ids)
        adj = np.zeros((n, n), dtype=bool)
        for a, b in graph.edges:
            if a in index and b in index:
                adj[index[a], index[b]] = True
        zeroed = set(zero)

        def col(get: Callable[[Node], float]) -> np.ndarray:
            return np.array([0.0 if nid in zeroed else float(get(graph[nid])) for nid in node_ids], dtype=np.float64)

        def stash_of(node: Node) -> float:
            return stash_bytes(node)

        base_mask = np.zeros(n, dtype=bool)
        for nid in base:
            base_mask[index[nid]] = True
        tie_nodes, tie_bytes = tied_parameters(graph, node_ids)
        return cls(
            node_ids=list(node_ids),
            adj=adj,
            forward_ms=col(lambda nd: nd.forward_ms),
            backward_ms=col(lambda nd: nd.backward_ms),
            activation=col(lambda nd: nd.activation_bytes),
            parameter=col(lambda nd: nd.parameter_size),
            stash=col(stash_of),
            base=base_mask,
            tie_nodes=tie_nodes,
            tie_bytes=tie_bytes,
        )

    def closure(self) -> np.ndarray:
        """``closure[b, a]``: a is b or an ancestor of b (boolean transitive closure)."""
        n = self.n
        order = topological_order(self.adj)
        cl = np.eye(n, dtype=bool)
        preds = [np.flatnonzero(self.adj[:, b]) for b in range(n)]
        for b in order:
            for a in preds[b]:
                cl[b] |= cl[a]
        return cl


def stash_bytes(node: Node) -> float:
    """Bytes a node keeps for its backward pass, per microbatch.

    profile.json's ``saved_bytes`` when the profiler measured it; otherwise the node's output,
    unless the node takes no time at all (a view, a ``__getitem__``), which saves nothing.
    """
    saved = node.meta.get("saved_bytes") if node.meta else None
    if isinstance(saved, (int, float)) and not isinstance(saved, bool) and 0 <= saved < float("inf"):
        return float(saved)
    return node.activation_bytes if node.forward_ms + node.backward_ms > 0 else 0.0


def topological_order(adj: np.ndarray, priority: np.ndarray | None = None) -> list[int]:
    """Kahn's algorithm; among ready nodes the smallest ``priority`` (default: index) goes first."""
    n = adj.shape[0]
    prio = np.arange(n) if priority is None else priority
    indeg = adj.sum(axis=0).astype(np.int64)
    succ = [np.flatnonzero(adj[a]) for a in range(n)]
    ready: list[tuple[int, int]] = [(int(prio[i]), i) for i in range(n) if indeg[i] == 0]
    heapq.heapify(ready)
    out: list[int] = []
    while ready:
        _, a = heapq.heappop(ready)
        out.append(a)
        for b in succ[a]:
            indeg[b] -= 1
            if indeg[b] == 0:
                heapq.heappush(ready, (int(prio[b]), int(b)))
    return out


@dataclasses.dataclass
class StateSpace:
    """States in a topological order of the state DAG.

    ``members[j]`` is downset j (boolean over nodes). ``pred[k, j]`` says state k may end the
    stage before a stage ending at j (for exact spaces: k ⊂ j; for prefixes: k < j). Row 0 of
    every DP table means "from the start" (the empty set, plus pinned inputs), so stage ranges
    are (row r, state j) = ``members[j] \\ members[r-1]``.
    """

    members: np.ndarray
    pred: np.ndarray
    mode: str  # "exact" | "prefix"
    order: list[int] | None = None
    order_name: str | None = None

    @property
    def size(self) -> int:
        return int(self.members.shape[0])

    def successors(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.pred[k]) for k in range(self.size)]


class TooManyStates(Exception):
    """Raised internally when an exact enumeration passes its cap."""


def _pack(rows: np.ndarray) -> list[bytes]:
    packed = np.packbits(rows, axis=1)
    return [r.tobytes() for r in packed]


def zero_cost_glue(g: GraphArrays) -> tuple[np.ndarray, np.ndarray]:
    """(lazy, eager): zero-cost sources and sinks whose place follows from their neighbours.

    A node with no compute, parameters or stash changes no stage's time or memory wherever it
    goes; the only thing its placement changes is how many cuts its tensors cross, and that is
    least when a source sits with its earliest consumer and a sink with its latest producer.
    So a *lazy* source joins a downset only together with a consumer, and an *eager* sink as soon
    as all its producers are in. With idle workers allowed (``--use_fewer_machines``) some plan
    that is optimal overall survives in the smaller space. Without, the full space can also use a
    stage made of such nodes alone — a way to keep a worker all but idle (or the only way to
    fill a straight pipeline longer than the real layers) — that the glued space lacks; which is
    why the planner glues only when the full space is too big to search.
    """
    zero = (g.compute_ms == 0) & (g.parameter == 0) & (g.stash == 0) & ~g.base
    indeg = g.adj.sum(axis=0)
    outdeg = g.adj.sum(axis=1)
    return zero & (indeg == 0) & (outdeg > 0), zero & (outdeg == 0) & (indeg > 0)


def all_downsets(g: GraphArrays, max_states: int, glue: bool = False) -> StateSpace:
    """Every downset that strictly contains the pinned inputs, ordered by size.

    Breadth-first from the inputs, adding one node whose predecessors are all in (with
    ``glue``, see :func:`zero_cost_glue`), vectorised over each frontier. Raises
    :class:`TooManyStates` past ``max_states``.
    """
    indeg = g.adj.sum(axis=0).astype(np.int32)
    n = g.n
    lazy, eager = zero_cost_glue(g) if glue else (np.zeros(n, bool), np.zeros(n, bool))
    lazy_preds = g.adj & lazy[:, None]  # [p, v]: lazy p feeds v (it comes along with v)
    addable = ~lazy & ~eager
    frontier = g.base[None, :].copy()
    frontier_ids = np.array([-1])  # -1: the start (pinned inputs), not a state
    seen: dict[bytes, int] = {}
    rows: list[np.ndarray] = []
    parents: list[list[int]] = []
    while frontier.shape[0]:
        inside = g.preds_inside(frontier | lazy)
        cand = (~frontier) & addable & (inside == indeg[None, :])
        s_idx, n_idx = np.nonzero(cand)
        if s_idx.size == 0:
            break
        new = frontier[s_idx]
        new[np.arange(s_idx.size), n_idx] = True
        new |= lazy_preds[:, n_idx].T
        if eager.any():
            new |= eager & (g.preds_inside(new) == indeg[None, :])
        keep: list[int] = []
        for i, key in enumerate(_pack(new)):
            sid = seen.get(key)
            if sid is None:
                sid = seen[key] = len(rows) + len(keep)
                keep.append(i)
                parents.append([])
                if len(rows) + len(keep) > max_states:
                    raise TooManyStates(len(rows) + len(keep))
            parent = int(frontier_ids[s_idx[i]])
            if parent >= 0:
                parents[sid].append(parent)
        frontier = new[keep]
        frontier_ids = np.arange(len(rows), len(rows) + len(keep))
        rows.extend(frontier)
    if not rows:
        return StateSpace(np.zeros((0, n), dtype=bool), np.zeros((0, 0), dtype=bool), "exact")
    # k ⊂ j exactly when j is reachable from k by single additions: close the parent relation
    # in breadth-first order (parents are discovered before their children)
    S = len(rows)
    anc = np.zeros((S, S), dtype=bool)  # anc[j, k]: k ⊂ j
    for j in range(S):
        for p in set(parents[j]):
            anc[j] |= anc[p]
            anc[j, p] = True
    members = np.array(rows, dtype=bool)
    order = np.argsort(members.sum(axis=1), kind="stable")
    members = members[order]
    pred = anc[np.ix_(order, order)].T.copy()
    return StateSpace(members, pred, "exact", order_name="glued" if glue else None)


def pipedream_states(g: GraphArrays, max_states: int, closure: np.ndarray | None = None) -> StateSpace:
    """The states PipeDream's optimizer visits, in an order of its kind.

    PipeDream starts from the graph's first source alone and moves from a downset D to
    ``D ∪ closure(v)`` for every node v outside D with a predecessor in D (its "next
    antichains"); the state DAG has those moves as edges, the DP's predecessor relation is
    reachability in it, and the states are numbered by a depth-first topological sort from the
    start. Its own traversal order depends on Python's set iteration, so the numbering here is
    one of the orders it can produce (children visited in node order). Raises
    :class:`TooManyStates` past ``max_states``.
    """
    n = g.n
    if n == 0:
        return StateSpace(np.zeros((0, 0), dtype=bool), np.zeros((0, 0), dtype=bool), "exact")
    cl = g.closure() if closure is None else closure
    indeg = g.adj.sum(axis=0)
    first = int(np.flatnonzero(indeg == 0)[0])
    start = np.zeros((1, n), dtype=bool)
    start[0, first] = True
    keys: dict[bytes, int] = {_pack(start)[0]: 0}
    rows: list[np.ndarray] = [start[0]]
    children: list[list[int]] = [[]]
    frontier = np.array([0])
    frontier_rows = start
    while frontier.size:
        has_pred = g.preds_inside(frontier_rows) > 0
        cand = (~frontier_rows) & has_pred
        s_idx, n_idx = np.nonzero(cand)
        new_rows = frontier_rows[s_idx] | cl[n_idx]
        next_ids: list[int] = []
        for parent_pos, key, row in zip(s_idx, _pack(new_rows), new_rows):
            sid = keys.get(key)
            if sid is None:
                sid = len(rows)
                keys[key] = sid
                rows.append(row)
                children.append([])
                next_ids.append(sid)
                if len(rows) > max_states:
                    raise TooManyStates(len(rows))
            children[frontier[parent_pos]].append(sid)
        frontier = np.array(next_ids, dtype=np.int64)
        frontier_rows = np.array([rows[i] for i in next_ids], dtype=bool).reshape(len(next_ids), n)
    order = _dfs_reverse_postorder(children)
    members = np.array([rows[i] for i in order], dtype=bool)
    pos = np.empty(len(order), dtype=np.int64)
    pos[order] = np.arange(len(order))
    S = len(order)
    anc = np.zeros((S, S), dtype=bool)  # anc[j, k]: k reaches j
    for j_old in order:
        j = pos[j_old]
        for c_old in children[j_old]:
            c = pos[c_old]
            anc[c] |= anc[j]
            anc[c, j] = True
    return StateSpace(members, anc.T.copy(), "exact")


def _dfs_reverse_postorder(children: list[list[int]]) -> list[int]:
    seen = [False] * len(children)
    post: list[int] = []
    for root in range(len(children)):
        if seen[root]:
            continue
        seen[root] = True
        stack = [(root, iter(children[root]))]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                post.append(node)
                stack.pop()
            elif not seen[nxt]:
                seen[nxt] = True
                stack.append((nxt, iter(children[nxt])))
    return post[::-1]


# -- prefixes of a topological order ------------------------------------------------------
def prefix_orders(g: GraphArrays) -> dict[str, list[int]]:
    """Three topological orders of the non-pinned nodes, each a plausible source of cut points."""
    free = np.flatnonzero(~g.base)
    sub = g.adj[np.ix_(free, free)]
    orders = {"profile": [int(free[i]) for i in topological_order(sub)]}
    orders["depth-first"] = [int(free[i]) for i in _depth_first_order(sub)]
    orders["min-bytes"] = [int(free[i]) for i in _min_bytes_order(sub, g.activation[free])]
    unique: dict[str, list[int]] = {}
    for name, order in orders.items():
        if order not in unique.values():
            unique[name] = order
    return unique


def _depth_first_order(adj: np.ndarray) -> list[int]:
    """Kahn's algorithm that always continues with the most recently readied node."""
    n = adj.shape[0]
    indeg = adj.sum(axis=0).astype(np.int64)
    succ = [np.flatnonzero(adj[a]) for a in range(n)]
    stack = [i for i in range(n - 1, -1, -1) if indeg[i] == 0]
    out: list[int] = []
    while stack:
        a = stack.pop()
        out.append(a)
        for b in succ[a][::-1]:
            indeg[b] -= 1
            if indeg[b] == 0:
                stack.append(int(b))
    return out


def _min_bytes_order(adj: np.ndarray, activation: np.ndarray) -> list[int]:
    """Greedy: next run the ready node that leaves the fewest activation bytes live."""
    n = adj.shape[0]
    indeg = adj.sum(axis=0).astype(np.int64)
    outdeg = adj.sum(axis=1).astype(np.int64)
    pending = outdeg.copy()  # consumers of a node not yet run
    succ = [np.flatnonzero(adj[a]) for a in range(n)]
    preds = [np.flatnonzero(adj[:, b]) for b in range(n)]
    ready = {i for i in range(n) if indeg[i] == 0}
    out: list[int] = []
    while ready:
        def delta(v: int) -> tuple[float, int]:
            freed = sum(activation[u] for u in preds[v] if pending[u] == 1)
            return (activation[v] * (outdeg[v] > 0) - freed, v)

        v = min(ready, key=delta)
        ready.remove(v)
        out.append(v)
        for u in preds[v]:
            pending[u] -= 1
        for b in succ[v]:
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.add(int(b))
    return out


def prefix_states(g: GraphArrays, order: list[int], name: str, max_states: int | None = None) -> StateSpace:
    """States = base ∪ order[:t] for t = 1..n; with ``max_states``, only some cut points are kept.

    When the order is longer than ``max_states``, the kept cut points are spread evenly over
    cumulative compute and, within each stretch, are the ones with the fewest bytes crossing
    (a cut there is cheapest); the last state (everything) is always kept.
    """
    n_free = len(order)
    members = np.zeros((n_free, g.n), dtype=bool)
    members[:] = g.base
    for t, v in enumerate(order):
        members[t:, v] = True
    if max_states is not None and n_free > max_states:
        keep = _thin_cut_points(g, members, max_states)
        members = members[keep]
    S = members.shape[0]
    pred = np.triu(np.ones((S, S), dtype=bool), k=1)
    return StateSpace(members, pred, "prefix", order=list(order), order_name=name)


def frontier_bytes(g: GraphArrays, members: np.ndarray) -> np.ndarray:
    """Bytes of activations produced inside each downset and consumed outside it."""
    crossing = members & g.any_succ_in(~members)
    return np.asarray(crossing.astype(np.float64) @ g.activation, dtype=np.float64)


def _thin_cut_points(g: GraphArrays, members: np.ndarray, max_states: int) -> np.ndarray:
    S = members.shape[0]
    cum = members.astype(np.float64) @ g.compute_ms
    total = cum[-1] if cum[-1] > 0 else 1.0
    cost = frontier_bytes(g, members)
    buckets = max(1, (max_states - 1) // 2)
    which = np.minimum((cum / total * buckets).astype(np.int64), buckets - 1)
    keep: set[int] = {S - 1}
    for b in range(buckets):
        idx = np.flatnonzero(which[:-1] == b)
        if idx.size:
            keep.update(int(i) for i in idx[np.argsort(cost[idx], kind="stable")[:2]])
    return np.array(sorted(keep))
