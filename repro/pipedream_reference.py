"""What PipeDream's own optimizer finds on the published profiles (``reference.json``).

The profile directory may hold ``reference.json``: for some profile + optimizer flag sets, the
optimum PipeDream's ``optimizer_graph_hierarchical.py`` printed ("Time per stage in pipeline")
and its printed splits, ``[start_state, end_state, compute_s, replication]`` per stage, the
outermost level first and then, for each outer stage in order, the inner level's stages over
that stage's range. Where a Table 1 run uses exactly such a flag set, the reproduction shows
PipeDream's own configuration beside ours and the paper's: it separates "our planner differs
from PipeDream's optimizer" (a bug) from "PipeDream's optimizer differs from the paper" (a fact
about the profiles and the paper).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeshift.errors import InputFileError


@dataclasses.dataclass(frozen=True)
class ReferenceEntry:
    profile: str  # "vgg16/graph.txt"
    num_workers: tuple[int, ...]  # -n, innermost first
    bandwidths: tuple[float, ...]  # -b, innermost first
    time_per_stage_s: float
    replicas: tuple[int, ...] | None  # flattened configuration, None if the printout cannot be read


def _flags(text: str) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """(-n, -b) when the flags are only -n, -b and an activation compression ratio of 1; else None."""
    try:
        words = shlex.split(text)
    except ValueError:
        return None
    n: list[int] = []
    b: list[float] = []
    current: list | None = None
    compression = None
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-n", "--all_num_machines"):
            current = n
        elif w in ("-b", "--network_bandwidths"):
            current = b
        elif w == "--activation_compression_ratio" and i + 1 < len(words):
            compression = words[i + 1]
            current = None
            i += 1
        elif w.startswith("-"):
            return None  # another flag (straight pipeline, memory constraint, ...): not a Table 1 run
        elif current is n:
            if not w.isdigit():
                return None
            n.append(int(w))
        elif current is b:
            try:
                b.append(float(w))
            except ValueError:
                return None
        else:
            return None
        i += 1
    try:
        if compression is None or float(compression) != 1.0:
            return None
    except ValueError:
        return None
    if not n:
        return None
    if not b:
        b = [1e9] * len(n)  # PipeDream's default
    if len(b) != len(n):
        return None
    return tuple(n), tuple(b)


def flatten_splits(splits: Sequence[Sequence[float]], levels: int, states: int) -> tuple[int, ...] | None:
    """Per-stage replication of a printed hierarchical split (1 or 2 levels), or None if unreadable."""
    rows = []
    for s in splits:
        if not (isinstance(s, (list, tuple)) and len(s) == 4 and all(isinstance(x, (int, float)) for x in s)):
            return None
        rows.append((int(s[0]), int(s[1]), int(s[3])))
    if levels == 1:
        return tuple(r for _, _, r in rows) if rows and rows[-1][1] == states else None
    if levels != 2:
        return None
    outer = []
    pos = 0
    while pos < len(rows):
        outer.append(rows[pos])
        pos += 1
        if outer[-1][1] == states:
            break
    else:
        return None
    flat: list[int] = []
    for _, end, outer_replicas in outer:
        inner_seen = False
        while pos < len(rows):
            _, inner_end, inner_replicas = rows[pos]
            pos += 1
            flat.append(outer_replicas * inner_replicas)
            inner_seen = True
            if inner_end == end:
                break
        else:
            return None
        if not inner_seen:
            return None
    return tuple(flat) if pos == len(rows) else None


def load_reference(path: Path) -> list[ReferenceEntry]:
    """The Table-1-shaped entries of reference.json ([] when the file is absent)."""
    if not path.is_file():
        return []
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(str(path), getattr(e, "lineno", None), f"invalid JSON ({e})") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InputFileError(str(path), None, "expected an object with an 'entries' list")
    out = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            raise InputFileError(str(path), None, f"entries[{k}] is not an object")
        profile, flags, t = e.get("profile"), e.get("flags"), e.get("time_per_stage_s")
        if not isinstance(profile, str) or not isinstance(flags, str):
            raise InputFileError(str(path), None, f"entries[{k}]: 'profile' and 'flags' must be strings")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise InputFileError(str(path), None, f"entries[{k}]: time_per_stage_s must be a positive number")
        parsed = _flags(flags)
        if parsed is None:
            continue
        n, b = parsed
        states = e.get("states")
        splits = e.get("printed_splits")
        replicas = None
        if isinstance(states, int) and isinstance(splits, list):
            replicas = flatten_splits(splits, len(n), states)
        out.append(ReferenceEntry(profile, n, b, float(t), replicas))
    return out


def find_entry(entries: list[ReferenceEntry], profile: str, num_workers: Sequence[int],
               bandwidths: Sequence[float]) -> ReferenceEntry | None:
    """The entry for this profile directory and exactly this topology, if there is one."""
    for e in entries:
        if Path(e.profile).parts[:1] != (profile,):
            continue
        if tuple(num_workers) == e.num_workers and all(
            math.isclose(x, y, rel_tol=1e-9) for x, y in zip(bandwidths, e.bandwidths)
        ):
            return e
    return None
