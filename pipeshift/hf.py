"""Hugging Face transformers models as a model spec: ``pipeshift.hf:auto --model-arg path=DIR``.

``DIR`` is a model directory as users keep them: ``config.json`` and, when present, its
``*.safetensors`` weights (loaded, not re-initialised; without weights the model is initialised
from the spec's seed). Nothing is ever fetched from the hub. ``--model-arg task=`` picks the
head — ``causal-lm`` (``AutoModelForCausalLM``), ``seq2seq-lm`` (``AutoModelForSeq2SeqLM``, T5:
two inputs, ``input_ids`` and ``decoder_input_ids``), ``seq-cls`` (``…ForSequenceClassification``)
or ``image-cls`` (``…ForImageClassification``) — and ``--model-arg config.KEY=VALUE`` overrides a
field of the configuration (``config.num_hidden_layers=2``).

The model keeps its class and its parameter names, so a pipeshift checkpoint or export loads
into ``from_pretrained``'s model and the other way round, and a tied head stays tied. Only its
``forward`` changes, to what a pipeline needs: tensors in, logits out, no cache
(``use_cache=False``). Attention defaults to the ``eager`` implementation, whose dropout follows
``module.training`` (``--model-arg attn_implementation=sdpa`` to choose another).

The graph keeps the model's transformer blocks whole (its ``_no_split_modules``, the classes
Hugging Face never splits across devices) unless ``pipeshift profile`` is given its own
``--leaf``/``--leaf-type``/``--depth`` or ``--no-model-leaves``.

The bundle brings its task's loss (the one ``labels=`` would compute: next-token cross-entropy
for ``causal-lm``, token cross-entropy against the decoder's targets for ``seq2seq-lm``,
cross-entropy over the labels otherwise) but no data: pass ``--data``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.spec import ModelBundle

TASKS = {
    "causal-lm": ("AutoModelForCausalLM", ("input_ids",)),
    "seq2seq-lm": ("AutoModelForSeq2SeqLM", ("input_ids", "decoder_input_ids")),
    "seq-cls": ("AutoModelForSequenceClassification", ("input_ids",)),
    "image-cls": ("AutoModelForImageClassification", ("pixel_values",)),
}
_CONFIG_PREFIX = "config."
_logits_classes: dict[tuple[type, tuple[str, ...]], type] = {}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise PipeshiftError("pipeshift.hf needs transformers: pip install -e '.[hf]'") from None
    return transformers


def logits_class(base: type, input_names: tuple[str, ...]) -> type:
    """A subclass of ``base`` whose ``forward(*inputs)`` returns the logits alone, without a cache.

    It keeps ``base``'s name (``save_pretrained`` records it as the architecture) and everything
    else; only the signature changes, so tracers see tensors in and one tensor out.
    """
    key = (base, input_names)
    if key in _logits_classes:
        return _logits_classes[key]
    accepted = inspect.signature(base.forward).parameters
    fixed = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in accepted}
    forward: Callable[..., torch.Tensor]
    if len(input_names) == 1:  # tracers read the signature: one named tensor argument per input
        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return base.forward(self, **{input_names[0]: x}, **fixed).logits
    else:
        def forward(self: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return base.forward(self, **dict(zip(input_names, (x, y))), **fixed).logits

    args = ", ".join(f"{name}={v}" for name, v in zip(input_names, "xy"))
    forward.__doc__ = f"``{base.__name__}.forward({args}{''.join(f', {k}={v}' for k, v in fixed.items())}).logits``"
    cls = type(base.__name__, (base,), {"forward": forward, "__module__": __name__,
                                        "__doc__": f"{base.__name__} returning logits only (pipeshift.hf)"})
    _logits_classes[key] = cls
    return cls


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in kwargs if not k.startswith(_CONFIG_PREFIX) or len(k) == len(_CONFIG_PREFIX)]
    if unknown:
        raise PipeshiftError(
            f"pipeshift.hf:auto has no argument {unknown[0]!r}: it takes path, task, seq_len, attn_implementation "
            "and config.KEY=VALUE overrides")
    return {k[len(_CONFIG_PREFIX):]: v for k, v in kwargs.items()}


def auto(path: str, task: str = "causal-lm", seq_len: int = 32, attn_implementation: str = "eager",
         **config_overrides: Any) -> ModelBundle:
    """Build the model in directory ``path`` for ``task`` (see the module docstring)."""
    if task not in TASKS:
        raise PipeshiftError(f"task={task!r}: one of {', '.join(TASKS)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise PipeshiftError(f"seq_len={seq_len!r}: expected a positive integer")
    directory = Path(str(path))
    if not (directory / "config.json").is_file():
        raise PipeshiftError(f"path={path}: no config.json there (a local model directory, e.g. from save_pretrained)")
    overrides = _overrides(config_overrides)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise PipeshiftError(f"{directory}/config.json: {str(e).splitlines()[0][:200]}") from None
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise PipeshiftError(f"config.{key}: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    auto_name, input_names = TASKS[task]
    auto_cls = getattr(tf, auto_name)
    try:
        # Built from the configuration; the directory's weights are the bundle's ``init_from``,
        # loaded by whoever materialises the parameters (all of them, or a rank its stages').
        model = auto_cls.from_config(config, attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as e:
        raise PipeshiftError(f"{directory}: cannot build {auto_name} for {type(config).__name__}: "
                             f"{str(e).splitlines()[0][:200]}") from None
    model.__class__ = logits_class(type(model), input_names)
    blocks = tuple(str(c) for c in (getattr(model, "_no_split_modules", None) or ()))
    return ModelBundle(model=model, example_inputs=_example_inputs(config, task, seq_len),
                       criterion=_criterion(task), example_target=_example_target(config, task, seq_len),
                       leaf_types=blocks, init_from=str(directory) if any(directory.glob("*.safetensors")) else None)


def _vocab(config: Any) -> int:
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise PipeshiftError(f"{type(config).__name__} has no vocab_size: cannot make example token ids")
    return vocab


def _example_inputs(config: Any, task: str, seq_len: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def make(batch_size: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        if task == "image-cls":
            size = getattr(config, "image_size", 224)
            channels = getattr(config, "num_channels", 3)
            return (torch.randn(batch_size, channels, size, size, generator=g),)
        ids = torch.randint(0, _vocab(config), (batch_size, seq_len), generator=g)
        if task == "seq2seq-lm":  # the decoder reads the target shifted right
            return (ids, torch.randint(0, _vocab(config), (batch_size, seq_len), generator=g))
        return (ids,)

    return make


def _example_target(config: Any, task: str, seq_len: int) -> Callable[[int], torch.Tensor]:
    def make(batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        if task in ("causal-lm", "seq2seq-lm"):
            return torch.randint(0, _vocab(config), (batch_size, seq_len), generator=g)
        return torch.randint(0, max(int(getattr(config, "num_labels", 2)), 2), (batch_size,), generator=g)

    return make


def _criterion(task: str) -> Callable[[], nn.Module]:
    if task in ("causal-lm", "seq2seq-lm"):  # targets aligned with the (decoder) positions
        from pipeshift.losses import CausalLMLoss

        return CausalLMLoss
    return nn.CrossEntropyLoss
