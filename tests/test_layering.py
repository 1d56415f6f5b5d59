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


def test_plan_command_never_imports_torch_or_pandas(tmp_path: Path) -> None:
    """``pipeshift plan`` without --tp must start in well under a second: torch alone costs ~2 s to import."""
    import subprocess
    import sys

    from pipeshift.graph import Graph, Node, write_graph_txt

    g = Graph()
    g.add_node(Node("node1", "Input0"))
    for i in range(2, 8):
        g.add_node(Node(f"node{i}", "Linear(4, 4)", forward_ms=1.0 + i, backward_ms=2.0,
                        activation_size=1000.0, parameter_size=4000.0))
        g.add_edge(f"node{i - 1}", f"node{i}")
    write_graph_txt(g, tmp_path / "graph.txt")
    probe = ("import sys, runpy; sys.argv = ['pipeshift', 'plan', sys.argv[1], '-n', '2', '-b', '1e9', "
             "'-o', sys.argv[2], '-q']\n"
             "try:\n    runpy.run_module('pipeshift', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "graph.txt"), str(tmp_path / "plan")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(tmp_path.glob("plan*")), out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
