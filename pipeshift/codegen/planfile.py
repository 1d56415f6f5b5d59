"""What codegen reads from a plan beyond its split: the model spec, leaf policy and batch size.

Every plan has stages (:mod:`pipeshift.plan` checks them); only a plan codegen can turn into
code also names the model it was made from. These checks raise through :meth:`Plan.error`, so a
missing or wrong field is reported at its line of plan.json like any other.
"""

from __future__ import annotations

from pipeshift.codegen.support import FQN_RE
from pipeshift.errors import PipeshiftError
from pipeshift.graph.capture import LeafPolicy
from pipeshift.plan import Plan
from pipeshift.spec import ModelSpec


def model_spec(plan: Plan) -> ModelSpec:
    """The model the plan splits, rebuilt from its ``model`` spec."""
    if plan.model is None:
        raise plan.error(("model",), "no 'model' spec: codegen rebuilds the model from it; plan a graph that "
                                     "`pipeshift profile` wrote")
    try:
        return ModelSpec.from_json(dict(plan.model))
    except PipeshiftError as e:
        raise plan.error(("model",), str(e)) from None


def leaf_policy(plan: Plan) -> LeafPolicy:
    try:
        return LeafPolicy.from_json(plan.doc.get("leaf_policy"))
    except PipeshiftError as e:
        raise plan.error(("leaf_policy",), str(e)) from None


def batch_size(plan: Plan) -> int:
    if plan.batch_size is None:
        raise plan.error(("batch_size",), "must be a positive integer (the profiled batch size), got None")
    return plan.batch_size


def check_for_codegen(plan: Plan) -> None:
    """Everything codegen will write from the plan is well-formed (module names end up in source)."""
    model_spec(plan)
    leaf_policy(plan)
    batch_size(plan)
    for st in plan.stages:
        for j, f in enumerate(st.fqns):
            if not FQN_RE.match(f):
                raise plan.error(("stages", st.stage_id, "fqns", j),
                                 f"{f!r} is not a dotted module name like 'layer1.0.conv1'")
