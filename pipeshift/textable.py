"""Plain-text tables for the terminal, without pandas (which costs a second of start-up)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.3g}"
    return str(value)


def text_table(rows: Sequence[Mapping[str, Any]], left: bool = False) -> str:
    """One header line and one line per row; columns right-aligned (numbers line up) unless ``left``."""
    if not rows:
        return ""
    headers = list(rows[0])
    cells = [headers] + [[_cell(row.get(h)) for h in headers] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    pad = str.ljust if left else str.rjust
    return "\n".join("  ".join(pad(c, w) for c, w in zip(r, widths)).rstrip() for r in cells)
