"""Data for the zoo: synthetic batches, and two small *real* datasets that need no download.

Convergence checks need real data, but tests and demos must run offline on a fresh machine. So
the real datasets come from files that scikit-learn (already a dependency) ships inside its
wheel:

- **digits** — ``sklearn.datasets.load_digits``: 1797 handwritten digits, 8x8 grayscale,
  10 classes. Image models see them bilinearly upsampled to their input size and replicated to
  their channel count; the MLP sees the 64 raw pixels. Pixels are standardised with the mean and
  standard deviation of the training split.
- **text** — the English dataset descriptions under ``sklearn/datasets/descr/*.rst`` (≈43 KB of
  prose), read in file-name order and encoded one character per token with the fixed vocabulary
  :data:`TEXT_VOCAB` (so token ids do not depend on which characters a scikit-learn version
  happens to use). GPT learns next-character prediction on it; GNMT learns to *reverse* windows
  of it, a transduction task that needs attention to align source and target.

Every source has a ``train`` and a ``val`` split (digits: a fixed 80/20 permutation; text: the
first 90% of characters and the last 10%, so windows never straddle the two) and yields an
endless, deterministic stream of ``(inputs_tuple, target)`` for a given ``seed``.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from pipeshift.errors import PipeshiftError

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]
SPLITS = ("train", "val")

# -- seeding ----------------------------------------------------------------------------


def split_generator(split: str, seed: int) -> torch.Generator:
    """A generator that differs per split, so train and val streams never coincide."""
    if split not in SPLITS:
        raise PipeshiftError(f"data split {split!r}: expected one of {', '.join(SPLITS)}")
    return torch.Generator().manual_seed(int(seed) * len(SPLITS) + SPLITS.index(split))


def index_batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatches of indices into ``n`` samples: shuffled epochs, run together.

    A batch that would cross an epoch boundary takes its tail from the next epoch's shuffle, so
    every batch is full and every sample is seen once per epoch.
    """
    if batch_size < 1:
        raise PipeshiftError(f"batch size must be positive, got {batch_size}")
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=g)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


# -- synthetic --------------------------------------------------------------------------


def synthetic_classification(
    make_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]], num_classes: int
) -> Callable[..., Iterator[Batch]]:
    """Random inputs from ``make_inputs(batch_size, generator)`` with random labels."""

    def data(batch_size: int, split: str = "train", seed: int = 0) -> Iterator[Batch]:
        g = split_generator(split, seed)
        while True:
            inputs = make_inputs(batch_size, g)
            yield inputs, torch.randint(0, num_classes, (batch_size,), generator=g)

    return data


# -- digits -----------------------------------------------------------------------------

DIGITS_CLASSES = 10


@functools.lru_cache(maxsize=None)
def _digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = len(labels) // 5
    train, val = order[n_val:], order[:n_val]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return {"train": (images[train], labels[train]), "val": (images[val], labels[val])}


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, 8, 8) standardised float32, labels (N,) int64)`` of one split."""
    if split not in SPLITS:
        raise PipeshiftError(f"data split {split!r}: expected one of {', '.join(SPLITS)}")
    return _digits()[split]


def check_digits_classes(num_classes: int) -> None:
    if num_classes < DIGITS_CLASSES:
        raise PipeshiftError(f"data='digits' has {DIGITS_CLASSES} classes; num_classes={num_classes} is too few")


def digits_images(channels: int, image_size: int) -> Callable[..., Iterator[Batch]]:
    """Digits upsampled (bilinear) to ``image_size`` and replicated to ``channels`` channels."""

    def data(batch_size: int, split: str = "train", seed: int = 0) -> Iterator[Batch]:
        images, labels = digits_split(split)
        for idx in index_batches(len(labels), batch_size, split_generator(split, seed)):
            x = F.interpolate(images[idx], size=(image_size, image_size), mode="bilinear", align_corners=False)
            yield (x.expand(-1, channels, -1, -1).contiguous(),), labels[idx]

    return data


def digits_vectors() -> Callable[..., Iterator[Batch]]:
    """Digits as flat 64-pixel vectors (for the MLP)."""

    def data(batch_size: int, split: str = "train", seed: int = 0) -> Iterator[Batch]:
        images, labels = digits_split(split)
        for idx in index_batches(len(labels), batch_size, split_generator(split, seed)):
            yield (images[idx].flatten(1),), labels[idx]

    return data


# -- text -------------------------------------------------------------------------------

BOS = 0  # begins a decoder input (GNMT)
UNK = 1  # any character outside the printable ASCII set
TEXT_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
TEXT_VOCAB_SIZE = 2 + len(TEXT_VOCAB)
_CHAR_ID = {c: i + 2 for i, c in enumerate(TEXT_VOCAB)}


def encode_text(text: str) -> torch.Tensor:
    return torch.tensor([_CHAR_ID.get(c, UNK) for c in text], dtype=torch.long)


def decode_text(ids: torch.Tensor) -> str:
    return "".join(TEXT_VOCAB[i - 2] if i >= 2 else "?" for i in ids.tolist())


@functools.lru_cache(maxsize=None)
def text_corpus() -> str:
    """The English prose shipped in scikit-learn's dataset descriptions, in file-name order."""
    descr = importlib.resources.files("sklearn.datasets.descr")
    files = sorted((p for p in descr.iterdir() if p.name.endswith(".rst")), key=lambda p: p.name)
    return "".join(p.read_text(encoding="utf-8") for p in files)


@functools.lru_cache(maxsize=None)
def _text_ids() -> dict[str, torch.Tensor]:
    ids = encode_text(text_corpus())
    cut = len(ids) * 9 // 10
    return {"train": ids[:cut], "val": ids[cut:]}


def text_split(split: str) -> torch.Tensor:
    """Token ids (int64) of one split of the text corpus."""
    if split not in SPLITS:
        raise PipeshiftError(f"data split {split!r}: expected one of {', '.join(SPLITS)}")
    return _text_ids()[split]


def check_text_vocab(vocab_size: int) -> None:
    if vocab_size < TEXT_VOCAB_SIZE:
        raise PipeshiftError(f"data='text' needs vocab_size >= {TEXT_VOCAB_SIZE}, got {vocab_size}")


def text_windows(split: str, seed: int, batch_size: int, length: int) -> Iterator[torch.Tensor]:
    """Endless ``(batch_size, length)`` windows of the corpus at uniformly random offsets."""
    ids = text_split(split)
    if length > len(ids):
        raise PipeshiftError(f"sequence length {length} exceeds the {split} text ({len(ids)} characters)")
    g = split_generator(split, seed)
    offsets = torch.arange(length)
    while True:
        starts = torch.randint(0, len(ids) - length + 1, (batch_size, 1), generator=g)
        yield ids[starts + offsets]


def random_windows(split: str, seed: int, batch_size: int, length: int, vocab_size: int) -> Iterator[torch.Tensor]:
    """Synthetic stand-in for :func:`text_windows`: uniformly random token ids."""
    g = split_generator(split, seed)
    while True:
        yield torch.randint(0, vocab_size, (batch_size, length), generator=g)


def next_token_batches(windows: Iterator[torch.Tensor]) -> Iterator[Batch]:
    """Language modelling: input is the window but its last token, target the window shifted by one."""
    for w in windows:
        yield (w[:, :-1],), w[:, 1:]


def reversal_batches(windows: Iterator[torch.Tensor]) -> Iterator[Batch]:
    """Transduction: translate a window into its reverse (teacher forcing: BOS + target[:-1])."""
    for src in windows:
        tgt = src.flip(1)
        tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
        yield (src, tgt_in), tgt
