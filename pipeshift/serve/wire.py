"""Messages between serving ranks: a fixed-size header, then one flat payload.

Training exchanges every tensor's shape once per partition (:mod:`pipeshift.runtime.comm`);
serving cannot: every batch has its own size and, for sequence models, its own length. So every
message carries its own header — kind, batch number, the dtype and shape of each tensor, the
payload's byte count — as one int64 tensor of fixed length, and the tensors follow packed in
one uint8 buffer (one message instead of one per tensor; the copy costs far less than a
message). Both ends know from the routing which names a message holds and in what order, so
names never travel.

Streams are told apart by tag (control from the front end, raw inputs, activations, outputs,
pongs; the payload of each on the next tag), so messages of one stream between two ranks are
matched in order and streams never mix. Every wait has a deadline; a dead peer's closed
connection fails a wait at once. A rank that talks to itself (the front end's own stage) goes
through a :class:`Mailbox` instead of the network.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeshift.runtime.comm import PeerError

# kinds
BATCH, PING, STOP, SWITCH, DATA, SKIP, PONG = 1, 2, 3, 4, 5, 6, 7
LOAD, EVICT, LOADED = 8, 9, 10  # several models: swap a model's shard in / out, and a rank's report of a swap-in
KIND_NAMES = {BATCH: "batch", PING: "ping", STOP: "stop", SWITCH: "switch", DATA: "data", SKIP: "skip",
              PONG: "pong", LOAD: "load", EVICT: "evict", LOADED: "loaded"}
# streams (header tag; the payload travels on tag + 1)
CTRL, RAW, ACT, OUT, PONGS, SWAPS = 100, 102, 104, 106, 108, 110
STREAM_NAMES = {CTRL: "control message", RAW: "raw inputs", ACT: "activations", OUT: "outputs", PONGS: "pong",
                SWAPS: "swap-in report"}

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64]
MAX_DIMS = 8
MAX_TENSORS = 16
_MAGIC = 0x5053_5256  # "PSRV"
_FIXED = 5
HEADER_LEN = _FIXED + MAX_TENSORS * (2 + MAX_DIMS)
_ALIGN = 16


@dataclasses.dataclass
class Message:
    kind: int
    batch: int = -1
    tensors: list[torch.Tensor] = dataclasses.field(default_factory=list)
    text: str = ""  # an error (SKIP), a plan (SWITCH), counters (PONG)


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def encode(msg: Message) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The header and the payload (None when there is nothing but the header)."""
    if len(msg.tensors) > MAX_TENSORS:
        raise PeerError(f"a message holds at most {MAX_TENSORS} tensors, not {len(msg.tensors)}")
    text = msg.text.encode()
    row = [_MAGIC, msg.kind, msg.batch, len(msg.tensors), len(text)]
    parts: list[torch.Tensor] = []
    offset = _padded(len(text))
    if text:
        parts.append(torch.frombuffer(bytearray(text.ljust(offset, b"\0")), dtype=torch.uint8))
    for t in msg.tensors:
        if t.dim() > MAX_DIMS or t.dtype not in _DTYPES:
            raise PeerError(f"cannot send a {t.dim()}-d {t.dtype} tensor between ranks")
        row += [_DTYPES.index(t.dtype), t.dim(), *t.shape, *([0] * (MAX_DIMS - t.dim()))]
        flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        parts.append(flat)
        pad = _padded(flat.numel()) - flat.numel()
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
        offset += flat.numel() + pad
    row += [0] * (HEADER_LEN - len(row))
    header = torch.tensor(row, dtype=torch.int64)
    return header, (torch.cat(parts) if parts else None)


def payload_bytes(header: torch.Tensor) -> tuple[int, list[tuple[torch.dtype, tuple[int, ...]]], int]:
    """From a header: the payload's size, each tensor's dtype and shape, and the text's length."""
    row = header.tolist()
    if row[0] != _MAGIC or not 0 <= row[3] <= MAX_TENSORS or row[4] < 0:
        raise PeerError(f"garbled message header {row[:5]}")
    specs = []
    total = _padded(row[4])
    for k in range(row[3]):
        base = _FIXED + k * (2 + MAX_DIMS)
        code, ndim = row[base], row[base + 1]
        if not 0 <= code < len(_DTYPES) or not 0 <= ndim <= MAX_DIMS:
            raise PeerError(f"garbled tensor description {row[base:base + 2]}")
        shape = tuple(int(d) for d in row[base + 2: base + 2 + ndim])
        if any(d < 0 for d in shape):
            raise PeerError(f"garbled tensor shape {list(shape)}")
        specs.append((_DTYPES[code], shape))
        n = _DTYPES[code].itemsize
        for d in shape:
            n *= d
        total += _padded(n)
    return total, specs, row[4]


def decode(header: torch.Tensor, payload: torch.Tensor | None) -> Message:
    _total, specs, text_len = payload_bytes(header)
    row = header[:3].tolist()
    text, tensors = "", []
    offset = _padded(text_len)
    if payload is not None:
        text = bytes(payload[:text_len].numpy().tobytes()).decode(errors="replace") if text_len else ""
        for dtype, shape in specs:
            n = dtype.itemsize
            for d in shape:
                n *= d
            tensors.append(payload[offset:offset + n].view(dtype).view(shape))
            offset += _padded(n)
    return Message(int(row[1]), int(row[2]), tensors, text)


class Mailbox:
    """In-process delivery for a rank that sends to itself (the front end and its own stage)."""

    def __init__(self) -> None:
        self._queues: dict[int, queue.Queue] = collections.defaultdict(queue.Queue)
        self._lock = threading.Lock()

    def box(self, tag: int) -> queue.Queue:
        with self._lock:
            return self._queues[tag]


class Link:
    """One thread's sends and receives, with deadlines; several threads of a rank share a Mailbox.

    Sends are asynchronous and kept until they complete; past ``max_pending`` the oldest is
    waited for, so a fast sender cannot run unboundedly ahead of a slow receiver.
    """

    def __init__(self, rank: int, mailbox: Mailbox, timeout_s: float, who: Callable[[int], str],
                 max_pending: int = 16):
        self.rank = rank
        self.mailbox = mailbox
        self.timeout_s = timeout_s
        self.who = who
        self.max_pending = max_pending
        self._pending: collections.deque = collections.deque()
        self.wait_s = 0.0

    def _fail(self, doing: str, peer: int, err: BaseException | None) -> PeerError:
        text = " ".join(str(err or "").split())
        low = text.lower()
        if isinstance(err, (TimeoutError, queue.Empty)) or "timed out" in low or "timeout" in low:
            reason = f"no answer within {self.timeout_s:g} s"
        elif "closed" in low or "reset by peer" in low or "broken pipe" in low or "connection" in low:
            reason = "peer exited (connection closed)"
        else:
            reason = f"communication failed ({text[:200]})"
        return PeerError(f"{self.who(self.rank)}: {reason} while {doing} {self.who(peer)}")

    def send(self, msg: Message, dst: int, tag: int) -> None:
        if dst == self.rank:
            self.mailbox.box(tag).put(msg)
            return
        header, payload = encode(msg)
        what = f"sending {STREAM_NAMES.get(tag, tag)} ({KIND_NAMES.get(msg.kind, msg.kind)} {msg.batch}) to"
        for t, tg in ((header, tag), (payload, tag + 1)):
            if t is None:
                continue
            try:
                work = dist.isend(t, dst, tag=tg)
            except (RuntimeError, dist.DistBackendError) as e:
                raise self._fail(what, dst, e) from None
            self._pending.append((work, t, what, dst))
        while len(self._pending) > self.max_pending:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        work, _t, what, dst = self._pending.popleft()
        self._wait(work, what + " (waiting for the receiver)", dst)

    def flush(self) -> None:
        while self._pending:
            self._complete_oldest()

    def _wait(self, work, doing: str, peer: int, timeout_s: float | None = None) -> None:
        try:
            work.wait(timeout=timedelta(seconds=timeout_s or self.timeout_s))
        except (RuntimeError, TimeoutError, dist.DistBackendError) as e:
            raise self._fail(doing, peer, e) from None

    def recv(self, src: int, tag: int, timeout_s: float | None = None) -> Message:
        """The next message of stream ``tag`` from ``src``."""
        import time

        t0 = time.perf_counter()
        doing = f"waiting for {STREAM_NAMES.get(tag, tag)} from"
        if src == self.rank:
            try:
                msg = self.mailbox.box(tag).get(timeout=timeout_s or self.timeout_s)
            except queue.Empty as e:
                raise self._fail(doing, src, e) from None
            self.wait_s += time.perf_counter() - t0
            return msg
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        self._wait(self._post(dist.irecv, header, src, tag, doing), doing, src, timeout_s)
        total, _specs, _ = payload_bytes(header)
        payload = None
        if total:
            payload = torch.empty(total, dtype=torch.uint8)
            self._wait(self._post(dist.irecv, payload, src, tag + 1, doing), doing, src, timeout_s)
        self.wait_s += time.perf_counter() - t0
        return decode(header, payload)

    def _post(self, op, t: torch.Tensor, peer: int, tag: int, doing: str):
        try:
            return op(t, peer, tag=tag)
        except (RuntimeError, dist.DistBackendError) as e:
            raise self._fail(doing, peer, e) from None


def split_rows(tensors: Sequence[torch.Tensor], counts: Sequence[int]) -> list[list[torch.Tensor]]:
    """Cut every batched tensor along dim 0 into the given row counts (one list per request)."""
    pieces = [list(torch.split(t, list(counts))) for t in tensors]
    return [[p[i] for p in pieces] for i in range(len(counts))]
