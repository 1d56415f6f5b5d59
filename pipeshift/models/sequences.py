"""The bundle plumbing shared by the sequence models (GPT, GNMT): token inputs, per-token loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from pipeshift.models import data as datasets
from pipeshift.models.common import DataSource, SequenceCrossEntropy, make_bundle
from pipeshift.models.data import Batch
from pipeshift.spec import ModelBundle

TaskFn = Callable[[Iterator], Iterator[Batch]]


def sequence_bundle(model: nn.Module, *, task: TaskFn, window: int, vocab_size: int, data: str) -> ModelBundle:
    """Windows of ``window`` tokens turned into ``(inputs, target)`` by ``task``.

    ``task`` is :func:`~pipeshift.models.data.next_token_batches` (GPT: input and target are
    ``window - 1`` long) or :func:`~pipeshift.models.data.reversal_batches` (GNMT: source, decoder
    input and target are ``window`` long). ``data="synthetic"`` draws uniform token ids over
    the whole vocabulary; ``data="text"`` windows scikit-learn's English text (see
    :mod:`pipeshift.models.data`). The loss is cross entropy over every target token.
    """
    def synthetic(batch_size: int, split: str = "train", seed: int = 0) -> Iterator[Batch]:
        return task(datasets.random_windows(split, seed, batch_size, window, vocab_size))

    def text() -> DataSource:
        datasets.check_text_vocab(vocab_size)

        def source(batch_size: int, split: str = "train", seed: int = 0) -> Iterator[Batch]:
            return task(datasets.text_windows(split, seed, batch_size, window))

        return source

    return make_bundle(model, data=data, synthetic=synthetic, real={"text": text}, criterion=SequenceCrossEntropy)


def default_vocab(vocab_size: int | None, data: str, synthetic_default: int) -> int:
    """An explicit vocabulary size, else the text corpus' for ``data="text"``, else the model's usual."""
    if vocab_size is not None:
        return vocab_size
    return datasets.TEXT_VOCAB_SIZE if data == "text" else synthetic_default
