"""Generate a stage package (stage0.py … stageK.py, __init__.py, conf.json) from a plan.

``pipeshift codegen plan/ -o stages/`` rebuilds the model from the spec recorded in plan.json,
captures its graph again (same spec and leaf policy give the same node ids) and writes one
``StageK(torch.nn.Module)`` per stage with a straight-line ``forward`` over named tensors.
"""

from __future__ import annotations

import argparse

from pipeshift.codegen.package import render_package, write_package
from pipeshift.codegen.planfile import model_spec
from pipeshift.plan import read_plan
from pipeshift.trust import TRUST_FLAG, check_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan directory (or its plan.json), as written by `pipeshift plan -o`")
    parser.add_argument("-o", "--output", required=True, help="directory for the stage package")
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="run the model spec the plan names even if it is not one of pipeshift's builders "
                             "(the plan is a data file: only pass this for plans you trust)")
    parser.add_argument("--tp-plan", action="append", default=[], metavar="PATTERN=STYLE|FILE|generic",
                        help="which modules tensor-parallel stages shard (default: the plan's, recorded by profile)")


def run(args: argparse.Namespace) -> int:
    from pipeshift.tp_plan import parse_rules

    plan = read_plan(args.plan)
    check_spec(model_spec(plan), plan.source, trust_spec=args.trust_spec)
    rendered = render_package(plan, tp_rules=parse_rules(args.tp_plan))
    out = write_package(rendered, args.output)
    lay = rendered.layout
    print(f"wrote {out}/: {len(lay.stages)} stages of {model_spec(rendered.plan).callable}")
    for st in lay.stages:
        ins = ", ".join(st.input_names) or "-"
        outs = ", ".join(st.output_names)
        print(f"  stage{st.index}.py  {len(st.groups):4d} nodes  in: {ins}  out: {outs}")
    print(f"  criterion reads {', '.join(lay.criterion_inputs)}")
    if rendered.tp_plan is not None:
        degrees = ", ".join(f"stage {st.stage_id}: {st.replicas} x tp {st.tp} on ranks {list(st.ranks)}"
                            for st in rendered.plan.stages)
        print(f"  {degrees}")
        print("  " + rendered.tp_plan.describe().replace("\n", "\n  "))
    for tie in lay.ties:
        print("  tied across stages (gradients summed, stored once): "
              + " = ".join(f"{fqn} (stage {', '.join(map(str, stages))})" for fqn, stages in tie.items()))
    return 0
