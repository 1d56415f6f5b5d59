"""One rank's share of several models: which are resident, and moving a stage shard in and out.

A rank serving several models keeps, per model, only its own stage's tensors (its *shard*), and
keeps them resident on the device only while the front end says so. Offloaded, a shard lives
where it can be fetched back fast without touching anyone else's tensors:

* ``host`` — a host-memory copy made once at start-up (pinned on CUDA, so the copy to the device
  is a DMA on a stream of its own); on CPU "resident" is a second copy that counts against the
  rank's resident budget, so the same code path and accounting run everywhere.
* ``file`` — nothing is kept: a swap-in reads this rank's tensors again from the model's
  safetensors files (memory-mapped by ``safe_open``, so only this shard's byte ranges are read).

Swapping works on the stage's own tensor objects: an offloaded parameter or buffer keeps its
identity and dtype but holds an empty tensor (``tensor.data = …``), so the stage modules,
the :class:`~pipeshift.runtime.stage.Stage` built over them and every tied alias stay valid and
nothing is rebuilt. A :class:`Loader` thread per rank performs swap-ins one after another while
the rank's serving loop goes on with resident models; :meth:`Shard.wait` is what a batch of a
model still loading blocks on, so stage k computes as soon as stage k's shard is in (pipelined
swap-in) whatever the other stages are doing.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from pipeshift.errors import PipeshiftError

OFFLOADED, LOADING, RESIDENT = "offloaded", "loading", "resident"
SWAP_FROM = ("host", "file")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def unique_tensors(modules: Iterable[nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``modules`` once (first name wins; tied aliases are one tensor)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for m in modules:
        for name, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                out[name] = t
    return out


def stage_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes a stage's tensors occupy once resident (shapes and dtypes only: works on meta)."""
    return sum(tensor_bytes(t) for t in unique_tensors(modules).values())


def default_budget(device: torch.device, ranks_here: int) -> int:
    """The resident budget when ``--device-memory`` is not given: the device's memory (shared on CPU)."""
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        return int(total)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62
    return int(total) // max(1, ranks_here)


@dataclasses.dataclass
class SwapRecord:
    """What one swap-in did on this rank: sent to the front end, shown by ``GET /v1/models``."""

    model: str
    rank: int
    bytes: int
    seconds: float
    source: str  # "host" or the weights path
    tensors: list[str]  # the names read (file) or copied (host)
    files: list[str]  # the files read from (file mode)
    error: str | None = None


class Shard:
    """One model's tensors on this rank, and their swapping.

    ``tensors`` are the stage modules' own parameter and buffer objects (each once); in ``file``
    mode ``weights`` is what ``--init-from`` would take, opened anew per swap-in. Tensors the
    weights do not hold (non-persistent buffers) keep a host copy in either mode.
    """

    def __init__(self, model: str, rank: int, modules: Sequence[nn.Module], device: torch.device, *,
                 swap_from: str = "host", weights: str | None = None, aliases: dict[str, list[str]] | None = None):
        if swap_from not in SWAP_FROM:
            raise PipeshiftError(f"--swap-from {swap_from!r}: expected one of {', '.join(SWAP_FROM)}")
        self.model = model
        self.rank = rank
        self.device = device
        self.swap_from = swap_from
        self.weights = weights
        self.aliases = aliases or {}
        self.tensors = unique_tensors(modules)
        self.shapes = {n: tuple(t.shape) for n, t in self.tensors.items()}
        self.bytes = sum(tensor_bytes(t) for t in self.tensors.values())
        self.host: dict[str, torch.Tensor] = {}
        self.from_file: list[str] = []
        self.state = RESIDENT
        self.ready = threading.Event()
        self.ready.set()
        self.error: str | None = None
        self.swaps_in = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._keep_host_copy()

    def _keep_host_copy(self) -> None:
        """Remember where every tensor comes back from, then offload (start-up, once)."""
        on_file: set[str] = set()
        if self.swap_from == "file":
            if self.weights is None:
                raise PipeshiftError(f"model {self.model}: --swap-from file needs weights (NAME=STAGES:WEIGHTS)")
            from pipeshift.weights import open_weights

            source = open_weights(self.weights)
            if source.kind != "safetensors":
                raise PipeshiftError(f"model {self.model}: --swap-from file reads safetensors; {self.weights} is "
                                     f"{source.kind}")
            keys = source.keys()
            on_file = {n for n in self.tensors if any(a in keys for a in (n, *self.aliases.get(n, ())))}
        self.from_file = sorted(on_file)
        for name, t in self.tensors.items():
            if name in on_file:
                continue
            # on CPU the built tensor itself becomes the host copy (no copy); on CUDA a pinned one
            self.host[name] = t.detach().cpu().pin_memory() if self.device.type == "cuda" else t.detach()
        self.evict()

    # -- swapping --------------------------------------------------------------------------------

    def evict(self) -> None:
        """Drop the resident tensors (their objects stay, emptied); nothing is written back: serving never changes weights."""
        self.ready.wait()
        with torch.no_grad():
            for t in self.tensors.values():
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self.state = OFFLOADED

    def begin(self) -> None:
        """Mark the shard as being swapped in (the serving loop's side, before the loader runs)."""
        if self.state == OFFLOADED:
            self.state = LOADING
            self.ready.clear()

    def load(self) -> SwapRecord:
        """Swap this shard in (the loader thread's side); batches waiting in :meth:`wait` go on after."""
        t0 = time.perf_counter()
        read: list[str] = []
        files: list[str] = []
        try:
            if self.state == RESIDENT:
                return SwapRecord(self.model, self.rank, self.bytes, 0.0, "resident", [], [])
            with torch.no_grad():
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        read, files = self._copy_in()
                    self._stream.synchronize()
                else:
                    read, files = self._copy_in()
            self.state = RESIDENT
            self.swaps_in += 1
        except Exception as e:  # a file changed or vanished since start-up: this model fails, not the server
            from pipeshift.serve.worker import first_line

            self.error = f"rank {self.rank}: swapping in model {self.model} failed: {first_line(e)}"
            self.state = OFFLOADED
        finally:
            self.ready.set()
        return SwapRecord(self.model, self.rank, self.bytes, time.perf_counter() - t0,
                          str(self.weights) if self.swap_from == "file" else "host", read, files, self.error)

    def _copy_in(self) -> tuple[list[str], list[str]]:
        compute = torch.cuda.current_stream(self.device) if self._stream is not None else None
        targets = {}
        for name, host in self.host.items():
            t = torch.empty_like(host, device=self.device)
            t.copy_(host, non_blocking=compute is not None)
            targets[name] = t
        read, files = [], []
        if self.from_file:
            from pipeshift.weights import open_weights

            source = open_weights(self.weights)  # type: ignore[arg-type]
            keys = source.keys()
            for name in self.from_file:
                key = next(a for a in (name, *self.aliases.get(name, ())) if a in keys)
                value = source.get(key)
                if tuple(value.shape) != self.shapes[name]:
                    raise PipeshiftError(f"{source.file_of(key)}: tensor {key!r} has shape {list(value.shape)}, "
                                         f"the model's {name!r} has {list(self.shapes[name])}")
                targets[name] = value.to(self.device, self.tensors[name].dtype, non_blocking=compute is not None)
                read.append(key)
            files = sorted({str(source.file_of(k)) for k in read})
            source.close()
        for name, t in targets.items():
            if compute is not None:
                t.record_stream(compute)  # freed at eviction only after the batches that used it
            self.tensors[name].data = t
        return read or sorted(self.host), files

    def wait(self, timeout_s: float) -> None:
        """Block until the shard is resident (a batch of a model being swapped in)."""
        if not self.ready.wait(timeout_s):
            raise PipeshiftError(f"rank {self.rank}: model {self.model} was not swapped in within {timeout_s:g} s")
        if self.state != RESIDENT:
            raise PipeshiftError(self.error or f"rank {self.rank}: a batch of model {self.model} came while it is "
                                 f"{self.state}")


class Loader:
    """A thread per rank that swaps shards in, in the order asked, and reports each swap-in."""

    def __init__(self, report: Callable[[SwapRecord], None]):
        self.report = report
        self._jobs: queue.Queue[Shard | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pipeshift-serve-loader", daemon=True)
        self._thread.start()

    def submit(self, shard: Shard) -> None:
        shard.begin()
        self._jobs.put(shard)

    def _run(self) -> None:
        while True:
            shard = self._jobs.get()
            if shard is None:
                return
            self.report(shard.load())

    def stop(self, timeout_s: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)
