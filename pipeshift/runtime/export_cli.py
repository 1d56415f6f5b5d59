"""Re-assemble stage checkpoints into one state_dict: ``pipeshift export CKPT_DIR -o model.pt``.

``CKPT_DIR`` is a ``--checkpoint-dir`` (its newest checkpoint is used) or one ``step-N``
directory in it. The output loads into the original model (the package's ``full_model()``) with
``load_state_dict(torch.load("model.pt"))``; when the stage package is reachable (``--package``,
or the path recorded in the checkpoint) the export is checked against it first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeshift.errors import PipeshiftError
from pipeshift.runtime import checkpoint as ckpt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (or one step-N directory in it)")
    p.add_argument("-o", "--output", required=True, help="where to write the state_dict (.pt)")
    p.add_argument("--package", default=None,
                   help="stage package to check the export against (default: the one recorded, if present)")
    p.add_argument("--no-check", action="store_true", help="do not load the result into the original model")


def run(args: argparse.Namespace) -> int:
    where = ckpt.resolve(args.checkpoint)
    meta = ckpt.read_meta(where)
    state = ckpt.assemble_state_dict(ckpt.stage_files(where, meta), where)
    package = args.package or meta.get("package")
    checked = ""
    if not args.no_check and package:
        if Path(package).is_dir():
            check_loads(state, package)
            checked = f", loads into {package}'s full_model()"
        elif args.package:
            raise PipeshiftError(f"--package {package}: not a directory")
    ckpt.save_file(state, Path(args.output))
    print(f"wrote {args.output}: {len(state)} tensors from {meta['num_stages']} stages of {where} "
          f"(step {meta['step']}){checked}")
    return 0


def check_loads(state: dict, package: str) -> None:
    from pipeshift.runtime.package import load_stage_package

    model = load_stage_package(package).full_model()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise PipeshiftError(
            f"the checkpoint does not match {package}'s model: missing {missing[:3]}"
            f"{' …' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}"
        )
    model.load_state_dict(state)
