"""Pictures of graphs with graphviz — optional: without the ``dot`` binary we keep the .dot file.

Every step that draws (profile, plan, show) goes through :func:`render_graph`, so pictures look
alike and degrade the same way on machines without Debian's graphviz.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pipeshift.graph.ir import Graph

# Colour-blind-safe palette (Okabe–Ito), cycled for stage ids.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"]


def _label(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_dot(graph: Graph, stage_of: dict[str, int] | None = None, title: str = "") -> str:
    """Graphviz source; ``stage_of`` colours nodes by stage (falls back to node.stage_id)."""
    import graphviz

    dot = graphviz.Digraph(name="pipeshift", graph_attr={"rankdir": "TB", "label": title, "fontsize": "10"})
    dot.attr("node", shape="box", style="filled", fontsize="9", fontname="Helvetica")
    for node in graph:
        stage = (stage_of or {}).get(node.node_id, node.stage_id)
        colour = PALETTE[stage % len(PALETTE)] if stage is not None else "#FFFFFF"
        label = f"{node.node_id}\n{_label(node.desc)}\n{node.forward_ms + node.backward_ms:.3g} ms"
        if stage is not None:
            label += f"\nstage {stage}"
        dot.node(node.node_id, label=label, fillcolor=colour)
    for a, b in graph.edges:
        dot.edge(a, b)
    return dot.source


def render_graph(graph: Graph, out_stem: str | Path, stage_of: dict[str, int] | None = None, title: str = "") -> Path:
    """Write ``out_stem.dot`` and, where ``dot`` is installed, ``out_stem.svg``; return the picture.

    Without graphviz's binary (or its Python package) we print one warning line and return the
    .dot file, which any graphviz installation can render later.
    """
    stem = Path(out_stem)
    dot_path = stem.with_suffix(".dot")
    try:
        source = to_dot(graph, stage_of, title)
    except ImportError:
        print("warning: the graphviz Python package is missing; no picture written", file=sys.stderr)
        return dot_path
    dot_path.write_text(source)
    if shutil.which("dot") is None:
        print(f"warning: graphviz 'dot' not installed; wrote {dot_path} only", file=sys.stderr)
        return dot_path
    import subprocess

    svg = stem.with_suffix(".svg")
    proc = subprocess.run(["dot", "-Tsvg", str(dot_path), "-o", str(svg)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        print(f"warning: dot failed ({proc.stderr.strip()[:200]}); wrote {dot_path} only", file=sys.stderr)
        return dot_path
    return svg
