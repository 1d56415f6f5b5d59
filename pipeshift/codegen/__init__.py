"""codegen step: a plan → a package of readable per-stage ``nn.Module`` files (DESIGN.md).

In-process API (the runtime uses it to regenerate stages when it repartitions):

- :func:`generate_package` ``(plan, out_dir) -> Path`` — write ``stage0.py … stageK.py``,
  ``__init__.py``, ``conf.json`` and a copy of ``plan.json``; ``plan`` is a plan.json dict, a
  path to one (file or directory), or a validated :class:`Plan`.
- :func:`load_package` ``(path) -> module`` — import a package from a directory under a fresh
  unique module name, without touching ``sys.path``.
- :func:`build_stages` ``(plan, model) -> [(stage_module, input_names, output_names), …]`` —
  the same generated source, instantiated over a model the caller already holds.
- :func:`render_package` ``(plan) -> Rendered`` — the files as text, and the layout behind them.
- :func:`capture_model` ``(plan) -> ModelCapture`` — the split-independent part (the model's graph),
  passed as ``model_capture=`` to the two above when one job renders many splits of one model.
"""

from pipeshift.codegen.package import (
    ModelCapture,
    build_stages,
    capture_model,
    generate_package,
    load_package,
    render_package,
)
from pipeshift.codegen.partition import CodegenError

__all__ = [
    "CodegenError",
    "ModelCapture",
    "build_stages",
    "capture_model",
    "generate_package",
    "load_package",
    "render_package",
]
