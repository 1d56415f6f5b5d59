"""Reader and writer for PipeDream's ``graph.txt``.

Format (one node per line, then one tab-indented edge per line)::

    node4 -- Conv2d(3, 64, kernel_size=(3, 3)) -- forward_compute_time=1.2, backward_compute_time=2.3, activation_size=802816.0, parameter_size=7168.0[ -- stage_id=0]
    \tnode1 -- node4

The reader is strict because graph.txt is edited by hand and passed between machines: every
problem is reported as ``file:line: what is wrong`` (an :class:`InputFileError`), never as a
traceback. It accepts PipeDream's spellings (``%.3f`` or ``%s`` floats, ``activation_size=[a; b]``
for multi-output nodes, an optional ``stage_id``). The writer emits values that parse back to the
same floats, so read → write → read is the identity.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeshift.errors import InputFileError
from pipeshift.jsonfile import read_json_object
from pipeshift.graph.ir import Graph, Node

SEP = " -- "
FIELDS = ("forward_compute_time", "backward_compute_time", "activation_size", "parameter_size")
_NODE_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# -- numbers ---------------------------------------------------------------------------
MAX_VALUE = 1e18  # ms or bytes: a thousand years, an exabyte; anything above is a corrupt or hostile file


def _parse_number(text: str, field: str, path: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputFileError(path, line, f"{field}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InputFileError(path, line, f"{field}: {text!r} is not a finite non-negative number")
    if value > MAX_VALUE:
        # 1e308 parses, but sums and products of such times overflow to inf inside the planner
        raise InputFileError(path, line, f"{field}: {text!r} is beyond {MAX_VALUE:g} (milliseconds or bytes)")
    return value


def format_number(x: float) -> str:
    """PipeDream's ``%.3f`` where it is exact, else the shortest spelling that round-trips."""
    short = f"{x:.3f}"
    return short if float(short) == x else repr(float(x))


def _format_activation(a: float | list[float]) -> str:
    if isinstance(a, list):
        return "[" + "; ".join(repr(float(v)) for v in a) + "]"
    return format_number(a)


# -- reading ---------------------------------------------------------------------------
def _parse_node(text: str, path: str, line: int) -> Node:
    parts = text.split(SEP)
    if len(parts) < 3:
        raise InputFileError(path, line, "expected 'nodeN -- description -- forward_compute_time=…, …'")
    node_id = parts[0].strip()
    if not _NODE_ID.match(node_id):
        raise InputFileError(path, line, f"bad node id {node_id!r}")
    # A description containing the separator would shift every later field: refuse it rather
    # than guess, since PipeDream's own parser would misread the line too.
    metric_idx = [i for i, p in enumerate(parts) if p.strip().startswith("forward_compute_time=")]
    if metric_idx and metric_idx[0] != 2:
        raise InputFileError(path, line, f"{node_id}: description contains ' -- ' (PipeDream's field separator)")
    if len(parts) > 4 or (len(parts) == 4 and not parts[3].strip().startswith("stage_id=")):
        raise InputFileError(path, line, f"{node_id}: description contains ' -- ' (PipeDream's field separator)")
    desc = parts[1]
    values: dict[str, str] = {}
    for item in parts[2].split(", "):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq:
            raise InputFileError(path, line, f"{node_id}: expected 'name=value', got {item.strip()!r}")
        if key not in FIELDS:
            raise InputFileError(path, line, f"{node_id}: unknown field {key!r}")
        if key in values:
            raise InputFileError(path, line, f"{node_id}: field {key!r} given twice")
        values[key] = val.strip()
    for key in FIELDS:
        if key not in values:
            raise InputFileError(path, line, f"{node_id}: missing field {key!r}")
    act_text = values["activation_size"]
    activation: float | list[float]
    if act_text.startswith("["):
        if not act_text.endswith("]"):
            raise InputFileError(path, line, f"activation_size: {act_text!r} is not a list '[a; b]'")
        items = [t.strip() for t in act_text[1:-1].split(";")]
        if items == [""]:
            raise InputFileError(path, line, "activation_size: empty list")
        activation = [_parse_number(t, "activation_size", path, line) for t in items]
    else:
        activation = _parse_number(act_text, "activation_size", path, line)
    stage_id = None
    if len(parts) == 4:
        raw = parts[3].strip()[len("stage_id="):]
        if not re.fullmatch(r"\d+", raw):
            raise InputFileError(path, line, f"stage_id: {raw!r} is not a non-negative integer")
        stage_id = int(raw)
    return Node(
        node_id=node_id,
        desc=desc,
        forward_ms=_parse_number(values["forward_compute_time"], "forward_compute_time", path, line),
        backward_ms=_parse_number(values["backward_compute_time"], "backward_compute_time", path, line),
        activation_size=activation,
        parameter_size=_parse_number(values["parameter_size"], "parameter_size", path, line),
        stage_id=stage_id,
    )


def parse_graph_txt(text: str, path: str = "<string>") -> Graph:
    """Parse graph.txt content; errors name ``path`` and the 1-based line."""
    graph = Graph()
    defined_at: dict[str, int] = {}
    edges: list[tuple[str, str, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if raw.startswith("\t") or raw.startswith(" "):
            parts = raw.strip().split(SEP)
            if len(parts) != 2 or not all(_NODE_ID.match(p.strip()) for p in parts):
                raise InputFileError(path, lineno, f"expected an edge '\\tnodeA -- nodeB', got {raw.strip()!r}")
            edges.append((parts[0].strip(), parts[1].strip(), lineno))
            continue
        node = _parse_node(raw, path, lineno)
        if node.node_id in defined_at:
            raise InputFileError(
                path, lineno, f"duplicate node {node.node_id!r} (first defined on line {defined_at[node.node_id]})"
            )
        defined_at[node.node_id] = lineno
        graph.add_node(node)
    edge_line: dict[tuple[str, str], int] = {}
    for a, b, lineno in edges:
        for n in (a, b):
            if n not in graph:
                raise InputFileError(path, lineno, f"edge {a} -- {b}: unknown node {n!r}")
        if a == b:
            raise InputFileError(path, lineno, f"edge {a} -- {b}: a node cannot feed itself")
        graph.add_edge(a, b)
        edge_line.setdefault((a, b), lineno)
    cycle = graph.find_cycle()
    if cycle:
        closing = max(zip(cycle, cycle[1:]), key=lambda e: edge_line[e])
        raise InputFileError(
            path, edge_line[closing], f"edge {closing[0]} -- {closing[1]} closes a cycle: " + " -> ".join(cycle)
        )
    return graph


def read_graph_txt(path: str | os.PathLike[str], sidecar: bool = True) -> Graph:
    """Read a graph.txt; with ``sidecar``, attach node metadata from a sibling profile.json."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputFileError(str(p), None, "no such file") from None
    except IsADirectoryError:
        raise InputFileError(str(p), None, "is a directory, expected a graph.txt file") from None
    except UnicodeDecodeError as e:
        raise InputFileError(str(p), None, f"not a text file ({e.reason})") from None
    graph = parse_graph_txt(text, str(p))
    lines = text.count("\n") + (not text.endswith("\n"))
    if len(graph) == 0:
        raise InputFileError(str(p), None, "no nodes: an empty or truncated graph.txt")
    if len(graph) > 1 and not graph.edges:
        raise InputFileError(str(p), lines, f"{len(graph)} nodes but no edge lines: the file looks truncated after "
                                            "its node lines (every graph.txt ends with its '\tnodeA -- nodeB' edges)")
    side = p.with_name("profile.json")
    if sidecar and side.is_file():
        attach_meta(graph, read_sidecar(side))
    return graph


# -- writing ---------------------------------------------------------------------------
def format_node(node: Node) -> str:
    if "\n" in node.desc or "\r" in node.desc or SEP in node.desc:
        raise ValueError(f"{node.node_id}: description must be one line without ' -- ': {node.desc!r}")
    line = (
        f"{node.node_id}{SEP}{node.desc}{SEP}"
        f"forward_compute_time={format_number(node.forward_ms)}, "
        f"backward_compute_time={format_number(node.backward_ms)}, "
        f"activation_size={_format_activation(node.activation_size)}, "
        f"parameter_size={format_number(node.parameter_size)}"
    )
    if node.stage_id is not None:
        line += f"{SEP}stage_id={int(node.stage_id)}"
    return line


def format_graph_txt(graph: Graph) -> str:
    lines = [format_node(n) for n in graph]
    lines += [f"\t{a}{SEP}{b}" for a, b in graph.edges]
    return "\n".join(lines) + "\n"


def write_graph_txt(graph: Graph, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(format_graph_txt(graph))


# -- sidecar metadata ------------------------------------------------------------------
def read_sidecar(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The ``nodes`` map of a profile.json: node id → metadata dict."""
    data = read_json_object(path, "profile.json")
    nodes = data.get("nodes", {})
    if not isinstance(nodes, dict):
        raise InputFileError(str(path), None, "'nodes' must map node ids to objects")
    return nodes


def attach_meta(graph: Graph, meta: Mapping[str, Mapping[str, Any]]) -> None:
    for node_id, m in meta.items():
        if node_id in graph and isinstance(m, Mapping):
            graph[node_id].meta.update(m)


def meta_of(graph: Graph) -> dict[str, dict[str, Any]]:
    return {n.node_id: dict(n.meta) for n in graph if n.meta}
