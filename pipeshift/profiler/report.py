"""Write a profile to disk and to the terminal: graph.txt, profile.json, a picture, a table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeshift.graph import write_graph_txt
from pipeshift.graph.render import render_graph
from pipeshift.profiler.profile import ModelProfile


def write_profile(profile: ModelProfile, directory: Path) -> list[Path]:
    """graph.txt and profile.json into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    graph_path = directory / "graph.txt"
    json_path = directory / "profile.json"
    write_graph_txt(profile.graph(), graph_path)
    json_path.write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    return [graph_path, json_path]


# -- picture ---------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _picture_style(profile: ModelProfile) -> tuple[dict[str, str], dict[str, str]]:
    """Labels (id, what it is, times, output size) and fills shaded by time, per node id."""
    groups = profile.captured.groups
    costs = [p.forward.median + p.backward.median for p in profile.nodes]
    top = max(costs, default=0.0) or 1.0
    labels, fills = {}, {}
    for group, prof, cost in zip(groups, profile.nodes, costs):
        what = group.target if group.op in ("call_module", "get_attr") else group.desc
        what = what if len(what) <= 48 else what[:45] + "..."
        labels[group.node_id] = (
            f"{group.node_id}: {what}\nfwd {prof.forward.median:.3f} ms, bwd {prof.backward.median:.3f} ms\n"
            f"out {human_bytes(sum(group.activation_bytes))}"
        )
        saturation = 0.05 + 0.6 * cost / top  # near white for free nodes, orange for the heaviest
        fills[group.node_id] = f"0.08 {saturation:.3f} 1.0"
    return labels, fills


def write_picture(profile: ModelProfile, directory: Path) -> tuple[Path | None, str | None]:
    """``graph.svg`` rendered by graphviz's ``dot``; else ``graph.dot`` and a one-line warning.

    The picture is a convenience: any failure of graphviz falls back to the DOT text
    (:func:`~pipeshift.graph.render.render_graph`), which ``dot -Tsvg`` renders later.
    """
    labels, fills = _picture_style(profile)
    picture = render_graph(profile.graph(), directory / "graph", labels=labels, fills=fills, keep_dot=False)
    return picture.path, picture.warning


# -- table -----------------------------------------------------------------------------
def heaviest_nodes(profile: ModelProfile, top: int = 15) -> pd.DataFrame:
    """The ``top`` nodes by median forward+backward time, with their sizes."""
    total = sum(p.forward.median + p.backward.median for p in profile.nodes) or 1.0
    rows = []
    for group, prof in zip(profile.captured.groups, profile.nodes):
        cost = prof.forward.median + prof.backward.median
        what = group.target if group.op in ("call_module", "get_attr") else group.desc
        rows.append({
            "node": group.node_id,
            "op": group.op.replace("call_", ""),
            "what": what if len(what) <= 40 else what[:37] + "...",
            "fwd ms": prof.forward.median,
            "fwd p10-p90": f"{prof.forward.p10:.3f}-{prof.forward.p90:.3f}",
            "bwd ms": prof.backward.median,
            "bwd p10-p90": f"{prof.backward.p10:.3f}-{prof.backward.p90:.3f}",
            "share %": 100.0 * cost / total,
            "output": human_bytes(sum(group.activation_bytes)),
            "params": human_bytes(group.parameter_bytes),
            "saved": human_bytes(prof.saved.total),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["_cost"] = df["fwd ms"] + df["bwd ms"]
    return df.sort_values("_cost", ascending=False, kind="stable").head(top).drop(columns="_cost")


def format_table(profile: ModelProfile, top: int = 15) -> str:
    df = heaviest_nodes(profile, top)
    header = (
        f"batch {profile.batch_size}, {profile.threads} thread(s), {profile.device}: "
        f"{len(profile.nodes)} nodes, sum fwd {sum(p.forward.median for p in profile.nodes):.3f} ms "
        f"+ bwd {sum(p.backward.median for p in profile.nodes):.3f} ms "
        f"(whole step {profile.whole_forward.median:.3f} + {profile.whole_backward.median:.3f} ms)"
    )
    if df.empty:
        return header
    body = df.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    return f"{header}\n{body}"
