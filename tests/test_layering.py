"""Lower layers never import higher ones: read from the source, so a violation fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pipeshift

ROOT = Path(pipeshift.__file__).parent
# package (or module) -> the pipeshift packages it must never import
FORBIDDEN = {
    "runtime": ("pipeshift.launch", "pipeshift.serve", "pipeshift.testing", "pipeshift.cli"),
    "schedule": ("pipeshift.runtime", "pipeshift.launch", "pipeshift.serve", "pipeshift.codegen"),
    "optimizer": ("pipeshift.runtime", "pipeshift.launch", "pipeshift.serve", "pipeshift.codegen"),
    "plan.py": ("pipeshift.runtime", "pipeshift.launch", "pipeshift.serve", "pipeshift.codegen",
                "pipeshift.optimizer"),
    "graph": ("pipeshift.runtime", "pipeshift.launch", "pipeshift.serve", "pipeshift.optimizer"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer: str) -> None:
    where = ROOT / layer
    files = [where] if where.suffix == ".py" else sorted(where.rglob("*.py"))
    assert files, layer
    bad = [f"{f.relative_to(ROOT.parent)}:{line}: imports {name}"
           for f in files for line, name in _imports(f)
           if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[layer])]
    assert not bad, "\n".join(bad)
