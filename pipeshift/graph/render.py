"""Pictures of graphs with graphviz — optional: without the ``dot`` binary we keep the .dot file.

Every step that draws (profile, plan, show) goes through :func:`render_graph`, so pictures look
alike and degrade the same way: a machine without Debian's graphviz, or a graphviz that fails,
costs the picture and one warning line, never the step's other outputs. The DOT text is written
here and piped to the ``dot`` binary: the graphviz Python package would add a fifth of a second
to every ``pipeshift plan`` for what is a few lines of text.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from pipeshift.graph.ir import Graph

# Colour-blind-safe palette (Okabe–Ito), cycled for stage ids.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"]


@dataclasses.dataclass
class Picture:
    """What :func:`render_graph` left on disk."""

    path: Path | None  # the .svg, else the .dot (None only if not even the source could be built)
    written: list[Path]  # every file written
    warning: str | None  # one line saying why there is no .svg; the caller decides how to print it


def _label(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_dot(
    graph: Graph,
    stage_of: Mapping[str, int] | None = None,
    title: str = "",
    labels: Mapping[str, str] | None = None,
    fills: Mapping[str, str] | None = None,
) -> str:
    """Graphviz source: one box per node, coloured by stage (``stage_of``, else node.stage_id).

    ``labels`` and ``fills`` (node id → text / graphviz colour) replace the default label and the
    stage colour for the nodes they name, for callers that know more than the graph holds.
    """
    lines = [
        "digraph pipeshift {",
        f"\tgraph [fontsize=10 label={_quote(title)} rankdir=TB]",
        "\tnode [fontname=Helvetica fontsize=9 shape=box style=filled]",
    ]
    for node in graph:
        stage = (stage_of or {}).get(node.node_id, node.stage_id)
        colour = PALETTE[stage % len(PALETTE)] if stage is not None else "#FFFFFF"
        label = f"{node.node_id}\n{_label(node.desc)}\n{node.forward_ms + node.backward_ms:.3g} ms"
        if stage is not None:
            label += f"\nstage {stage}"
        text = (labels or {}).get(node.node_id, label)
        fill = (fills or {}).get(node.node_id, colour)
        lines.append(f"\t{_quote(node.node_id)} [label={_quote(text)} fillcolor={_quote(fill)}]")
    lines += [f"\t{_quote(a)} -> {_quote(b)}" for a, b in graph.edges]
    return "\n".join([*lines, "}"]) + "\n"


_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _quote(text: str) -> str:
    """A DOT ID: bare when it is a plain word, else a double-quoted string (quotes and backslashes escaped)."""
    if _ID_RE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _failure(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"graphviz failed ({type(e).__name__}: {lines[0] if lines else ''})"


def render_graph(
    graph: Graph,
    out_stem: str | Path,
    stage_of: Mapping[str, int] | None = None,
    title: str = "",
    *,
    labels: Mapping[str, str] | None = None,
    fills: Mapping[str, str] | None = None,
    keep_dot: bool = True,
) -> Picture:
    """Write ``out_stem.dot`` and, where ``dot`` is installed, ``out_stem.svg``.

    ``keep_dot=False`` removes the .dot once the .svg exists. Any failure of graphviz (no binary,
    a broken Python package, a render error) leaves the .dot, which ``dot -Tsvg`` renders later,
    and a one-line :attr:`Picture.warning`.
    """
    stem = Path(out_stem)
    dot_path, svg_path = stem.with_suffix(".dot"), stem.with_suffix(".svg")
    try:
        source = to_dot(graph, stage_of, title, labels, fills)
    except Exception as e:  # the picture is optional: say why and let the step go on
        return Picture(None, [], f"{_failure(e)}; no picture written")
    dot_path.write_text(source)
    later = f"; wrote {dot_path} only (render it with: dot -Tsvg {dot_path} -o {svg_path})"
    if shutil.which("dot") is None:
        return Picture(dot_path, [dot_path], "graphviz 'dot' is not installed" + later)
    try:
        svg = subprocess.run(["dot", "-Tsvg"], input=source.encode(), capture_output=True, check=True,
                             timeout=120).stdout
    except Exception as e:  # the graphviz package or the dot binary failing must not lose the step's outputs
        return Picture(dot_path, [dot_path], _failure(e) + later)
    svg_path.write_bytes(svg)
    if keep_dot:
        return Picture(svg_path, [dot_path, svg_path], None)
    dot_path.unlink()
    return Picture(svg_path, [svg_path], None)
