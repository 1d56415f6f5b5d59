"""Reading the JSON files users hand us (plan.json, conf.json, …) — one strict reader.

Every step that takes a JSON file from outside goes through :func:`read_json_object`, so a
missing, oversized, non-UTF-8, malformed or too deeply nested file gets the same one-line
``file:line: what is wrong`` everywhere; callers add only their own schema checks.
"""

from __future__ import annotations

import json
import os
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
        data = json.loads(p.read_text(encoding="utf-8"))
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
    return data
