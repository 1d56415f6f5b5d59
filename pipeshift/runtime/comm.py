"""Point-to-point transfer of named tensors, with deadlines instead of hangs.

Design points, each answering a failure seen in the field:

* **Asynchronous, no threads of our own.** Every transfer is ``isend``/``irecv``; the caller
  keeps going and waits only when it needs the tensor. The backend's own progress threads move
  the bytes (PipeDream's one-thread-per-tensor design hung its users).
* **Shapes once.** The first activation of a given name to a given peer is preceded by a small
  metadata message (shape, dtype, requires-grad); later ones send only the payload, into a
  buffer the receiver allocates from the cached metadata. Both ends post in one fixed order
  (microbatch, then sorted name), so the exchange also works where messages are matched by
  order rather than by tag (NCCL). Gradients never need metadata: their
  receiver made the tensor they are the gradient of. A tensor whose shape changes later is an
  error, not a silent garbling.
* **Tags per name.** Every exchanged name has a small integer (identical on every rank, from the
  routing), so tensors of different names between the same two ranks cannot be confused; those
  of one name are matched in order, which both ends share (microbatch order).
* **Deadlines.** Every wait has a deadline (``timeout_s``). Gloo honours ``Work.wait(timeout)``
  and fails a receive at once when its peer's connection closes; NCCL work is polled with
  ``is_completed()``. A failure becomes one :class:`PeerError` naming this rank, its stage, what
  it was waiting for, from whom, and where in the schedule (``where``, kept current by the
  runner).
* **Backpressure.** Sends are kept until they complete; past ``max_pending`` the oldest is
  waited for, so a fast stage cannot run unboundedly ahead of a slow one. (With gloo a send
  completes when its receiver has posted the matching receive.)
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeshift.errors import PipeshiftError

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]
_MAX_DIMS = 16
_META_LEN = 3 + _MAX_DIMS
ACT, GRAD = "activation", "gradient"


class PeerError(PipeshiftError):
    """A peer died, stopped answering, or sent something unexpected; the message says which.

    ``peer`` is that rank when one is known (a collective's failure names none); ``silent``: it
    did not answer within the timeout (it may be alive, itself waiting for another rank).
    """

    def __init__(self, message: str, peer: int | None = None, silent: bool = False):
        super().__init__(message)
        self.peer = peer
        self.silent = silent


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorMeta:
        return cls(tuple(t.shape), t.dtype, bool(t.requires_grad))

    def encode(self, device: torch.device) -> torch.Tensor:
        if len(self.shape) > _MAX_DIMS or self.dtype not in _DTYPES:
            raise PipeshiftError(f"cannot send a {len(self.shape)}-d {self.dtype} tensor between stages")
        row = [len(self.shape), _DTYPES.index(self.dtype), int(self.requires_grad), *self.shape]
        row += [0] * (_META_LEN - len(row))
        return torch.tensor(row, dtype=torch.int64, device=device)

    @classmethod
    def decode(cls, t: torch.Tensor) -> TensorMeta:
        row = [int(x) for x in t.cpu().tolist()]
        ndim, code, rg = row[0], row[1], row[2]
        if not 0 <= ndim <= _MAX_DIMS or not 0 <= code < len(_DTYPES):
            raise PeerError(f"garbled tensor metadata {row[:3]}")
        return cls(tuple(row[3:3 + ndim]), _DTYPES[code], bool(rg))


# (peer rank, tensor name, "train"/"eval"): a link's tensors of one name keep their shape after the first
MetaKey = tuple[int, str, str]


@dataclasses.dataclass
class PendingRecv:
    name: str
    src: int
    kind: str
    mb: int
    key: MetaKey
    tensor: torch.Tensor | None = None
    work: object | None = None  # set once posted (always, by the time recv() returns)


class Communicator:
    """Named-tensor transfers for one rank; see the module docstring for the rules."""

    def __init__(self, rank: int, *, stage_of: Callable[[int], int], tags: dict[str, int],
                 device: torch.device | str = "cpu", timeout_s: float = 60.0, poll: bool | None = None,
                 max_pending: int = 64):
        self.rank = rank
        self.device = torch.device(device)
        self.timeout_s = float(timeout_s)
        self.poll = self.device.type == "cuda" if poll is None else poll
        self.max_pending = max_pending
        self.where = "start-up"
        self.comm_s = 0.0  # time in send posting, send completion and collectives
        self.wait_s = 0.0  # time blocked on incoming tensors
        self._pending: collections.deque[tuple[Any, torch.Tensor, str, int]] = collections.deque()
        self.reset(stage_of, tags)

    def reset(self, stage_of: Callable[[int], int], tags: dict[str, int]) -> None:
        """Forget the routing and every cached shape: called for a new partition."""
        if self._pending:
            raise RuntimeError("reset with sends outstanding: flush first")
        self.stage_of = stage_of
        self.tags = dict(tags)
        self._sent_meta: dict[MetaKey, TensorMeta] = {}
        self._recv_meta: dict[MetaKey, TensorMeta] = {}

    # -- naming the problem ---------------------------------------------------------------

    def who(self, rank: int) -> str:
        try:
            return f"rank {rank} (stage {self.stage_of(rank)})"
        except PipeshiftError:
            return f"rank {rank}"

    def _fail(self, doing: str, peer: int | None, err: BaseException | None) -> PeerError:
        me = self.who(self.rank)
        reason = _reason(err, self.timeout_s)
        peer_text = f" from {self.who(peer)}" if peer is not None and doing.startswith("waiting") else (
            f" to {self.who(peer)}" if peer is not None else "")
        if peer is None and isinstance(err, PeerError):
            peer = err.peer
        silent = reason.startswith("no answer") or bool(isinstance(err, PeerError) and err.silent)
        return PeerError(f"{me}: {reason} while {doing}{peer_text}, at {self.where}", peer, silent)

    def _tag(self, name: str, kind: str, meta: bool = False) -> int:
        try:
            base = self.tags[name]
        except KeyError:
            raise RuntimeError(f"tensor {name!r} is not exchanged in this partition") from None
        return base * 4 + (2 if kind == GRAD else 0) + (1 if meta else 0)

    def _wait(self, work: Any, doing: str, peer: int | None) -> None:
        try:
            if self.poll:
                deadline = time.monotonic() + self.timeout_s
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    time.sleep(0.0001)
                work.wait()
            else:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except (RuntimeError, TimeoutError, dist.DistBackendError) as e:
            raise self._fail(doing, peer, e) from None

    # -- sends --------------------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, name: str, dst: int, kind: str, mb: int, mode: str = "train") -> None:
        """Start sending ``tensor`` (an activation or the gradient of one) to rank ``dst``."""
        t0 = time.perf_counter()
        payload = tensor.detach()
        if payload.device != self.device:
            payload = payload.to(self.device)
        payload = payload.contiguous()
        what = f"sending {kind} {name!r} of microbatch {mb}"
        if kind == ACT:
            key = (dst, name, mode)
            meta = TensorMeta.of(tensor)
            known = self._sent_meta.get(key)
            if known is None:
                self._sent_meta[key] = meta
                self._post_send(meta.encode(self.device), dst, self._tag(name, kind, meta=True), what)
            elif (known.shape, known.dtype) != (meta.shape, meta.dtype):
                raise PipeshiftError(
                    f"{self.who(self.rank)}: {kind} {name!r} changed from {list(known.shape)} {known.dtype} to "
                    f"{list(meta.shape)} {meta.dtype} at microbatch {mb}; shapes are exchanged once per partition, "
                    "so every microbatch must have the same shape"
                )
        self._post_send(payload, dst, self._tag(name, kind), what)
        self.comm_s += time.perf_counter() - t0
        while len(self._pending) > self.max_pending:
            self._complete_oldest_send()

    def _post_send(self, payload: torch.Tensor, dst: int, tag: int, what: str) -> None:
        try:
            work = dist.isend(payload, dst=dst, tag=tag)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self._fail(what, dst, e) from None
        self._pending.append((work, payload, what, dst))

    def _complete_oldest_send(self) -> None:
        t0 = time.perf_counter()
        work, _payload, what, dst = self._pending.popleft()
        self._wait(work, f"{what} (waiting for the receiver)", dst)
        self.comm_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every send has been received."""
        while self._pending:
            self._complete_oldest_send()

    @property
    def pending_sends(self) -> int:
        return len(self._pending)

    # -- receives -----------------------------------------------------------------------------

    def recv(self, name: str, src: int, kind: str, mb: int, *, like: TensorMeta | None = None,
             mode: str = "train") -> PendingRecv:
        """Post a receive; ``like`` gives a gradient's shape (activations use the cached metadata).

        The first activation of a name from a peer waits for its metadata right here, so the
        payload's receive is posted at once: receives are then posted in exactly the order
        the peer sends, which NCCL (it matches by order, not by tag) requires.
        """
        key = (src, name, mode)
        pending = PendingRecv(name, src, kind, mb, key)
        doing = f"waiting for {kind} {name!r} of microbatch {mb}"
        meta = like if kind == GRAD else self._recv_meta.get(key)
        if meta is None:
            t0 = time.perf_counter()
            buf = torch.empty(_META_LEN, dtype=torch.int64, device=self.device)
            try:
                work = dist.irecv(buf, src=src, tag=self._tag(name, kind, meta=True))
            except (RuntimeError, dist.DistBackendError) as e:
                raise self._fail(doing, src, e) from None
            self._wait(work, doing + " (shape handshake)", src)
            try:
                meta = self._recv_meta[key] = TensorMeta.decode(buf)
            except PeerError as e:
                raise self._fail(doing, src, e) from None
            self.wait_s += time.perf_counter() - t0
        try:
            self._post_recv(pending, meta)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self._fail(doing, src, e) from None
        return pending

    def _post_recv(self, pending: PendingRecv, meta: TensorMeta) -> None:
        pending.tensor = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        pending.work = dist.irecv(pending.tensor, src=pending.src, tag=self._tag(pending.name, pending.kind))

    def wait(self, pending: PendingRecv) -> torch.Tensor:
        """The received tensor (for activations: a leaf that requires grad as its sender's did)."""
        t0 = time.perf_counter()
        doing = f"waiting for {pending.kind} {pending.name!r} of microbatch {pending.mb}"
        self._wait(pending.work, doing, pending.src)
        self.wait_s += time.perf_counter() - t0
        t = pending.tensor
        if t is None:
            raise PipeshiftError(f"rank {self.rank}: {doing}: the receive was never posted")
        if pending.kind == ACT and pending.key[2] == "train" and self._recv_meta[pending.key].requires_grad:
            t.requires_grad_(True)
        return t

    # -- any other transfer (migrations) --------------------------------------------------------

    def post(self, op: Callable[..., Any], tensor: torch.Tensor, peer: int, tag: int, doing: str) -> Any:
        """Start ``op`` (``dist.isend`` or ``dist.irecv``) with a peer; a failure names it."""
        try:
            return op(tensor, peer, tag=tag)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self._fail(doing, peer, e) from None

    def wait_work(self, work: Any, doing: str, peer: int | None) -> None:
        """Wait for ``work`` under this communicator's deadline (counted as communication time)."""
        t0 = time.perf_counter()
        self._wait(work, doing, peer)
        self.comm_s += time.perf_counter() - t0

    # -- collectives ----------------------------------------------------------------------------

    def all_reduce(self, tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, doing: str) -> None:
        """Sum ``tensors`` in place over ``group`` (one flat buffer, one collective)."""
        if not tensors:
            return
        t0 = time.perf_counter()
        flat = torch.cat([t.reshape(-1) for t in tensors])
        try:
            work = dist.all_reduce(flat, group=group, async_op=True)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self._fail(doing, None, e) from None
        self._wait(work, doing, None)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        self.comm_s += time.perf_counter() - t0

    def all_gather_bytes(self, data: bytes, doing: str, group: dist.ProcessGroup | None = None) -> list[bytes]:
        """Every rank's ``data`` (used for start-up agreement checks)."""
        world = dist.get_world_size(group)
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        self._collective(lambda: dist.all_gather(sizes, size, group=group, async_op=True), doing)
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
        bufs = [torch.zeros_like(buf) for _ in range(world)]
        self._collective(lambda: dist.all_gather(bufs, buf, group=group, async_op=True), doing)
        return [bytes(b[: int(s.item())].cpu().tolist()) for b, s in zip(bufs, sizes)]

    def broadcast_bytes(self, data: bytes | None, doing: str, src: int = 0) -> bytes:
        """``src``'s ``data`` on every rank (the other ranks pass ``None``): a size, then the bytes."""
        mine = data if self.rank == src and data is not None else b""
        size = torch.tensor([len(mine)], dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.broadcast(size, src, async_op=True), doing)
        n = int(size.item())
        if n == 0:
            return b""
        buf = (torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(self.device) if self.rank == src
               else torch.empty(n, dtype=torch.uint8, device=self.device))
        self._collective(lambda: dist.broadcast(buf, src, async_op=True), doing)
        return bytes(buf.cpu().numpy().tobytes())

    def broadcast(self, tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None, doing: str) -> None:
        """``src``'s ``tensor`` into every rank's ``tensor`` of ``group`` (in place)."""
        self._collective(lambda: dist.broadcast(tensor, src, group=group, async_op=True), doing)

    def barrier(self, doing: str, group: dist.ProcessGroup | None = None) -> None:
        self._collective(lambda: dist.barrier(group=group, async_op=True), doing)

    def _collective(self, start: Callable[[], object], doing: str) -> None:
        t0 = time.perf_counter()
        try:
            work = start()
        except (RuntimeError, dist.DistBackendError) as e:
            raise self._fail(doing, None, e) from None
        self._wait(work, doing, None)
        self.comm_s += time.perf_counter() - t0


def _reason(err: BaseException | None, timeout_s: float) -> str:
    text = " ".join(str(err or "").split())
    if err is None:
        return "failed"
    if isinstance(err, TimeoutError) or "timed out" in text.lower() or "timeout" in text.lower():
        return f"no answer within {timeout_s:g} s"
    if "closed" in text.lower() or "reset by peer" in text.lower() or "broken pipe" in text.lower():
        return "peer exited (connection closed)"
    if isinstance(err, PeerError):
        return str(err)
    return f"communication failed ({text[:200]})"
