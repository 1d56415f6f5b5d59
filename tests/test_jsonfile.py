"""The one reader for JSON files from outside: every problem is one `file:line: …` error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeshift.errors import InputFileError
from pipeshift.jsonfile import read_json_object


def test_reads_an_object(tmp_path: Path) -> None:
    f = tmp_path / "plan.json"
    f.write_text('{"stages": [1, 2]}')
    assert read_json_object(f) == {"stages": [1, 2]}


@pytest.mark.parametrize(
    "content,message",
    [
        ('{\n"a": 1,\n}', "x.json:3: invalid JSON: Expecting property name enclosed in double quotes (column 1)"),
        ("[1, 2]", "x.json: expected a JSON object, got list"),
        (b"\xff\xfe{}", "x.json: not UTF-8 text (invalid start byte)"),
        ("[" * 100000 + "]" * 100000, "x.json: JSON nested too deeply; not a plan file"),
        ("{}" + " " * 64, "x.json: larger than 32 bytes; not a plan file"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    f = tmp_path / "x.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    max_bytes = 32 if message.startswith("x.json: larger") else 1 << 30
    with pytest.raises(InputFileError) as info:
        read_json_object(f, "plan file", max_bytes=max_bytes)
    assert str(info.value) == message.replace("x.json", str(f))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"absent\.json: no such plan file \(run it\)$"):
        read_json_object(tmp_path / "absent.json", "plan file", " (run it)")
    with pytest.raises(InputFileError, match="is a directory, expected a plan file"):
        read_json_object(tmp_path, "plan file")
