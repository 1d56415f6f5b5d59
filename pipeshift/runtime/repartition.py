"""Moving a running pipeline onto a new plan: regenerate the stages, move only what changes owner.

At a synchronisation point (no microbatch in flight: after a flush, or a drained 1F1B/2BW
segment) every rank calls :meth:`Repartitioner.switch` with the same plan. Each rank then

1. regenerates *all* stage modules through codegen's path (:func:`pipeshift.codegen.build_stages`
   over this rank's local full model, with the model's graph captured once per process), so it
   knows which state_dict keys every stage of the new plan holds;
2. works out the transfers (:func:`plan_transfers`): a rank that holds a key under the new plan
   but did not under the old one gets it from one old holder — every replica of a stage that
   gains a layer gets its own copy; a rank that keeps a key moves nothing;
3. exchanges them point to point (:func:`exchange`) — parameters, buffers and the optimizer's
   per-parameter state (momentum buffers, Adam moments, step counts), batched per peer: one
   small header, one JSON description, one flat buffer for all small tensors and one message per
   large tensor, received straight into the full model's own storage where it can be;
4. rebuilds the executor (:meth:`~pipeshift.runtime.pipeline.Pipeline.rebuild`): new stage,
   routing, replica groups, shape caches; a new optimizer with the same hyper-parameters and the
   moved FQN-keyed state; the LR scheduler's position kept.

Keys are the original model's fully-qualified names (CONTRIBUTING.md), so nothing here depends
on positions, and the result equals training without the switch (flush: ≤ 1e-5, tested).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeshift.errors import PipeshiftError
from pipeshift.materialize import install, release
from pipeshift.plan import Plan
from pipeshift.runtime.allocator import resident_bytes, return_freed_memory
from pipeshift.runtime.comm import Communicator
from pipeshift.runtime.hooks import Hooks
from pipeshift.runtime.pipeline import Pipeline, optimizer_state_by_fqn
from pipeshift.runtime.stage import StageEntry

MIGRATION_TAG = 1 << 22  # far above the pipeline's per-name tags (4 per exchanged tensor name)
SOLO_BYTES = 1 << 20  # tensors at least this large travel as their own message, without a copy
_ALIGN = 16
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


# -- partitions -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Partition:
    """A plan as the runtime sees it: the :class:`Plan` and the state_dict keys each of its stages holds."""

    plan: Plan
    stage_keys: tuple[frozenset[str], ...]

    @classmethod
    def of(cls, plan: Plan, stage_modules: Sequence[nn.Module]) -> Partition:
        if plan.num_stages != len(stage_modules):
            raise PipeshiftError(f"{len(stage_modules)} stage modules for {plan.num_stages} stages")
        return cls(plan, tuple(frozenset(m.state_dict().keys()) for m in stage_modules))

    @property
    def stage_ranks(self) -> list[list[int]]:
        return self.plan.stage_ranks

    def holders(self) -> dict[str, tuple[int, ...]]:
        """key -> the ranks holding it (every replica of every stage that has it), sorted."""
        out: dict[str, set[int]] = {}
        for ranks, keys in zip(self.stage_ranks, self.stage_keys):
            for k in keys:
                out.setdefault(k, set()).update(ranks)
        return {k: tuple(sorted(r)) for k, r in out.items()}

    def keys_of(self, rank: int) -> frozenset[str]:
        return frozenset().union(*(k for r, k in zip(self.stage_ranks, self.stage_keys) if rank in r))


@dataclasses.dataclass(frozen=True)
class Transfer:
    key: str
    src: int
    dst: int


def plan_transfers(old: Partition, new: Partition) -> list[Transfer]:
    """Every (key, from, to) a switch from ``old`` to ``new`` needs, in a fixed order.

    A rank that holds a key under ``new`` but not under ``old`` receives it from one of the
    key's old holders; the new holders of a key are dealt round-robin over its old holders so a
    replicated source shares the sending. A key no rank held before (it cannot be, for plans of
    one model) keeps the receiving rank's own value.
    """
    before, after = old.holders(), new.holders()
    out: list[Transfer] = []
    for key in sorted(after):
        sources = before.get(key, ())
        if not sources:
            continue
        gaining = [r for r in after[key] if r not in sources]
        for i, dst in enumerate(gaining):
            out.append(Transfer(key, sources[i % len(sources)], dst))
    return out


# -- the exchange -----------------------------------------------------------------------------


@dataclasses.dataclass
class ExchangeStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    keys_sent: int = 0
    keys_received: int = 0
    peers: list[int] = dataclasses.field(default_factory=list)


# a posted message: its work handle, the tensor (kept alive until it completes), what it does, the peer
_Posted = tuple[Any, torch.Tensor, str, int]


@dataclasses.dataclass
class _Item:
    kind: str  # "model" or "optim"
    key: str
    name: str  # optimizer state entry ("exp_avg"), "" for model tensors
    tensor: torch.Tensor | None = None
    dtype: str = ""
    shape: tuple[int, ...] = ()
    solo: bool = False

    @property
    def value(self) -> torch.Tensor:
        """The tensor an outgoing item sends (a received item's description has none)."""
        if self.tensor is None:
            raise PipeshiftError(f"{self.key} {self.name}: no tensor to send")
        return self.tensor

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * _DTYPES[self.dtype].itemsize


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _describe(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise PipeshiftError(f"cannot migrate a {t.dtype} tensor")
    return name, tuple(t.shape)


def _outgoing(keys: Sequence[str], values: Mapping[str, torch.Tensor],
              optimizer_state: Mapping[str, Mapping[str, Any]]) -> tuple[list[_Item], dict[str, dict[str, Any]]]:
    """What one peer gets: model tensors and optimizer tensors as items, other optimizer values as JSON."""
    items: list[_Item] = []
    scalars: dict[str, dict[str, Any]] = {}
    for key in keys:
        t = values[key].detach()
        dtype, shape = _describe(t)
        items.append(_Item("model", key, "", t, dtype, shape))
        for name, value in sorted((optimizer_state.get(key) or {}).items()):
            if torch.is_tensor(value):
                dtype, shape = _describe(value)
                items.append(_Item("optim", key, name, value.detach(), dtype, shape))
            elif value is None or isinstance(value, (bool, int, float, str)):
                scalars.setdefault(key, {})[name] = value
            else:
                raise PipeshiftError(f"cannot migrate optimizer state {key}[{name!r}] of type {type(value).__name__}")
    for item in items:
        item.solo = item.nbytes >= SOLO_BYTES
    return items, scalars


def exchange(transfers: Sequence[Transfer], rank: int, values: Mapping[str, torch.Tensor],
             optimizer_state: Mapping[str, Mapping[str, Any]], destination: Mapping[str, torch.Tensor],
             comm: Communicator, where: str = "repartition",
             pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] | None = None,
             arrived: dict[str, torch.Tensor] | None = None,
             hooks: Hooks | None = None) -> tuple[ExchangeStats, dict[str, dict[str, Any]]]:
    """Run this rank's part of ``transfers``; returns its statistics and the optimizer state it received.

    ``values``/``optimizer_state``: this rank's current tensors and FQN-keyed optimizer state
    (what it sends); ``destination``: the tensors received model keys are written into (the
    local full model's state, so the regenerated stages adopt them). Three rounds, each posted
    in full on every rank before anyone waits, so no rank can block another: sizes, then the
    JSON descriptions, then the payloads. ``comm`` (a Communicator) supplies the deadline and
    the one-line error naming the peer; ``pool``, buffers reserved for large optimizer tensors;
    ``hooks``, the rank's hook points (``mid_migration`` runs once the sends are posted).
    A model key whose destination is a meta placeholder (a layer this rank never held) is put in
    ``arrived`` instead, in the storage it was received into, for the caller to install.
    """
    stats = ExchangeStats()
    device = comm.device
    sends: dict[int, list[str]] = {}
    recvs: dict[int, list[str]] = {}
    for t in transfers:
        if t.src == rank:
            sends.setdefault(t.dst, []).append(t.key)
        if t.dst == rank:
            recvs.setdefault(t.src, []).append(t.key)
    stats.peers = sorted(set(sends) | set(recvs))
    outgoing = {dst: _outgoing(keys, values, optimizer_state) for dst, keys in sorted(sends.items())}
    metas = {dst: json.dumps({"items": [[i.kind, i.key, i.name, i.dtype, list(i.shape), i.solo] for i in items],
                              "scalars": scalars}).encode() for dst, (items, scalars) in outgoing.items()}

    def post_send(t: torch.Tensor, dst: int, index: int, what: str) -> _Posted:
        stats.messages += 1
        stats.bytes_sent += t.numel() * t.element_size()
        return comm.post(dist.isend, t, dst, MIGRATION_TAG + index, f"sending {what} ({where})"), t, \
            f"sending {what} ({where})", dst

    def post_recv(t: torch.Tensor, src: int, index: int, what: str) -> _Posted:
        stats.bytes_received += t.numel() * t.element_size()
        return comm.post(dist.irecv, t, src, MIGRATION_TAG + index, f"waiting for {what} ({where})"), t, \
            f"waiting for {what} ({where})", src

    def wait_all(works: list[_Posted]) -> None:
        for work, _t, doing, peer in works:
            comm.wait_work(work, doing, peer)

    # round 1: description sizes
    works = [post_send(torch.tensor([len(m)], dtype=torch.int64, device=device), dst, 0, "a migration header")
             for dst, m in metas.items()]
    sizes = {src: torch.zeros(1, dtype=torch.int64, device=device) for src in sorted(recvs)}
    works += [post_recv(buf, src, 0, "a migration header") for src, buf in sizes.items()]
    wait_all(works)
    # round 2: descriptions
    works = [post_send(torch.frombuffer(bytearray(m), dtype=torch.uint8).to(device), dst, 1, "the migration list")
             for dst, m in metas.items()]
    texts = {src: torch.empty(int(n.item()), dtype=torch.uint8, device=device) for src, n in sizes.items()}
    works += [post_recv(buf, src, 1, "the migration list") for src, buf in texts.items()]
    wait_all(works)
    incoming = {src: _parse_meta(bytes(buf.cpu().numpy().tobytes()), src, recvs[src]) for src, buf in texts.items()}
    # round 3: payloads
    works = []
    for dst, (items, _scalars) in outgoing.items():
        small = [i for i in items if not i.solo]
        if small:
            works.append(post_send(_pack(small, device), dst, 2, f"{len(small)} small tensors"))
        for k, item in enumerate(i for i in items if i.solo):
            works.append(post_send(item.value.contiguous().to(device), dst, 3 + k, f"{item.key} {item.name}".strip()))
        stats.keys_sent += len(sends[dst])
    if hooks is not None:
        hooks.migrating()
    landing: list[tuple[_Item, torch.Tensor]] = []  # (item, buffer) to place after the receives
    flats: list[tuple[list[_Item], torch.Tensor]] = []
    for src, (items, _scalars) in incoming.items():
        small = [i for i in items if not i.solo]
        if small:
            flat = torch.empty(sum(_padded(i.nbytes) for i in small), dtype=torch.uint8, device=device)
            works.append(post_recv(flat, src, 2, f"{len(small)} small tensors"))
            flats.append((small, flat))
        for k, item in enumerate(i for i in items if i.solo):
            buf = _landing_buffer(item, destination, device, pool or {})
            works.append(post_recv(buf, src, 3 + k, f"{item.key} {item.name}".strip()))
            landing.append((item, buf))
        stats.keys_received += len(recvs[src])
    wait_all(works)
    received_state: dict[str, dict[str, Any]] = {}
    for items, flat in flats:
        landing += list(zip(items, _unpack(items, flat)))
    with torch.no_grad():
        for item, buf in landing:
            if item.kind == "model":
                dest = destination.get(item.key)
                if dest is None:
                    raise PipeshiftError(f"{where}: received {item.key!r}, which this model does not have")
                if dest.device.type == "meta" and arrived is not None:
                    arrived[item.key] = buf if item.solo else buf.clone()
                elif buf is not dest:
                    if tuple(dest.shape) != item.shape:
                        raise PipeshiftError(f"{where}: {item.key!r} arrived as {list(item.shape)}, "
                                             f"the model has {list(dest.shape)}")
                    dest.copy_(buf)
            else:
                received_state.setdefault(item.key, {})[item.name] = buf.clone() if not item.solo else buf
    for _src, (_items, scalars) in incoming.items():
        for key, entries in scalars.items():
            received_state.setdefault(key, {}).update(entries)
    return stats, received_state


def _parse_meta(data: bytes, src: int, expected: Sequence[str]) -> tuple[list[_Item], dict[str, dict[str, Any]]]:
    try:
        meta = json.loads(data.decode())
        items = [_Item(kind, key, name, None, dtype, tuple(int(s) for s in shape), bool(solo))
                 for kind, key, name, dtype, shape, solo in meta["items"]]
        scalars = meta.get("scalars", {})
    except (ValueError, KeyError, TypeError) as e:
        raise PipeshiftError(f"garbled migration list from rank {src}: {e}") from None
    for item in items:
        if item.dtype not in _DTYPES or item.kind not in ("model", "optim"):
            raise PipeshiftError(f"garbled migration list from rank {src}: {item.kind} {item.dtype}")
    got = sorted({i.key for i in items if i.kind == "model"})
    if got != sorted(expected):
        raise PipeshiftError(f"rank {src} sends {got[:3]}… but this rank expected {sorted(expected)[:3]}…: "
                             "the ranks disagree about the plan")
    return items, scalars


def _pack(items: Sequence[_Item], device: torch.device) -> torch.Tensor:
    flat = torch.zeros(sum(_padded(i.nbytes) for i in items), dtype=torch.uint8, device=device)
    offset = 0
    for i in items:
        n = i.nbytes
        if n:
            flat[offset:offset + n].copy_(i.value.contiguous().reshape(-1).view(torch.uint8))
        offset += _padded(n)
    return flat


def _unpack(items: Sequence[_Item], flat: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for i in items:
        n = i.nbytes
        out.append(flat[offset:offset + n].view(_DTYPES[i.dtype]).view(i.shape))
        offset += _padded(n)
    return out


def _landing_buffer(item: _Item, destination: Mapping[str, torch.Tensor], device: torch.device,
                    pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]]) -> torch.Tensor:
    """Where a large tensor is received: the full model's own tensor, a reserved buffer, or a new one."""
    dtype = _DTYPES[item.dtype]
    if item.kind == "model":
        dest = destination.get(item.key)
        if (dest is not None and tuple(dest.shape) == item.shape and dest.dtype == dtype and dest.device == device
                and dest.is_contiguous()):
            return dest
    elif pool.get((item.shape, dtype)):
        return pool[(item.shape, dtype)].pop()
    return torch.empty(item.shape, dtype=dtype, device=device)


# -- the switch -----------------------------------------------------------------------------------


def check_plan(plan: Plan, world_size: int, microbatches: int, running: Plan | None = None,
               source: str | None = None) -> None:
    """The checks every rank makes, identically, before it touches anything for a new plan.

    ``running`` is the plan in force: a new one may move layers, never change the model or the
    batch size (the data stream, the optimizer's arithmetic and every buffer depend on it).
    Errors name ``source`` (default: the plan's).
    """
    from pipeshift.codegen.planfile import model_spec as spec_of

    parsed, source = plan, source or plan.source
    if parsed.world_size != world_size:
        raise PipeshiftError(f"{source}: the stages use ranks 0..{parsed.world_size - 1} but this job has ranks "
                             f"0..{world_size - 1}")
    spec = spec_of(parsed)
    if running is not None:
        if running.batch_size is not None and parsed.batch_size != running.batch_size:
            raise PipeshiftError(f"{source}: the plan is for batch size {parsed.batch_size}, the running job's is "
                                 f"{running.batch_size}; a repartition only moves layers")
        if running.model is not None and spec.to_json() != running.model:
            raise PipeshiftError(f"{source}: the plan is for {spec.callable} with other arguments or seed than "
                                 "the running model")
    stages = len(parsed.stages)
    if microbatches < stages:
        raise PipeshiftError(f"{source}: {stages} stages need at least {stages} microbatches (this job has "
                             f"{microbatches})")
    for st in parsed.stages:
        if microbatches % st.replicas:
            raise PipeshiftError(f"{source}: stage {st.stage_id} has {st.replicas} replicas, which do not divide "
                                 f"the {microbatches} microbatches")


class Repartitioner:
    """This rank's means to switch plans: its local full model, the captured graph, the current partition.

    ``full_model`` is the rank's whole copy of the model; the current stage's modules should be
    its modules (then nothing is copied), but need not be (their values are copied in before a
    switch). ``criterion`` is the package's last entry, reused unchanged: its inputs (the model's
    outputs and ``target``) do not depend on the split.
    """

    def __init__(self, rank: int, full_model: nn.Module, criterion: StageEntry, partition: Partition,
                 model_capture: Any = None, hooks: Hooks | None = None):
        self.rank = rank
        self.hooks = hooks or Hooks()
        self.full_model = full_model
        self.criterion = criterion
        self.partition = partition
        self._capture = model_capture
        self._pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._pool_thread: threading.Thread | None = None

    @property
    def plan(self) -> Plan:
        return self.partition.plan

    def capture(self) -> Any:
        """The model's graph, captured once (the part of codegen that does not depend on the split)."""
        if self._capture is None:
            from pipeshift.codegen import capture_model

            self._capture = capture_model(self.plan, weights=False)
        return self._capture

    def entries(self, plan: Plan) -> list[StageEntry]:
        """The plan's module list: its stages over the full model, then the criterion."""
        from pipeshift.codegen import build_stages

        stages = build_stages(plan, self.full_model, model_capture=self.capture())
        return [*stages, self.criterion]

    def prepare(self, plan: Plan) -> Prepared:
        """Render ``plan``: its stage modules and which keys each stage holds — deterministic, touches nothing.

        Every rank gets the same answer (or the same error) for the same plan, so a plan that
        cannot be rendered is refused by all ranks alike, without a word between them.
        """
        t0 = time.perf_counter()
        entries = self.entries(plan)
        new = Partition.of(plan, [m for m, _, _ in entries[:-1]])
        return Prepared(entries, new, time.perf_counter() - t0)

    def reserve(self, prepared: Prepared, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
        """Allocate, in the background, the optimizer-state buffers this rank will receive; returns their bytes.

        Fresh memory costs a page fault per 4 KiB page the first time it is written — for a
        100M-parameter migration that is most of the pause on a CPU — so buffers shaped like the
        parameters this rank is about to receive (as many per parameter as its optimizer keeps,
        e.g. two for Adam) are allocated and touched by a thread while training goes on, and the
        transfer lands in them. A guess that does not fit just falls back to fresh buffers.
        """
        self.release()
        per_param = _state_tensors_per_param(optimizer)
        if not per_param or not self.hooks.reserve_landing_buffers:
            return 0
        full = dict(self.full_model.named_parameters())
        gaining = [t.key for t in plan_transfers(self.partition, prepared.partition) if t.dst == self.rank]
        buffers = [torch.empty(full[k].shape, dtype=full[k].dtype, device=device)
                   for k in gaining if k in full for _ in range(per_param)]
        for b in buffers:
            self._pool.setdefault((tuple(b.shape), b.dtype), []).append(b)
        self._pool_thread = threading.Thread(target=lambda: [b.zero_() for b in buffers], name="pipeshift-reserve",
                                             daemon=True)
        self._pool_thread.start()
        return sum(b.numel() * b.element_size() for b in buffers)

    def release(self) -> None:
        if self._pool_thread is not None:
            self._pool_thread.join()
        self._pool_thread = None
        self._pool = {}

    def switch(self, pipeline: Pipeline, plan: Plan | Prepared, where: str = "repartition") -> dict[str, Any]:
        """Move ``pipeline`` onto ``plan`` (every rank, together, at a synchronisation point).

        Returns this rank's account: what moved, how many bytes, and how long each part took.
        ``pause_s`` is what training waits for once every rank has arrived (rendering included
        when ``plan`` was not prepared beforehand); ``sync_wait_s``, the wait for the others.
        """
        t0 = time.perf_counter()
        prepared = plan if isinstance(plan, Prepared) else self.prepare(plan)
        render_s = 0.0 if isinstance(plan, Prepared) else time.perf_counter() - t0
        new = prepared.partition
        transfers = plan_transfers(self.partition, new)
        # Ranks reach a synchronisation point at different times (the last stage's optimizer step
        # may still run); that wait is the pipeline's, not the migration's, so it is kept apart.
        t_sync = time.perf_counter()
        pipeline.comm.flush()
        pipeline.comm.barrier(f"{where}: waiting for every rank to reach the switch")
        t_start = time.perf_counter()
        faults = _page_faults()
        if self._pool_thread is not None:
            self._pool_thread.join()
        t_reserved = time.perf_counter()

        current = pipeline.stage.state_dict()
        saved = optimizer_state_by_fqn(pipeline.optimizer, pipeline.stage.params)
        full = self.full_model.state_dict()
        mine = new.keys_of(self.rank)
        arrived: dict[str, torch.Tensor] = {}
        with torch.no_grad():  # keys this rank keeps: make sure the full model has their values
            for key in mine & current.keys():
                if key in full and full[key].device.type == "meta":
                    arrived[key] = current[key]
                elif key in full and full[key].data_ptr() != current[key].data_ptr():
                    full[key].copy_(current[key])
        stats, received = exchange(transfers, self.rank, current, saved["state"], full, pipeline.comm, where,
                                   pool=self._pool, hooks=self.hooks, arrived=arrived)
        self.release()
        rss_before = resident_bytes()
        # Layers this rank never held arrive into fresh storage and take their meta placeholders'
        # place; layers it gives away go back to meta, so the model holds only the new stages.
        install(self.full_model, arrived)
        given = self.partition.keys_of(self.rank) - mine
        released = release(self.full_model, given)
        entries = prepared.entries if not (arrived or released) else self.entries(prepared.partition.plan)
        del current, full
        t_move = time.perf_counter()
        faults = _page_faults() - faults

        state = {k: v for k, v in saved["state"].items() if k in mine}
        state.update(received)
        hyper = {k: v for k, v in (saved["param_groups"] or [{}])[0].items() if k != "params"}
        from pipeshift.codegen.partition import find_ties

        stages = new.plan.num_stages
        module_to_stage = list(range(stages)) + [stages - 1]
        pipeline.rebuild(entries, module_to_stage, new.stage_ranks,
                         optimizer_state={"state": state, "param_groups": [{**hyper, "params": sorted(mine)}]},
                         source=where, ties=find_ties([m for m, _, _ in prepared.entries[:-1]]))
        self.partition = new
        del saved, state, received, entries
        prepared.entries = []  # the stages over the old model state are not needed any more
        if released:
            return_freed_memory()
        t_end = time.perf_counter()
        return {
            "rank": self.rank, "stage": pipeline.stage_id,
            "keys_moved_total": len(transfers), "keys_sent": stats.keys_sent,
            "keys_received": stats.keys_received, "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received, "messages": stats.messages, "peers": stats.peers,
            "render_s": render_s if render_s else prepared.render_s, "rendered_before": render_s == 0.0,
            "sync_wait_s": t_start - t_sync, "reserve_wait_s": t_reserved - t_start,
            "transfer_s": t_move - t_reserved, "rebuild_s": t_end - t_move, "page_faults": faults,
            "bytes_released": released, "rss_before_bytes": rss_before, "rss_after_bytes": resident_bytes(),
            "pause_s": render_s + (t_end - t_start),
        }


@dataclasses.dataclass
class Prepared:
    """A rendered plan, ready to switch to: its module list and key ownership (its ``partition``)."""

    entries: list[StageEntry]
    partition: Partition
    render_s: float


def _page_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory), 0 where unknown."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def _state_tensors_per_param(optimizer: torch.optim.Optimizer) -> int:
    """How many parameter-shaped tensors the optimizer keeps per parameter (momentum 1, Adam 2)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                return sum(1 for v in state.values() if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0)
    return 0
