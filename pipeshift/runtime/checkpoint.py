"""Checkpoints: one file per stage, keyed by original FQNs, so they outlive the partition.

Layout of ``--checkpoint-dir D``::

    D/latest                  the name of the newest complete checkpoint ("step-00000010")
    D/step-00000010/meta.json step, schedule, microbatches, ranks, package, data position,
                              "files": the SHA-256 of every file below, "stage_keys": the
                              FQNs each stage file holds, tied parameters
    D/step-00000010/stage0.pt {"model": FQN -> tensor, "optimizer": FQN-keyed state, "lr_scheduler": …}
    D/step-00000010/rank0.pt  this rank's RNG states
    D/step-00000010/plan.json the plan in force, when the job can repartition (a restart resumes on it)
    D/elastic.json            a resize in progress: the number of ranks to restart with

A stage file is written by the stage's first replica (replicas hold identical weights after
their all-reduced steps). ``latest`` moves only after every rank has written (a barrier), so a
crash mid-write leaves the previous checkpoint in charge. Because everything is keyed by FQN,
loading takes each FQN from whichever stage file holds it: a run can resume on a different
partition, and :func:`assemble_state_dict` (``pipeshift export``) rebuilds the original model's
state_dict.

A checkpoint is checked before it is used (:func:`verify`): every file against its SHA-256, the
step against the directory's name and each stage file's own step. A resume that finds the newest
checkpoint damaged falls back to the previous intact one and says so (:func:`choose`); an
export refuses (it has no business guessing which weights were meant). A resuming rank reads and
hashes only the files it loads from (:func:`files_for`: the stage files holding its FQNs, by
``stage_keys``), so a big model's resume costs each rank its own share of the checkpoint; the
ranks then agree on the checkpoint (the newest one intact for every rank).

A parameter tied across stages is written once, by the first stage holding it, under its
first name (``tied_parameters`` in meta.json lists its other names).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.jsonfile import read_json_object
from pipeshift.runtime.ties import aliases, parse_ties

FORMAT = "pipeshift-checkpoint"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-([0-9]{8,})$")


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_file(obj: Any, path: Path) -> str:
    """Write atomically (a reader sees the old file or the complete new one); returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_meta(meta: dict[str, Any], where: Path, digests: Mapping[str, str] | None = None) -> None:
    """meta.json for the checkpoint in ``where``, with the SHA-256 of every other file in it.

    ``digests`` (file name → SHA-256) are the writers' own; files not in it are hashed here.
    """
    files = dict(digests or {})
    for f in sorted(where.iterdir()):
        if f.is_file() and f.name != "meta.json" and not f.name.endswith(".tmp") and f.name not in files:
            files[f.name] = sha256_file(f)
    write_json({**meta, "files": files}, where / "meta.json")


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def mark_latest(root: str | os.PathLike[str], step: int) -> None:
    root = Path(root)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(step_dir(root, step).name + "\n")
    os.replace(tmp, root / LATEST)


def resolve(root: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``root`` names: itself, or the one its ``latest`` points to."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return root
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if not name.startswith("step-") or "/" in name or not (root / name / "meta.json").is_file():
            raise InputFileError(latest, 1, f"points to {name!r}, which is not a complete checkpoint")
        return root / name
    if not root.exists():
        raise PipeshiftError(f"{root}: no such checkpoint directory")
    raise PipeshiftError(f"{root}: no checkpoint here (neither meta.json nor a '{LATEST}' file)")


def read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "meta.json"
    meta = read_json_object(path, "checkpoint meta.json")
    if meta.get("format") != FORMAT:
        raise InputFileError(path, None, f"not a pipeshift checkpoint (format should be {FORMAT!r})")
    for key in ("step", "num_stages"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise InputFileError(path, None, f"'{key}' must be a non-negative integer")
    meta["tied_parameters"] = parse_ties(meta.get("tied_parameters"), path, meta["num_stages"])
    return meta


def files_for(meta: Mapping[str, Any], keys: Collection[str], stage: int | None = None) -> set[str] | None:
    """The stage files a reader of ``keys`` (FQNs, tied names included) needs; ``None``: every one.

    Only a checkpoint that records ``stage_keys`` can tell (older ones: ``None``). ``stage``
    adds that stage's file, which holds the LR scheduler's position.
    """
    recorded = meta.get("stage_keys")
    if not isinstance(recorded, dict) or not all(isinstance(v, list) for v in recorded.values()):
        return None
    canonical = aliases(meta.get("tied_parameters") or [])
    wanted = set(keys) | {canonical[k] for k in keys if k in canonical}
    out = {name for name, held in recorded.items() if wanted & set(held)}
    if stage is not None:
        out.add(f"stage{min(stage, meta['num_stages'] - 1)}.pt")
    return out


def verify(ckpt: Path, meta: Mapping[str, Any], names: Collection[str] | None = None) -> None:
    """Refuse a checkpoint whose files or step disagree with its meta.json (one line naming the file).

    ``names``: hash only these files (the others must still exist); ``None``: every file.
    """
    path = ckpt / "meta.json"
    named = _STEP_DIR.match(ckpt.name)
    if named and int(named.group(1)) != meta["step"]:
        raise InputFileError(path, None, f"says step {meta['step']} but the directory is {ckpt.name}")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise InputFileError(path, None, "records no SHA-256 of its files ('files'); it cannot be checked")
    needed = [f"stage{s}.pt" for s in range(meta["num_stages"])]
    for name in needed:
        if name not in files:
            raise InputFileError(path, None, f"records no SHA-256 for {name}")
    for name, digest in sorted(files.items()):
        f = ckpt / name
        if "/" in name or name.startswith("."):
            raise InputFileError(path, None, f"'files' names {name!r}, which is not a file of this checkpoint")
        if not f.is_file():
            raise InputFileError(f, None, "file not found: the checkpoint is incomplete")
        if names is not None and name not in names:
            continue
        if sha256_file(f) != digest:
            raise InputFileError(f, None, "SHA-256 differs from the one meta.json records: the file is damaged "
                                          "or was changed after the checkpoint was written")


def choose(root: str | os.PathLike[str], needed: Callable[[Mapping[str, Any]], Collection[str] | None] | None = None,
           at_most: int | None = None) -> tuple[Path, dict[str, Any], str]:
    """The checkpoint a resume continues from: the newest intact one, and a note if it is not the latest.

    ``root`` naming one ``step-N`` directory means exactly that one (no fallback). ``needed``
    (a checkpoint's meta → the files to hash, ``None`` for all) limits the check to what the
    caller reads; ``at_most``: no checkpoint after that step (ranks agreeing on an older one).
    """
    problem: str | None
    try:
        first = resolve(root)
    except InputFileError as e:  # 'latest' names no complete checkpoint: any older intact one will do
        first, problem = Path(root) / LATEST, str(e)
    else:
        problem = None
    candidates = [first] if first.name != LATEST else []
    if first != Path(root):
        steps = []
        for d in Path(root).iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d != first and (d / "meta.json").is_file():
                steps.append((int(m.group(1)), d))
        named = _STEP_DIR.match(first.name)
        limit = int(named.group(1)) if named else None
        candidates += [d for step, d in sorted(steps, reverse=True) if limit is None or step < limit]
    if at_most is not None:
        candidates = [d for d in candidates if (m := _STEP_DIR.match(d.name)) is None or int(m.group(1)) <= at_most]
    for where in candidates:
        try:
            meta = read_meta(where)
            verify(where, meta, needed(meta) if needed is not None else None)
        except PipeshiftError as e:
            problem = problem or str(e)
            continue
        note = "" if where == first or problem is None else \
            f"{problem}; resuming from the previous intact checkpoint {where.name}"
        return where, meta, note
    raise PipeshiftError(problem or f"{root}: no intact checkpoint")


def load_file(path: Path, mmap: bool = False) -> Any:
    """A checkpoint file; ``mmap``: its tensors memory-mapped, so only the pages a reader touches are read."""
    if not path.is_file():
        raise InputFileError(path, None, "file not found: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # hostile or truncated input: one clear line
        raise InputFileError(path, None, f"cannot be read as a checkpoint ({type(e).__name__}: {e})") from None


def stage_files(ckpt: Path, meta: Mapping[str, Any], mmap: bool = False,
                names: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Every stage file's contents, in stage order; with ``names``, only those files are read (others: empty)."""
    out: list[dict[str, Any]] = []
    for s in range(meta["num_stages"]):
        if names is not None and f"stage{s}.pt" not in names:
            out.append({"model": {}, "optimizer": {}})
            continue
        data = load_file(ckpt / f"stage{s}.pt", mmap=mmap)
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise InputFileError(ckpt / f"stage{s}.pt", None, "no 'model' state_dict inside")
        if "step" in data and data["step"] != meta["step"]:
            raise InputFileError(ckpt / f"stage{s}.pt", None,
                                 f"holds step {data['step']!r} but meta.json says step {meta['step']}")
        out.append(data)
    return out


def assemble_state_dict(stages: list[dict[str, Any]], ckpt: Path | None = None,
                        ties: Sequence[Mapping[str, Sequence[int]]] = (), partial: bool = False) -> dict[str, torch.Tensor]:
    """One state_dict for the original model: the union of the stages' (disjoint) FQNs.

    A tied parameter is stored once, under its canonical name (:mod:`pipeshift.runtime.ties`);
    its other names become the very same tensor here, so saving the result stores it once and
    ``load_state_dict`` into the original model keeps the tie. ``partial``: only some stage
    files were read (:func:`files_for`), so a tie whose tensor is in none of them is skipped.
    """
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for s, data in enumerate(stages):
        for fqn, tensor in data["model"].items():
            if fqn in merged:
                raise PipeshiftError(f"{ckpt or 'checkpoint'}: {fqn!r} is held by stage {owner[fqn]} and stage {s}")
            if not torch.is_tensor(tensor):
                raise PipeshiftError(f"{ckpt or 'checkpoint'}: stage {s} entry {fqn!r} is not a tensor")
            merged[fqn] = tensor
            owner[fqn] = s
    for alias, name in aliases(ties).items():
        if name not in merged and partial:
            continue
        if name not in merged:
            raise PipeshiftError(f"{ckpt or 'checkpoint'}: the tied parameter {name!r} is in no stage file")
        merged[alias] = merged[name]
    return merged


def merged_optimizer_state(stages: list[dict[str, Any]],
                           ties: Sequence[Mapping[str, Sequence[int]]] = ()) -> dict[str, Any]:
    """The stages' FQN-keyed optimizer states as one (each FQN keeps its group's hyper-parameters);
    a tied parameter's other names share its canonical name's state."""
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for data in stages:
        opt = data.get("optimizer") or {}
        state.update(opt.get("state", {}))
        groups.extend(opt.get("param_groups", []))
    extra = {alias: name for alias, name in aliases(ties).items() if name in state}
    state.update({alias: state[name] for alias, name in extra.items()})
    groups = [{**g, "params": [*g.get("params", []), *(a for a, n in extra.items() if n in g.get("params", []))]}
              for g in groups]
    return {"state": state, "param_groups": groups}



def check_finite(state: Mapping[str, torch.Tensor], where: Path | str) -> None:
    """Refuse NaN or infinite weights: a diverged run's checkpoint, named as such."""
    for fqn, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PipeshiftError(f"{where}: tensor {fqn!r} holds NaN or infinite values (the run diverged before "
                                 "this checkpoint)")
