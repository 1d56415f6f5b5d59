"""One exception family for everything a user can get wrong.

The CLI turns a :class:`PipeshiftError` into a single line on stderr and a non-zero exit; any
other exception is a bug in pipeshift and keeps its traceback.
"""

from __future__ import annotations

import os


class PipeshiftError(Exception):
    """A problem with the user's input, files, configuration or peers — never a pipeshift bug."""


class InputFileError(PipeshiftError):
    """A malformed input file, reported as ``file:line: what is wrong``."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
