"""Data sources users name with ``--data`` for what they do first: a text file, a file of tensors.

Each is ``fn(batch_size, split, seed, **data_args)`` → an endless iterator of ``(inputs_tuple,
target)`` (see :mod:`pipeshift.runspec`), deterministic for a seed, so every run — and the
single-process reference a test computes — sees the same batches. ``split`` is ``"train"`` or
``"val"``: the last ``val_fraction`` of the file is held out for evaluation.

* :func:`text_file` — ``--data pipeshift.data:text_file --data-arg path=corpus.txt
  --data-arg seq_len=64 [--data-arg tokenizer=MODEL_DIR]``: windows of ``seq_len`` tokens and, as
  target, the next token of each position (use with ``--loss pipeshift.losses:causal_lm``).
  Tokens are bytes (ids 0-255) unless ``tokenizer`` names a local model directory with a
  tokenizer (read with ``transformers.AutoTokenizer``, never from the hub).
* :func:`tensor_file` — ``--data pipeshift.data:tensor_file --data-arg path=data.safetensors``:
  tensors ``input0``, ``input1``, … and ``target`` whose first dimension is the sample; batches
  are drawn without replacement, reshuffled every epoch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeshift.errors import PipeshiftError
from pipeshift.spec import Batch

_SPLITS = ("train", "val")
MAX_TEXT_BYTES = 1 << 30


def _check_common(batch_size: int, split: str, val_fraction: float, what: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PipeshiftError(f"{what}: batch size {batch_size!r} must be a positive integer")
    if split not in _SPLITS:
        raise PipeshiftError(f"{what}: split {split!r} is not one of {', '.join(_SPLITS)}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise PipeshiftError(f"{what}: val_fraction={val_fraction!r}: expected a number between 0 and 1")


def _split_range(n: int, split: str, val_fraction: float) -> tuple[int, int]:
    cut = n - max(1, int(round(n * val_fraction)))
    return (0, cut) if split == "train" else (cut, n)


# -- text --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokens(path: str, tokenizer: str, mtime_ns: int) -> torch.Tensor:  # noqa: ARG001 - mtime keys the cache
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise PipeshiftError(f"{path}: {size} bytes, more than text_file reads ({MAX_TEXT_BYTES})")
    raw = p.read_bytes()
    if tokenizer == "bytes":
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PipeshiftError("tokenizer=DIR needs transformers: pip install -e '.[hf]'") from None
    if not Path(tokenizer).is_dir():
        raise PipeshiftError(f"tokenizer={tokenizer!r}: not a directory (a local model directory, or 'bytes')")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PipeshiftError(f"tokenizer={tokenizer}: no usable tokenizer there ({str(e).splitlines()[0][:200]})") from None
    text = raw.decode("utf-8", errors="replace")
    return torch.tensor(tok(text)["input_ids"], dtype=torch.int64)


def text_file(batch_size: int, split: str, seed: int, *, path: str, seq_len: int = 32, tokenizer: str = "bytes",
              val_fraction: float = 0.1) -> Iterator[Batch]:
    """Random windows of ``seq_len`` tokens of ``path``; target: each position's next token."""
    what = f"text_file path={path}"
    _check_common(batch_size, split, val_fraction, what)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise PipeshiftError(f"{what}: seq_len={seq_len!r} must be a positive integer")
    p = Path(str(path))
    if not p.is_file():
        raise PipeshiftError(f"{what}: file not found")
    tokens = _tokens(str(p.resolve()), str(tokenizer), os.stat(p).st_mtime_ns)
    lo, hi = _split_range(len(tokens), split, val_fraction)
    part = tokens[lo:hi]
    if len(part) < seq_len + 1:
        raise PipeshiftError(f"{what}: the {split} split has {len(part)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return _windows(part, batch_size, seq_len, seed * 2 + (split == "val"))


def _windows(part: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(part) - seq_len, (batch_size,), generator=g)
        rows = part[starts[:, None] + offsets]
        yield (rows[:, :-1].contiguous(),), rows[:, 1:].contiguous()


# -- tensors -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _load_tensors(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:  # noqa: ARG001 - mtime keys the cache
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # hostile or truncated input: one clear line
        raise PipeshiftError(f"{path}: cannot be read as tensors ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise PipeshiftError(f"{path}: expected a mapping of names to tensors")
    return data


def tensor_file(batch_size: int, split: str, seed: int, *, path: str, inputs: str | None = None,
                target: str = "target", val_fraction: float = 0.1, shuffle: bool = True) -> Iterator[Batch]:
    """Batches of the samples in a ``.safetensors`` or ``.pt`` file of named tensors.

    ``inputs`` names the input tensors in forward order (comma-separated; default ``input0``,
    ``input1``, … as far as they exist); ``target`` the target tensor.
    """
    what = f"tensor_file path={path}"
    _check_common(batch_size, split, val_fraction, what)
    p = Path(str(path))
    if not p.is_file():
        raise PipeshiftError(f"{what}: file not found")
    data = _load_tensors(str(p.resolve()), os.stat(p).st_mtime_ns)
    if inputs is None:
        names = []
        while f"input{len(names)}" in data:
            names.append(f"input{len(names)}")
    else:
        names = [n.strip() for n in str(inputs).split(",") if n.strip()]
    missing = [n for n in [*names, str(target)] if n not in data]
    if not names or missing:
        raise PipeshiftError(f"{what}: no tensor {(missing or ['input0'])[0]!r} in the file (it has {sorted(data)[:8]})")
    tensors = [data[n] for n in names] + [data[str(target)]]
    n = len(tensors[0]) if tensors[0].dim() else 0
    if n == 0 or any(t.dim() == 0 or len(t) != n for t in tensors):
        raise PipeshiftError(f"{what}: {', '.join(names)} and {target} must share a non-empty first (sample) dimension")
    lo, hi = _split_range(n, split, val_fraction)
    if hi - lo < batch_size:
        raise PipeshiftError(f"{what}: the {split} split has {hi - lo} samples, fewer than a batch of {batch_size}")
    if isinstance(shuffle, str) and shuffle.lower() in ("true", "false"):
        shuffle = shuffle.lower() == "true"
    if not isinstance(shuffle, bool):
        raise PipeshiftError(f"{what}: shuffle={shuffle!r}: expected true or false")
    return _batches([t[lo:hi] for t in tensors], batch_size, seed * 2 + (split == "val"), shuffle)


def _batches(tensors: list[torch.Tensor], batch_size: int, seed: int, shuffle: bool) -> Iterator[Batch]:
    n = len(tensors[0])
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for start in range(0, n - batch_size + 1, batch_size):  # whole batches only: every microbatch one shape
            idx = order[start:start + batch_size]
            picked = [t[idx] for t in tensors]
            yield tuple(picked[:-1]), picked[-1]
