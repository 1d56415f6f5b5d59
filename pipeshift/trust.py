"""Which model specs pipeshift may call: plans, checkpoints and conf.json are data, not code.

A spec (``pkg.module:callable`` plus keyword arguments) names code to import and run. Files
travel — a plan.json mailed by a colleague, a checkpoint from a shared disk, a plan sent to the
master — so a spec read from one is run only when it is

* the spec of the stage package or command line the user named (code they chose to run),
* one of pipeshift's own builders (the zoo, ``pipeshift.hf:auto``), which build a model from
  numbers and local files and import nothing the caller names, or
* allowed explicitly with ``--trust-spec`` (Hugging Face's ``trust_remote_code``, for us).

Anything else is refused before it is imported, with one line that says how to allow it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeshift.errors import PipeshiftError
from pipeshift.spec import ModelSpec

TRUST_FLAG = "--trust-spec"
# Builders that live in pipeshift and take only numbers, names and local paths as arguments.
HF_BUILDERS = frozenset({"pipeshift.hf:auto"})


def builtin_builder(callable_name: str) -> bool:
    """``callable_name`` is one of pipeshift's own model builders (a zoo entry or the HF loader)."""
    if callable_name in HF_BUILDERS:
        return True
    module, _, attr = callable_name.partition(":")
    if module != "pipeshift.models":
        return False
    from pipeshift.models import ZOO

    return attr in ZOO


def check_spec(spec: ModelSpec, source: str, *, trusted: Iterable[ModelSpec | None] = (),
               trust_spec: bool = False) -> None:
    """Refuse to run ``spec`` (read from ``source``) unless the trust rule above allows it.

    The example-input callable (``inputs``) is code as well: a builtin builder is trusted only
    without one, or with one the user named.
    """
    if trust_spec:
        return
    known = [t for t in trusted if t is not None]
    if any(spec == t for t in known):
        return
    if builtin_builder(spec.callable) and spec.inputs is None:
        return
    named = spec.inputs if spec.inputs is not None and builtin_builder(spec.callable) else spec.callable
    if known:
        why = f"it differs from the spec of the package you named ({known[0].callable}, seed {known[0].seed})"
    else:
        why = "it is not one of pipeshift's builders"
    raise PipeshiftError(
        f"{source}: refusing to run {named!r} named in a data file ({why}); "
        f"pass {TRUST_FLAG} if you trust this file's code"
    )


def spec_or_none(data: object) -> ModelSpec | None:
    """A spec parsed from a JSON value, or None when the value does not describe one."""
    try:
        return ModelSpec.from_json(data)
    except PipeshiftError:
        return None
