"""Several models on one set of stage ranks: per-model queues, residency, LRU swaps, every decision logged.

The front end of a multi-model server is :class:`~pipeshift.serve.frontend.Frontend` (batches in
flight, the collector, the pinger, failure and shut-down) with its dispatcher replaced:

* **Admission** is per model: each model has its own bounded queue (``--queue`` requests); a
  full one answers 503 with ``Retry-After`` at once, whatever the model's residency. A request
  for a model being swapped in waits in its queue like any other; a swap never fails a request.
* **Choice**: the model whose oldest request has waited longest goes next. If it is resident
  its batch is dispatched; otherwise a swap is needed. After ``max_swaps_in_a_row`` swaps with
  no batch of an already-resident model in between, a batch of a resident model with waiting
  requests goes first, so a hot model keeps being served while cold ones come and go.
* **Residency**: at most ``max_loaded`` models resident (or loading) at once, and on every rank
  the bytes of the resident shards within that rank's budget (``--device-memory``). Room is
  made by evicting the least recently used resident models that have no batch in flight (a
  busy one is waited for, never interrupted). The ranks evict and load in the order the front
  end says (the control stream), so a rank never holds more than the front end counted.
* **Swap-in**: every rank of the model loads its own shard at once (:mod:`.residency`).
  ``pipelined`` (default) dispatches the model's batches right away — each stage computes as
  soon as its own shard is in; ``whole`` waits until every rank reported (as Computron does).

Every decision (serve, swap, evict, hold back, resident) is printed on stderr and kept, most
recent last, in :attr:`MultiFrontend.decisions` (``GET /v1/models`` shows them).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pipeshift.serve import wire
from pipeshift.serve.frontend import Config, Frontend, Outcome, Request
from pipeshift.serve.residency import LOADING, OFFLOADED, RESIDENT
from pipeshift.serve.routing import Routing

SWAP_IN_MODES = ("pipelined", "whole")
DECISIONS_KEPT = 200


@dataclasses.dataclass
class Served:
    """One model behind the server, as the front end sees it."""

    name: str
    routing: Routing
    bytes_per_rank: dict[int, int]  # the model's resident bytes on each rank that holds a stage of it
    queue: collections.deque[Request] = dataclasses.field(default_factory=collections.deque)
    state: str = OFFLOADED
    last_use: float = 0.0  # monotonic; 0: never
    last_use_wall: float | None = None
    resident_since: int = -1  # the swap number that made it resident
    loading_since: float = 0.0
    swaps_in: int = 0
    evictions: int = 0
    batches: int = 0
    last_swap_s: float | None = None
    records: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)  # rank -> its last swap-in

    @property
    def ranks(self) -> list[int]:
        return sorted(self.bytes_per_rank)


class _ModelQueue:
    """What :func:`pipeshift.serve.http.run_request` submits to: one model's door."""

    def __init__(self, frontend: MultiFrontend, name: str):
        self.frontend, self.name = frontend, name

    def submit(self, req: Request) -> None:
        self.frontend.submit_to(self.name, req)


class MultiFrontend(Frontend):
    """The front end of a server of several models (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, worker: Any, mailbox: wire.Mailbox, config: Config,
                 models: Sequence[Served], *, budget: dict[int, int], max_loaded: int, swap_in: str = "pipelined",
                 max_swaps_in_a_row: int = 2, swap_timeout_s: float = 600.0, metrics: Any = None, who=None):
        super().__init__(rank, world_size, worker, mailbox, config, metrics=metrics, who=who)
        self.models = {m.name: m for m in models}
        self.budget = dict(budget)
        self.max_loaded = max_loaded
        self.pipelined = swap_in == "pipelined"
        self.max_swaps_in_a_row = max_swaps_in_a_row
        self.swap_timeout_s = swap_timeout_s
        self._cv = threading.Condition()
        self._reports: queue.Queue[Served | None] = queue.Queue()
        self._links["swaps"] = wire.Link(rank, mailbox, config.timeout_s, self.who)
        self.swaps = 0
        self.swaps_in_a_row = 0
        self.decisions: collections.deque[dict[str, Any]] = collections.deque(maxlen=DECISIONS_KEPT)
        self.on_swap: Callable[[str, list[str]], None] | None = None  # (swapped in, evicted): the metrics

    def door(self, name: str) -> _ModelQueue:
        return _ModelQueue(self, name)

    # -- admission --------------------------------------------------------------------------------

    def submit_to(self, name: str, req: Request) -> None:
        if self.dead is not None:
            req.finish(Outcome(503, reason=f"the pipeline is down: {self.dead}", headers={"Retry-After": "5"}))
            return
        if not self.accepting:
            req.finish(Outcome(503, reason="the server is shutting down", headers={"Retry-After": "5"}))
            return
        m = self.models[name]
        with self._cv:
            if len(m.queue) >= self.config.queue_size:
                full = True
            else:
                full = False
                m.queue.append(req)
                self._cv.notify_all()
        if full:
            req.finish(Outcome(503, reason=f"the queue of model {name} is full ({self.config.queue_size} requests)",
                               headers={"Retry-After": "1"}))

    def submit(self, req: Request) -> None:  # the single-model door: the first model
        self.submit_to(next(iter(self.models)), req)

    def queue_depth(self) -> int:
        with self._cv:
            return sum(len(m.queue) for m in self.models.values())

    # -- threads --------------------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        t = threading.Thread(target=self._guard(self._swap_reports), name="pipeshift-serve-swaps", daemon=True)
        t.start()
        self._threads.append(t)

    def _busy(self, m: Served) -> bool:
        with self._inflight_lock:
            return any(b.routing is m.routing for b in self._inflight.values())

    def _log(self, event: str, **fields: Any) -> None:
        record = {"t": round(time.time(), 3), "event": event, **fields}
        self.decisions.append(record)
        detail = " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())
        print(f"pipeshift serve: {event} {detail}", file=sys.stderr, flush=True)

    # -- choosing -------------------------------------------------------------------------------

    def _purge(self, m: Served) -> None:
        while m.queue and self._expired(m.queue[0]):
            m.queue.popleft()

    def _choose(self) -> tuple[str, Served, list[Served]] | None:
        """What to do next (under ``_cv``): ("serve", model, []), ("swap", model, victims) or None (wait)."""
        for m in self.models.values():
            self._purge(m)
        waiting = [m for m in self.models.values() if m.queue]
        if not waiting:
            return None
        servable = [m for m in waiting if m.state == RESIDENT or (m.state == LOADING and self.pipelined)]
        oldest = min(waiting, key=lambda m: m.queue[0].arrived)
        if oldest in servable:
            return "serve", oldest, []
        fallback = min(servable, key=lambda m: m.queue[0].arrived) if servable else None
        if oldest.state == LOADING:  # whole swap-in: its batches wait for every rank's report
            return ("serve", fallback, []) if fallback else None
        if fallback is not None and self.swaps_in_a_row >= self.max_swaps_in_a_row:
            self._log("hold", model=oldest.name, serving=fallback.name, swaps_in_a_row=self.swaps_in_a_row,
                      reason=f"{self.swaps_in_a_row} swaps in a row: a resident model's waiting requests first")
            self.swaps_in_a_row = 0  # one batch of it; then swaps may come again
            return "serve", fallback, []
        victims = self._victims(oldest)
        if victims is None:  # room only once a busy model's batches finish
            return ("serve", fallback, []) if fallback else None
        return "swap", oldest, victims

    def _victims(self, m: Served) -> list[Served] | None:
        """The least recently used resident models to evict so that ``m`` fits; None if that needs a busy one."""
        held = [x for x in self.models.values() if x.state in (RESIDENT, LOADING) and x is not m]
        used = {r: sum(x.bytes_per_rank.get(r, 0) for x in held) for r in self.budget}

        def fits() -> bool:
            return (len(held) + 1 <= self.max_loaded
                    and all(used[r] + m.bytes_per_rank.get(r, 0) <= self.budget[r] for r in m.bytes_per_rank))

        victims: list[Served] = []
        for x in sorted((x for x in held if x.state == RESIDENT), key=lambda x: x.last_use):
            if fits():
                break
            over = {r for r in m.bytes_per_rank if used[r] + m.bytes_per_rank[r] > self.budget[r]}
            if len(held) + 1 <= self.max_loaded and not over & set(x.bytes_per_rank):
                continue  # evicting it frees nothing where room is missing
            if self._busy(x):
                return None
            victims.append(x)
            held.remove(x)
            for r, n in x.bytes_per_rank.items():
                used[r] -= n
        return victims if fits() else None

    # -- dispatching ----------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self.stopping and self.dead is None:
            if not self._slots.acquire(timeout=0.05):
                continue
            with self._cv:
                choice = self._choose()
                if choice is None:
                    self._cv.wait(0.05)
            if choice is None:
                self._slots.release()
                continue
            action, m, victims = choice
            if action == "swap":
                self._slots.release()
                self._swap(m, victims)
                continue
            requests = self._gather(m)
            if not requests:
                self._slots.release()
                continue
            if m.resident_since < self.swaps:
                self.swaps_in_a_row = 0
            m.last_use, m.last_use_wall = time.monotonic(), time.time()
            m.batches += 1
            self._dispatch(requests, routing=m.routing, model=m.name)

    def _gather(self, m: Served) -> list[Request]:
        """The model's oldest request and compatible ones (same per-sample shapes), up to a batch."""
        cfg = self.config
        with self._cv:
            self._purge(m)
            if not m.queue:
                return []
            first = m.queue.popleft()
            batch, n = [first], first.n
            until = time.monotonic() + cfg.max_delay_s
            while n < cfg.max_batch:
                for req in list(m.queue):
                    if n >= cfg.max_batch:
                        break
                    if req.signature == first.signature and n + req.n <= cfg.max_batch:
                        m.queue.remove(req)
                        if not self._expired(req):
                            batch.append(req)
                            n += req.n
                left = until - time.monotonic()
                if n >= cfg.max_batch or left <= 0:
                    break
                self._cv.wait(left)
        return batch

    def _swap(self, m: Served, victims: list[Served]) -> None:
        link = self._links["dispatch"]
        with self._cv:
            self.swaps += 1
            self.swaps_in_a_row += 1
            waited = round(time.monotonic() - m.queue[0].arrived, 4) if m.queue else None
        with self._ctrl_lock:
            for v in victims:
                for rank in v.ranks:
                    link.send(wire.Message(wire.EVICT, self._next_batch, text=v.name), rank, wire.CTRL)
                v.state = OFFLOADED
                v.evictions += 1
                self._log("evict", model=v.name, reason="least recently used with no batch in flight",
                          idle_s=round(time.monotonic() - v.last_use, 4), to_make_room_for=m.name)
            for rank in m.ranks:
                link.send(wire.Message(wire.LOAD, self._next_batch, text=m.name), rank, wire.CTRL)
        with self._cv:
            m.state = LOADING
            m.loading_since = time.monotonic()
            m.resident_since = self.swaps  # its batches from now on follow this swap, not precede it
        self._log("swap-in", model=m.name, waiting=len(m.queue), oldest_waited_s=waited,
                  ranks=m.ranks, bytes={str(r): n for r, n in m.bytes_per_rank.items()},
                  mode="pipelined" if self.pipelined else "whole")
        if self.on_swap is not None:
            self.on_swap(m.name, [v.name for v in victims])
        self._reports.put(m)

    def _swap_reports(self) -> None:
        """Every rank's report of each swap-in, in the order the swaps were started."""
        link = self._links["swaps"]
        while True:
            m = self._reports.get()
            if m is None:
                return
            errors = []
            for rank in m.ranks:
                msg = link.recv(rank, wire.SWAPS, timeout_s=self.swap_timeout_s)
                record = json.loads(msg.text)
                if record.get("model") != m.name:
                    raise wire.PeerError(f"{self.who(rank)} reported a swap-in of {record.get('model')!r}, "
                                         f"expected {m.name!r}")
                m.records[rank] = record
                if record.get("error"):
                    errors.append(record["error"])
            if errors:
                self.fail(errors[0])
                return
            with self._cv:
                m.state = RESIDENT
                m.swaps_in += 1
                m.last_swap_s = time.monotonic() - m.loading_since
                self._cv.notify_all()
            self._log("resident", model=m.name, swap_in_s=round(m.last_swap_s, 4),
                      per_rank_s={str(r): round(m.records[r]["seconds"], 4) for r in m.ranks})

    # -- the end ------------------------------------------------------------------------------------

    def _answer_all(self, outcome: Outcome) -> None:
        super()._answer_all(outcome)
        with self._cv:
            waiting = [q for m in self.models.values() for q in m.queue]
            for m in self.models.values():
                m.queue.clear()
        for q in waiting:
            q.finish(outcome)

    def shutdown_ranks(self) -> None:
        self._reports.put(None)
        super().shutdown_ranks()

    # -- reporting ------------------------------------------------------------------------------------

    def describe(self, m: Served) -> dict[str, Any]:
        with self._cv:
            return {"state": m.state, "queued": len(m.queue), "last_use": m.last_use_wall, "batches": m.batches,
                    "swaps_in": m.swaps_in, "evictions": m.evictions, "last_swap_in_s": m.last_swap_s,
                    "bytes_per_rank": {str(r): n for r, n in sorted(m.bytes_per_rank.items())},
                    "last_swap_in": {str(r): rec for r, rec in sorted(m.records.items())}}
