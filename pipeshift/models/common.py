"""What every zoo entry shares: argument checks, losses, and assembling the :class:`ModelBundle`.

Size knobs arrive from the command line (``--model-arg width=16``), so they are checked here and
a bad value is a :class:`~pipeshift.errors.PipeshiftError`, not a shape error deep in a layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.models.data import Batch
from pipeshift.spec import ModelBundle

DataSource = Callable[..., Iterator[Batch]]


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PipeshiftError(f"{name}={value!r}: expected an integer >= {minimum}")
    return value


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def check_bool(name: str, value: Any) -> bool:
    """A flag; ``--model-arg flag=true`` arrives as the string ``'true'``, so spellings are accepted."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise PipeshiftError(f"{name}={value!r}: expected true or false")


def check_prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise PipeshiftError(f"{name}={value!r}: expected a probability in [0, 1)")
    return float(value)


def scaled(channels: int, width: int, base: int = 64) -> int:
    """A torchvision channel count rescaled by ``width / base`` (identity at the default width)."""
    return max(1, channels * width // base)


class SequenceCrossEntropy(nn.CrossEntropyLoss):
    """Cross entropy over every position: ``(B, T, V)`` logits against ``(B, T)`` token ids."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.flatten(0, -2), target.flatten())


def make_bundle(
    model: nn.Module,
    *,
    data: str,
    synthetic: DataSource,
    real: dict[str, Callable[[], DataSource]],
    criterion: Callable[[], nn.Module],
) -> ModelBundle:
    """Bundle ``model`` with the data source named ``data``.

    Example inputs and targets are the first synthetic batch for seed 0, so they are
    deterministic and always shaped and typed like what training feeds (token ids span the
    vocabulary, labels the classes). ``real`` maps a dataset name to a factory, called only when
    that dataset is chosen (it may reject the model's size, e.g. too few classes).
    """
    if data == "synthetic":
        source = synthetic
    elif data in real:
        source = real[data]()
    else:
        names = ", ".join(repr(n) for n in ["synthetic", *real])
        raise PipeshiftError(f"data={data!r}: this model offers {names}")

    def example_inputs(batch_size: int) -> tuple[torch.Tensor, ...]:
        return next(synthetic(batch_size, "train", 0))[0]

    def example_target(batch_size: int) -> torch.Tensor:
        return next(synthetic(batch_size, "train", 0))[1]

    return ModelBundle(
        model=model,
        example_inputs=example_inputs,
        criterion=criterion,
        example_target=example_target,
        data=source,
    )
