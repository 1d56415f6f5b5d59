"""Re-assemble stage checkpoints into one model's weights: ``pipeshift export CKPT_DIR -o OUT``.

``CKPT_DIR`` is a ``--checkpoint-dir`` (its newest checkpoint is used) or one ``step-N``
directory in it. ``OUT`` picks the format:

- ``model.pt`` — one ``torch.save``d state_dict: ``load_state_dict(torch.load("model.pt"))`` on
  the original model (the package's ``full_model()``);
- ``model.safetensors`` — one safetensors file (``safetensors.torch.load_file``);
- a directory (``out/``, or an existing directory) — what ``save_pretrained`` writes:
  ``model.safetensors``, or shards of at most ``--max-shard-size`` and
  ``model.safetensors.index.json``; for a Hugging Face spec also ``config.json``, so
  ``from_pretrained(OUT)`` loads it.

The stage files are memory-mapped and the safetensors outputs are written one tensor at a time,
so exporting never holds the model in memory. When the stage package is reachable
(``--package``) every tensor's name and shape is
checked against the model first — built on the meta device, so the check allocates nothing.
The package comes from ``--package`` only, never from the path a checkpoint records: a
checkpoint is data, and importing a package runs its code.
A weight tied across stages is written once to safetensors (under its first name, as
``save_pretrained`` does); ``.pt`` keeps every name, all of them one tensor, so the original
model's tie survives ``load_state_dict``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.runtime import checkpoint as ckpt

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def byte_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a plain number of bytes (transformers' max_shard_size spelling)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise PipeshiftError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1073741824")
    return int(float(m.group(1)) * _UNITS[unit])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (or one step-N directory in it)")
    p.add_argument("-o", "--output", required=True,
                   help="model.pt (torch), model.safetensors (one file) or DIR/ (safetensors, sharded with an index "
                        "when larger than --max-shard-size; from_pretrained loads it for Hugging Face specs)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard of a directory export (default 5GB)")
    p.add_argument("--package", default=None,
                   help="stage package to check the export against (never taken from the checkpoint)")
    p.add_argument("--no-check", action="store_true", help="do not check the result against the original model")


def output_format(out: str) -> str:
    path = Path(out)
    if out.endswith(("/", "\\")) or path.is_dir():
        return "dir"
    if path.suffix in (".pt", ".pth", ".bin"):
        return "torch"
    if path.suffix == ".safetensors":
        return "safetensors"
    if not path.suffix:
        return "dir"
    raise PipeshiftError(f"-o {out}: unknown format {path.suffix!r} (use .pt, .safetensors or a directory)")


def run(args: argparse.Namespace) -> int:
    fmt = output_format(args.output)
    max_bytes = byte_size(args.max_shard_size)
    where = ckpt.resolve(args.checkpoint)
    meta = ckpt.read_meta(where)
    ckpt.verify(where, meta)  # no fallback here: an export must not quietly pick other weights
    state = ckpt.assemble_state_dict(ckpt.stage_files(where, meta, mmap=True), where, meta["tied_parameters"])
    ckpt.check_finite(state, where)
    package = args.package
    model, checked = None, ", not checked against a model (pass --package STAGES)"
    if not args.no_check and package:
        if not Path(package).is_dir():
            raise PipeshiftError(f"--package {package}: not a directory")
        model = check_matches(state, package)
        checked = f", checked against {package}'s model"
    out = Path(args.output)
    if fmt == "torch":
        ckpt.save_file(state, out)
        what = f"{len(state)} tensors"
    else:
        from pipeshift.weights import tensor_bytes, write_safetensors, write_sharded

        names = once_per_tensor(state, model)
        if fmt == "safetensors":
            write_safetensors(out, names, state.__getitem__)
            what = f"{len(names)} tensors"
        else:
            files = write_sharded(out, {k: tensor_bytes(state[k]) for k in names}, state.__getitem__, max_bytes)
            what = f"{len(names)} tensors in {len(files)} file{'s' if len(files) > 1 else ''}"
            if model is not None and _save_config(model, out):
                what += " and config.json"
    print(f"wrote {args.output}: {what} from {meta['num_stages']} stages of {where} (step {meta['step']}){checked}")
    return 0


def _meta_model(package: str) -> nn.Module:
    from pipeshift.runtime.package import load_stage_package

    pkg = load_stage_package(package)
    return pkg.bundle(weights=False).model if pkg.spec is not None else pkg.full_model()


def check_matches(state: dict[str, torch.Tensor], package: str) -> nn.Module:
    """The package's model (on meta) after checking that ``state`` has exactly its tensors, shaped alike."""
    model = _meta_model(package)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PipeshiftError(
            f"the checkpoint does not match {package}'s model: missing {missing[:3]}"
            f"{' …' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}"
        )
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise PipeshiftError(f"the checkpoint's {key!r} has shape {list(state[key].shape)}, "
                                 f"{package}'s model has {list(want.shape)}")
    return model


def once_per_tensor(state: dict[str, torch.Tensor], model: nn.Module | None) -> list[str]:
    """``state``'s keys, less the second and later names of a tensor the model ties (shared parameters)."""
    if model is None:
        return list(state)
    first: dict[int, str] = {}
    drop: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None:
                continue
            fqn = f"{prefix}.{name}" if prefix else name
            if first.setdefault(id(t), fqn) != fqn:
                drop.add(fqn)
    return [k for k in state if k not in drop]


def _save_config(model: Any, out: Path) -> bool:
    """``config.json`` beside the weights when the model is a Hugging Face one (it has a savable config)."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "save_pretrained", None)):
        return False
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out))
    return True
