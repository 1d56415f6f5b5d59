"""Reading the JSON files users hand us (plan.json, conf.json, …) — one strict reader.

Every step that takes a JSON file from outside goes through :func:`read_json_object`, so a
missing, oversized, non-UTF-8, malformed or too deeply nested file gets the same one-line
``file:line: what is wrong`` everywhere; callers add only their own schema checks, and
:func:`line_of` turns the place a schema check failed (``("stages", 2, "ranks")``) back into the
line of the file it stands on. The fast C decoder reads the file; positions are worked out only
for the one value an error names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pipeshift.errors import InputFileError

MAX_BYTES = 64 * 1024 * 1024  # far above any plan or config; refuses a wrong file before reading it


def read_json_object(path: str | os.PathLike[str], what: str = "JSON file", hint: str = "",
                     max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """The JSON object in ``path``; any problem is an :class:`InputFileError` naming the file.

    ``what`` names the expected file in messages ("plan file"), ``hint`` is appended to the
    missing-file message (e.g. which command writes it).
    """
    return read_json_text(path, what, hint, max_bytes)[0]


def read_json_text(path: str | os.PathLike[str], what: str = "JSON file", hint: str = "",
                   max_bytes: int = MAX_BYTES) -> tuple[dict[str, Any], str]:
    """:func:`read_json_object` and the text it was decoded from (for :func:`line_of`)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise InputFileError(str(p), None, f"no such {what}{hint}") from None
    except OSError as e:
        raise InputFileError(str(p), None, f"cannot read: {e.strerror or e}") from None
    if p.is_dir():
        raise InputFileError(str(p), None, f"is a directory, expected a {what}")
    if size > max_bytes:
        raise InputFileError(str(p), None, f"larger than {max_bytes} bytes; not a {what}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise InputFileError(str(p), None, f"not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise InputFileError(str(p), e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise InputFileError(str(p), None, f"JSON nested too deeply; not a {what}") from None
    except OSError as e:
        raise InputFileError(str(p), None, f"cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise InputFileError(str(p), None, f"expected a JSON object, got {type(data).__name__}")
    return data, text


JsonPath = tuple[str | int, ...]
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def line_of(text: str, where: JsonPath) -> int | None:
    """The 1-based line on which the value at ``where`` starts in the JSON ``text``, if it is there.

    Walks only along ``where`` (skipping sibling values with the C decoder), so it costs about
    one decode of the text. The deepest part of ``where`` that exists is used, so a missing
    key points at the object that lacks it. ``None`` when ``text`` is not valid JSON.
    """
    try:
        pos = _value_pos(text, _WS.match(text, 0).end(), where)  # type: ignore[union-attr]
    except (ValueError, IndexError):
        return None
    return text.count("\n", 0, pos) + 1


def _skip(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]


def _value_pos(text: str, pos: int, where: JsonPath) -> int:
    """Position of the value at ``where`` below the value starting at ``pos`` (or of the nearest parent)."""
    for part in where:
        if isinstance(part, str) and text.startswith("{", pos):
            i = _skip(text, pos + 1)
            found = None
            while not text.startswith("}", i):
                key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
                i = _skip(text, _skip(text, i) + 1)  # past ':'
                if key == part:
                    found = i
                _, i = _DECODER.raw_decode(text, i)
                i = _skip(text, i)
                if text.startswith(",", i):
                    i = _skip(text, i + 1)
            if found is None:
                return pos
            pos = found
        elif isinstance(part, int) and text.startswith("[", pos):
            i = _skip(text, pos + 1)
            k = 0
            while not text.startswith("]", i) and k < part:
                _, i = _DECODER.raw_decode(text, i)
                i = _skip(text, i)
                if text.startswith(",", i):
                    i = _skip(text, i + 1)
                k += 1
            if k != part or text.startswith("]", i):
                return pos
            pos = i
        else:
            return pos
    return pos
