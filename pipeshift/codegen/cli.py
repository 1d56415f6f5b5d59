"""Generate a stage package (stage0.py … stageK.py, __init__.py, conf.json) from a plan.

``pipeshift codegen plan/ -o stages/`` rebuilds the model from the spec recorded in plan.json,
captures its graph again (same spec and leaf policy give the same node ids) and writes one
``StageK(torch.nn.Module)`` per stage with a straight-line ``forward`` over named tensors.
"""

from __future__ import annotations

import argparse

from pipeshift.codegen.package import render_package, write_package
from pipeshift.codegen.planfile import model_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan directory (or its plan.json), as written by `pipeshift plan -o`")
    parser.add_argument("-o", "--output", required=True, help="directory for the stage package")


def run(args: argparse.Namespace) -> int:
    rendered = render_package(args.plan)
    out = write_package(rendered, args.output)
    lay = rendered.layout
    print(f"wrote {out}/: {len(lay.stages)} stages of {model_spec(rendered.plan).callable}")
    for st in lay.stages:
        ins = ", ".join(st.input_names) or "-"
        outs = ", ".join(st.output_names)
        print(f"  stage{st.index}.py  {len(st.groups):4d} nodes  in: {ins}  out: {outs}")
    print(f"  criterion reads {', '.join(lay.criterion_inputs)}")
    if lay.shared:
        print(f"  held by several stages (keep in sync): {', '.join(sorted(lay.shared))}")
    return 0
