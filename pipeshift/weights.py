"""Reading a model's weights tensor by tensor, so a rank reads only the tensors it owns.

:func:`open_weights` accepts what people keep weights in:

- a ``.safetensors`` file, or a directory with ``model.safetensors``;
- a sharded directory with ``model.safetensors.index.json`` (the Hugging Face layout: a
  ``weight_map`` from tensor name to shard file);
- a pipeshift checkpoint (a ``--checkpoint-dir`` or one ``step-N`` directory in it: per-stage
  files keyed by FQN), or a ``.pt`` state_dict such as ``pipeshift export -o model.pt`` writes;
- a ``torch.distributed.checkpoint`` directory (its ``.metadata`` file).

Safetensors files are opened lazily (``safe_open``: a header, then one tensor per
``get_tensor``); torch files are memory-mapped (``torch.load(mmap=True)``), so only the pages of
the tensors read are ever touched. :attr:`WeightSource.opened` lists the keys read, in order.

:func:`load_into` copies the named tensors into a model's own tensors (which
:func:`pipeshift.materialize.materialize` allocated), converting dtypes, and names the tensor
and the file in every error: a missing key, a shape that differs, a file that is not what it
claims. Serving and training use the same function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.jsonfile import read_json_object

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_INDEX_BYTES = 64 * 1024 * 1024


class WeightSource:
    """Named tensors in one or more files, read one at a time."""

    def __init__(self, path: Path, files: Mapping[str, Path], kind: str):
        self.path = path
        self.kind = kind
        self._file_of = dict(files)  # key -> the file holding it
        self._open: dict[Path, Any] = {}
        self.opened: list[str] = []

    def keys(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def files(self) -> list[Path]:
        """The files that hold any of this source's keys (in the order first named)."""
        return list(dict.fromkeys(self._file_of.values()))

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (read now, and only it)."""
        path = self._file_of[key]
        handle = self._handle(path)
        try:
            t = handle.get_tensor(key) if self.kind == "safetensors" else handle[key]
        except Exception as e:  # a truncated or corrupt file: one line naming it and the tensor
            raise InputFileError(path, None, f"cannot read tensor {key!r} ({type(e).__name__}: {e})") from None
        if not torch.is_tensor(t):
            raise InputFileError(path, None, f"entry {key!r} is not a tensor")
        self.opened.append(key)
        return t

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            self._open[path] = _safe_open(path) if self.kind == "safetensors" else _torch_state(path)
        return self._open[path]

    def close(self) -> None:
        self._open.clear()


def _safe_open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise InputFileError(path, None, f"not a safetensors file ({type(e).__name__}: {e})") from None


def safetensors_keys(path: Path) -> list[str]:
    return list(_safe_open(path).keys())


def _torch_state(path: Path) -> dict[str, Any]:
    """A torch file's FQN -> tensor dict, memory-mapped (a pipeshift stage file's ``model`` part)."""
    if not path.is_file():
        raise InputFileError(path, None, "file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # hostile or truncated input
        raise InputFileError(path, None, f"cannot be read as a torch file ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise InputFileError(path, None, "holds no state_dict (an object of tensors by name)")
    return data


def open_weights(path: str | Path) -> WeightSource:
    """The weights at ``path`` (see the module docstring for the layouts)."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX).is_file():
            return _sharded(p, p / INDEX)
        if (p / SINGLE).is_file():
            return _single_safetensors(p / SINGLE)
        if (p / ".metadata").is_file():
            return _dcp(p)
        from pipeshift.runtime import checkpoint as ckpt

        if (p / "meta.json").is_file() or (p / ckpt.LATEST).is_file():
            return _pipeshift_checkpoint(p)
        shards = sorted(p.glob("*.safetensors"))
        if len(shards) == 1:
            return _single_safetensors(shards[0])
        raise PipeshiftError(f"{p}: no weights found (expected {INDEX}, {SINGLE}, a pipeshift checkpoint "
                             "or a torch.distributed.checkpoint directory)")
    if not p.exists():
        raise PipeshiftError(f"{p}: no such file or directory")
    if p.suffix == ".safetensors":
        return _single_safetensors(p)
    if p.suffix in (".pt", ".pth", ".bin"):
        return WeightSource(p, {k: p for k in _torch_state(p)}, "torch")
    raise PipeshiftError(f"{p}: unknown weights format (expected .safetensors, .pt, or a directory)")


def _single_safetensors(path: Path) -> WeightSource:
    return WeightSource(path, {k: path for k in safetensors_keys(path)}, "safetensors")


def _sharded(root: Path, index: Path) -> WeightSource:
    data = read_json_object(index, "safetensors index", max_bytes=MAX_INDEX_BYTES)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputFileError(index, None, "no 'weight_map' object (tensor name -> shard file)")
    files: dict[str, Path] = {}
    resolved = root.resolve()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputFileError(index, None, f"weight_map[{key!r}] = {name!r} is not a file name in {root}")
        shard = root / name
        if not shard.resolve().is_relative_to(resolved):
            raise InputFileError(index, None, f"weight_map[{key!r}] = {name!r} leaves {root}")
        files[key] = shard
    for shard in dict.fromkeys(files.values()):
        if not shard.is_file():
            raise InputFileError(index, None, f"names shard {shard.name}, which does not exist")
    return WeightSource(root, files, "safetensors")


class _CheckpointSource(WeightSource):
    """A pipeshift checkpoint whose meta.json says which stage file holds which FQN.

    Each stage file is hashed against meta.json when first read, so a rank that loads its own
    stages reads (and checks) only their files, not the whole model.
    """

    def __init__(self, path: Path, files: Mapping[str, Path], meta: Mapping[str, Any]):
        super().__init__(path, files, "torch")
        self._meta = meta

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            from pipeshift.runtime import checkpoint as ckpt

            ckpt.verify(self.path, self._meta, {path.name})  # damaged weights must not become a starting point
        return super()._handle(path)


def _pipeshift_checkpoint(root: Path) -> WeightSource:
    from pipeshift.runtime import checkpoint as ckpt

    where = ckpt.resolve(root)
    meta = ckpt.read_meta(where)
    recorded = meta.get("stage_keys")
    names = [f"stage{s}.pt" for s in range(meta["num_stages"])]
    files: dict[str, Path] = {}
    if isinstance(recorded, dict) and set(recorded) == set(names) and all(
            isinstance(v, list) and all(isinstance(k, str) for k in v) for v in recorded.values()):
        ckpt.verify(where, meta, set())  # every file is there; each is hashed when a rank first reads it
        for name in names:
            for key in recorded[name]:
                files.setdefault(key, where / name)
        return _CheckpointSource(where, files, meta)
    ckpt.verify(where, meta)  # an older checkpoint: its keys are only known by opening every file
    for name in names:
        for key in _torch_state(where / name):
            files.setdefault(key, where / name)
    return WeightSource(where, files, "torch")


class _DCPSource(WeightSource):
    """A ``torch.distributed.checkpoint`` directory: reads are planned for the requested keys only."""

    def __init__(self, path: Path, metadata: Any):
        keys = {k: path for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
        super().__init__(path, keys, "dcp")
        self._meta = metadata

    def read_into(self, targets: Mapping[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(dict(targets), checkpoint_id=str(self.path), no_dist=True)
        self.opened.extend(targets)

    def get(self, key: str) -> torch.Tensor:
        info = self._meta.state_dict_metadata[key]
        t = torch.empty(tuple(info.size), dtype=info.properties.dtype)
        self.read_into({key: t})
        return t


def _dcp(root: Path) -> WeightSource:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(root)).read_metadata()
    except Exception as e:
        raise InputFileError(root / ".metadata", None, f"not a torch.distributed.checkpoint ({type(e).__name__}: {e})") from None
    return _DCPSource(root, metadata)


def load_into(targets: Mapping[str, torch.Tensor], source: WeightSource, keys: Iterable[str] | None = None, *,
              who: str = "", aliases: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Copy ``source``'s tensors into ``targets`` (FQN -> the model's own tensor) for ``keys`` (default: all).

    ``aliases`` maps a key to the other names its tensor goes by (a tied weight saved once under
    either name). ``who`` ("rank 1 (stage 1)") prefixes errors. Returns the keys loaded.
    """
    wanted = list(targets if keys is None else keys)
    names = {k: [k, *((aliases or {}).get(k, ()))] for k in wanted}
    missing = [k for k in wanted if not any(n in source for n in names[k])]
    lead = f"{who}: " if who else ""
    if missing:
        sample = sorted(source.keys())[:3]
        raise PipeshiftError(f"{lead}--init-from {source.path}: no tensor {missing[0]!r}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; it holds "
                             f"{len(source.keys())} tensors, e.g. {sample}")
    if isinstance(source, _DCPSource):
        source.read_into({next(n for n in names[k] if n in source): targets[k] for k in wanted})
        return wanted
    with torch.no_grad():
        for key in wanted:
            name = next(n for n in names[key] if n in source)
            value = source.get(name)
            dest = targets[key]
            if tuple(value.shape) != tuple(dest.shape):
                raise PipeshiftError(f"{lead}--init-from {source.file_of(name)}: tensor {name!r} has shape "
                                     f"{list(value.shape)}, the model's {key!r} has {list(dest.shape)}")
            dest.copy_(value)
            del value
    return wanted


# -- writing ------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
DEFAULT_SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size ("5GB")


def load_model_weights(model: torch.nn.Module, path: str | Path, who: str = "") -> list[str]:
    """Every parameter of ``model`` (and the buffers the file has) from the weights at ``path``.

    For weights that come with a model (a Hugging Face directory's safetensors): a tied weight
    saved once under either of its names fills both.
    """
    from pipeshift.runtime.local import tensor_aliases

    aliases = tensor_aliases(model)
    state = model.state_dict(keep_vars=True)
    params = {f"{prefix}.{name}" if prefix else name for prefix, m in model.named_modules(remove_duplicate=False)
              for name, p in m._parameters.items() if p is not None}
    source = open_weights(path)
    try:
        keys = [k for k in state if k in params or any(n in source for n in [k, *aliases.get(k, [])])]
        return load_into(state, source, keys, who=who, aliases=aliases)
    finally:
        source.close()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(path: Path, names: list[str], get: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``names`` to one safetensors file, fetching and writing one tensor at a time; returns the bytes.

    The format is a little-endian u64 header length, a JSON header (dtype, shape, byte range per
    tensor, plus ``__metadata__``), then the tensors' bytes back to back. The header needs only
    shapes and dtypes, so ``get`` is called twice per tensor: a memory-mapped source makes the
    first call cost nothing; the second reads the data, which is written and dropped.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in names:
        t = get(name)
        if t.dtype not in _ST_DTYPES:
            raise PipeshiftError(f"{name!r}: dtype {t.dtype} cannot be stored in safetensors")
        n = tensor_bytes(t)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            t = get(name).detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
    tmp.replace(path)
    return offset


def shard_names(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def write_sharded(out: Path, sizes: Mapping[str, int], get: Callable[[str], torch.Tensor],
                  max_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """A directory as ``save_pretrained`` writes it: ``model.safetensors``, or shards and their index."""
    out.mkdir(parents=True, exist_ok=True)
    shards = shard_names(sizes, max_bytes)
    if len(shards) == 1:
        write_safetensors(out / SINGLE, shards[0], get)
        stale = out / INDEX
        if stale.exists():
            stale.unlink()
        return [out / SINGLE]
    if (out / SINGLE).exists():  # a previous unsharded export would shadow the index
        (out / SINGLE).unlink()
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, names, get)
        weight_map.update({k: name for k in names})
        files.append(out / name)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(out / INDEX)
    return files
