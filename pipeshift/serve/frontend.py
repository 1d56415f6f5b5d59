"""The front end's engine: admission, batching, batches in flight, answers, liveness, switches.

Threads, each with one job (the HTTP server runs in a thread of its own, see :mod:`.http`):

* **dispatcher** (the caller of :meth:`Frontend.run`): waits for a free in-flight slot, takes
  the oldest request, gathers compatible ones (same per-sample shapes and dtypes — no padding)
  until ``max_batch`` samples or ``max_delay_s`` after the first, concatenates them, tells every
  rank of the batch's route about it and sends the raw inputs. Up to ``inflight`` batches are
  in flight, so every stage works at once; while every stage has one, a short batch waits to
  fill (``partial_below``) rather than follow them half empty. Between batches it carries out
  repartitions: it stops taking requests (they wait in the queue), lets the in-flight batches
  finish, sends the plan to every rank and waits for its own stage's switch.
* **collector**: takes the batches in dispatch order, receives their outputs from the stages
  that make them, cuts them back into requests and answers each.
* **pinger**: pings every rank every ``ping_interval_s``; a rank's pong (with its counters) is
  what ``/ready`` and the per-stage metrics report.

Admission is a bounded queue: a full queue answers 503 at once. Every request is answered
exactly once (:meth:`Request.finish` ignores later answers): by the collector, by the HTTP
handler's timeout (504), by the dispatcher for a request whose deadline passed while queued,
or by :meth:`Frontend.fail` — a dead or silent rank, after which everything waiting gets 503
and the process exits non-zero.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeshift.errors import PipeshiftError
from pipeshift.plan import Plan
from pipeshift.serve import wire
from pipeshift.serve.routing import FRONTEND, Routing
from pipeshift.serve.worker import StageWorker, first_line

READY_WINDOW_S = 5.0
PARTIAL_POLL_S = 0.0005  # how often a batch waiting to fill checks whether a stage fell idle


@dataclasses.dataclass
class Outcome:
    status: int
    outputs: list[torch.Tensor] | None = None
    reason: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


class Request:
    """One HTTP request's samples and its single answer."""

    def __init__(self, inputs: Sequence[torch.Tensor], timeout_s: float, on_done: Callable[[Outcome], None]):
        self.inputs = list(inputs)
        self.n = int(self.inputs[0].shape[0]) if self.inputs else 0
        self.signature = tuple((t.dtype, tuple(t.shape[1:])) for t in self.inputs)
        self.arrived = time.monotonic()
        self.deadline = self.arrived + timeout_s
        self._on_done = on_done
        self._lock = threading.Lock()
        self.outcome: Outcome | None = None

    def finish(self, outcome: Outcome) -> bool:
        """Answer, once; later answers are ignored (returns whether this one counted)."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome = outcome
        self._on_done(outcome)
        return True


@dataclasses.dataclass
class Batch:
    id: int
    requests: list[Request]
    routing: Routing
    started: float


@dataclasses.dataclass
class Config:
    max_batch: int = 8
    max_delay_s: float = 0.005
    queue_size: int = 64
    inflight: int = 4
    # A batch short of max_batch goes out only while fewer than this many are in flight (a stage is
    # idle); past that it keeps filling until it is full or a batch comes back. 0: no such wait.
    partial_below: int = 0
    timeout_s: float = 30.0  # peers
    ping_interval_s: float = 1.0
    exit_grace_s: float = 1.0


def default_inflight(stage_ranks: int) -> tuple[int, int]:
    """``(inflight, partial_below)`` when ``--inflight`` is not given: one batch per stage rank and one more.

    One batch per stage rank keeps every stage busy, but with exactly that many a stage that
    finishes waits for the answer's round trip (collector, slot, dispatcher) before its next
    batch; one more hides it. A spare slot alone would let the batcher send a batch as soon as
    ``--max-delay-ms`` passed, half full, and small batches cost more per sample — so a batch
    short of ``--max-batch`` goes out only while a stage rank has nothing (fewer than
    ``stage_ranks`` in flight), and otherwise waits to fill. ``benchmarks/bench_serve.py``
    compares it with plain slots (``--inflight 2``).
    """
    return stage_ranks + 1, stage_ranks


class Frontend:
    """The serving engine on the front end's rank (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, worker: StageWorker, mailbox: wire.Mailbox, config: Config,
                 metrics: Any = None, who: Callable[[int], str] | None = None):
        self.rank = rank
        self.world_size = world_size
        self.worker = worker
        self.routing = worker.routing
        self.config = config
        self.metrics = metrics
        self.who = who or (lambda r: f"rank {r}")
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=config.queue_size)
        self._held: collections.deque[Request] = collections.deque()
        self._slots = threading.Semaphore(config.inflight)
        self._inflight: dict[int, Batch] = {}
        self._inflight_lock = threading.Lock()
        self._collect: queue.Queue[Batch | None] = queue.Queue()
        self._ctrl_lock = threading.Lock()  # one control message at a time (header and payload adjacent)
        self._switching = threading.Lock()  # held during a switch: no pings meanwhile
        self._links = {name: wire.Link(rank, mailbox, config.timeout_s, self.who)
                       for name in ("dispatch", "collect", "ping")}
        self._next_batch = 0
        self.batches_done = 0
        self.accepting = True
        self.dead: str | None = None
        self.stopping = False
        self.last_seen: dict[int, float] = {}
        self.rank_info: dict[int, dict[str, Any]] = {}
        self.switch_requests: queue.Queue[tuple[Plan, str, Callable[[str | None], None] | None]] = \
            queue.Queue()
        self.forced: list[tuple[int, dict[str, Any], str]] = []  # (after batches, plan, source)
        self.switch_log: list[dict[str, Any]] = []
        self.policy: Any = None  # a serve.policy.ServePolicy with --policy auto
        self._threads: list[threading.Thread] = []

    # -- admission ----------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        if self.dead is not None:
            req.finish(Outcome(503, reason=f"the pipeline is down: {self.dead}", headers={"Retry-After": "5"}))
            return
        if not self.accepting:
            req.finish(Outcome(503, reason="the server is shutting down", headers={"Retry-After": "5"}))
            return
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            req.finish(Outcome(503, reason=f"the admission queue is full ({self.config.queue_size} requests)",
                               headers={"Retry-After": "1"}))

    @property
    def ready(self) -> bool:
        if self.dead is not None or self.stopping:
            return False
        now = time.monotonic()
        return all(now - self.last_seen.get(r, -1e9) <= READY_WINDOW_S for r in range(self.world_size))

    def queue_depth(self) -> int:
        return self.queue.qsize() + len(self._held)

    def inflight_batches(self) -> int:
        with self._inflight_lock:
            return len(self._inflight)

    # -- threads ------------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("collector", self._collector), ("pinger", self._pinger),
                             ("stage", self._local_stage)):
            t = threading.Thread(target=self._guard(target), name=f"pipeshift-serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except PipeshiftError as e:
                self.fail(str(e))
            except Exception as e:  # a pipeshift bug: still answer everyone and exit
                import traceback

                traceback.print_exc()
                self.fail(f"internal error in {threading.current_thread().name}: {first_line(e)}")
        return run

    def _local_stage(self) -> None:
        self.worker.run()

    def run(self) -> None:
        """The dispatcher loop (call from the main thread); returns after :meth:`stop`."""
        self._guard(self._dispatch_loop)()

    # -- dispatching ----------------------------------------------------------------------------

    def _take(self, timeout: float) -> Request | None:
        if self._held:
            return self._held.popleft()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _dispatch_loop(self) -> None:
        cfg = self.config
        while not self.stopping and self.dead is None:
            self._maybe_switch()
            if not self._slots.acquire(timeout=0.05):
                continue
            first = self._take(0.05)
            while first is not None and self._expired(first):
                first = self._take(0.0)
            if first is None:
                self._slots.release()
                continue
            batch, n = [first], first.n
            deferred: list[Request] = []
            for req in list(self._held):  # compatible requests held back earlier go first
                if n >= cfg.max_batch:
                    break
                if req.signature == first.signature and n + req.n <= cfg.max_batch:
                    self._held.remove(req)
                    if not self._expired(req):
                        batch.append(req)
                        n += req.n
            until = time.monotonic() + cfg.max_delay_s
            filling = False  # past the delay with the queue empty, but every stage has a batch
            while n < cfg.max_batch:
                if filling and not self._every_stage_busy():
                    break
                left = until - time.monotonic()
                try:
                    if filling:
                        req = self.queue.get(timeout=PARTIAL_POLL_S)
                    else:
                        req = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    if filling or self._every_stage_busy():
                        # fill this one up rather than queue a small one behind the others
                        filling = True
                        continue
                    break
                if self._expired(req):
                    continue
                if req.signature == first.signature and n + req.n <= cfg.max_batch:
                    batch.append(req)
                    n += req.n
                else:
                    deferred.append(req)
                    if filling:
                        break
            self._held.extend(deferred)
            self._dispatch(batch)

    def _every_stage_busy(self) -> bool:
        """Whether a short batch should wait to fill (see ``Config.partial_below``)."""
        return (self.inflight_batches() >= self.config.partial_below > 0 and not self.stopping
                and self.dead is None)

    def _expired(self, req: Request) -> bool:
        if time.monotonic() < req.deadline:
            return req.outcome is not None  # answered already (the handler's own timeout)
        req.finish(Outcome(504, reason="timed out waiting in the queue"))
        return True

    def _dispatch(self, requests: list[Request], routing: Routing | None = None, model: str = "") -> None:
        """Send one batch on its way; a server of several models names the model in the batch message."""
        b = self._next_batch
        self._next_batch += 1
        r = routing or self.routing
        inputs = [torch.cat([q.inputs[k] for q in requests]) if len(requests) > 1 else requests[0].inputs[k]
                  for k in range(len(requests[0].inputs))]
        batch = Batch(b, requests, r, time.perf_counter())
        with self._inflight_lock:
            self._inflight[b] = batch
        if self.metrics is not None:
            self.metrics.batch(sum(q.n for q in requests))
        link = self._links["dispatch"]
        with self._ctrl_lock:
            for rank in r.ranks_for(b):
                link.send(wire.Message(wire.BATCH, b, text=model), rank, wire.CTRL)
        by_name = {f"input{k}": t for k, t in enumerate(inputs)}
        for s in range(r.num_stages):
            names = r.inbound[s].get(FRONTEND)
            if names:
                link.send(wire.Message(wire.DATA, b, [by_name[n] for n in names]), r.rank_for(s, b), wire.RAW)
        self._collect.put(batch)

    # -- collecting ---------------------------------------------------------------------------------

    def _collector(self) -> None:
        link = self._links["collect"]
        while True:
            batch = self._collect.get()
            if batch is None:
                return
            r, b = batch.routing, batch.id
            got: dict[str, torch.Tensor] = {}
            skip = None
            for s in range(r.num_stages):
                if not r.returns[s]:
                    continue
                msg = link.recv(r.rank_for(s, b), wire.OUT)
                if msg.batch != b:
                    raise PipeshiftError(f"{self.who(r.rank_for(s, b))} sent the outputs of batch {msg.batch}, "
                                         f"expected batch {b}")
                if msg.kind == wire.SKIP:
                    skip = skip or msg.text
                else:
                    got.update((n, t.cpu()) for n, t in zip(r.returns[s], msg.tensors))
            if skip is not None:
                for q in batch.requests:
                    q.finish(Outcome(400, reason=f"the model rejected the inputs: {skip}"))
            else:
                outputs = [got[n] for n in r.outputs]
                counts = [q.n for q in batch.requests]
                for q, outs in zip(batch.requests, wire.split_rows(outputs, counts)):
                    q.finish(Outcome(200, outs))
            with self._inflight_lock:
                self._inflight.pop(b, None)
            self.batches_done += 1
            self._slots.release()

    # -- liveness -----------------------------------------------------------------------------

    def _pinger(self) -> None:
        link = self._links["ping"]
        seq = 0
        while not self.stopping and self.dead is None:
            with self._switching:
                if self.stopping or self.dead is not None:  # the ranks may have been told to stop meanwhile
                    return
                with self._ctrl_lock:
                    for rank in range(self.world_size):
                        link.send(wire.Message(wire.PING, seq), rank, wire.CTRL)
                for rank in range(self.world_size):
                    msg = link.recv(rank, wire.PONGS)
                    self.last_seen[rank] = time.monotonic()
                    try:
                        self.rank_info[rank] = json.loads(msg.text)
                    except ValueError:
                        raise PipeshiftError(f"{self.who(rank)} sent a garbled pong") from None
            seq += 1
            if self.metrics is not None:
                self.metrics.ranks(self.rank_info)
            if self.policy is not None:
                plan = self.policy.observe(self.rank_info, self.routing.stage_ranks, self._next_batch)
                if plan is not None:
                    self.switch_requests.put((plan, "policy", None))
            time.sleep(self.config.ping_interval_s)

    # -- switching partitions -------------------------------------------------------------------

    def _maybe_switch(self) -> None:
        while self.forced and self.forced[0][0] <= self._next_batch:
            _, plan, source = self.forced.pop(0)
            self._switch(plan, source)
        try:
            plan, source, done = self.switch_requests.get_nowait()
        except queue.Empty:
            return
        try:
            self._switch(plan, source)
        except PipeshiftError as e:
            if done is not None:
                done(str(e))
            return
        if done is not None:
            done(None)

    def _switch(self, plan: Plan, source: str) -> None:
        """Drain, then move every rank onto ``plan``; requests wait in the queue meanwhile."""
        rp = self.worker.repartitioner
        if rp is None:
            raise PipeshiftError("this server cannot repartition: start it with --allow-repartition (or "
                                 "--repartition-at) on a stage package written by `pipeshift codegen`")
        t0 = time.perf_counter()
        for _ in range(self.config.inflight):  # wait for the batches in flight to finish
            while not self._slots.acquire(timeout=0.05):
                if self.dead is not None:
                    return
        t_drained = time.perf_counter()
        text = json.dumps(plan.to_json())
        try:
            # Rendering traces the model with torch.fx, which patches torch.nn.Module globally: only
            # with no batch running. Every rank renders alike, so a plan refused here fails nowhere.
            self.worker.prepared = (text, rp.prepare(plan))
        except PipeshiftError:
            for _ in range(self.config.inflight):
                self._slots.release()
            raise
        try:
            with self._switching:
                with self._ctrl_lock:
                    for rank in range(self.world_size):
                        self._links["dispatch"].send(wire.Message(wire.SWITCH, self._next_batch, text=text), rank,
                                                     wire.CTRL)
                before = len(self.worker.switches)
                deadline = time.monotonic() + 4 * self.config.timeout_s
                while len(self.worker.switches) == before:
                    if self.dead is not None:
                        return
                    if time.monotonic() > deadline:
                        raise PipeshiftError(f"the switch to {source} did not finish within "
                                             f"{4 * self.config.timeout_s:g} s")
                    time.sleep(0.002)
                self.routing = self.worker.routing
                for rank in range(self.world_size):
                    self.last_seen[rank] = time.monotonic()
        finally:
            for _ in range(self.config.inflight):
                self._slots.release()
        pause = time.perf_counter() - t0
        if self.policy is not None:
            self.policy.adopted(plan, pause)
        record = {"after_batches": self._next_batch, "source": source, "drain_s": t_drained - t0,
                  "pause_s": pause, "queued": self.queue_depth(),
                  "stages": [list(r) for r in self.routing.stage_ranks],
                  "moved": self.worker.switches[-1].get("keys_moved_total")}
        self.switch_log.append(record)
        if self.metrics is not None:
            self.metrics.switched(record)
        print(f"pipeshift serve: repartitioned ({source}) after {record['after_batches']} batches: paused "
              f"{record['pause_s'] * 1000:.1f} ms with {record['queued']} requests queued", file=sys.stderr,
              flush=True)

    # -- the end ----------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """A rank died or went silent: answer everything with 503, flip /ready, exit non-zero."""
        if self.dead is not None:
            return
        self.dead = reason
        print(f"pipeshift serve: error: {reason}", file=sys.stderr, flush=True)
        self._answer_all(Outcome(503, reason=f"the pipeline is down: {reason}", headers={"Retry-After": "5"}))
        timer = threading.Timer(self.config.exit_grace_s, lambda: os._exit(1))
        timer.daemon = True
        timer.start()

    def _answer_all(self, outcome: Outcome) -> None:
        with self._inflight_lock:
            batches = list(self._inflight.values())
        for batch in batches:
            for q in batch.requests:
                q.finish(outcome)
        while self._held:
            self._held.popleft().finish(outcome)
        while True:
            try:
                self.queue.get_nowait().finish(outcome)
            except queue.Empty:
                break

    def stop(self) -> None:
        """Stop taking requests, finish the queued and in-flight ones, stop every rank."""
        self.accepting = False
        deadline = time.monotonic() + self.config.timeout_s
        while (self.queue_depth() or self.inflight_batches()) and time.monotonic() < deadline and not self.dead:
            time.sleep(0.01)
        self.stopping = True

    def shutdown_ranks(self) -> None:
        """Tell every rank to stop (after :meth:`run` returned)."""
        if self.dead is not None:
            return
        self._answer_all(Outcome(503, reason="the server is shutting down", headers={"Retry-After": "5"}))
        self._collect.put(None)
        with self._switching, self._ctrl_lock:  # after the pinger's round: every ping it sent is answered
            self.stopping = True
            for rank in range(self.world_size):
                self._links["dispatch"].send(wire.Message(wire.STOP), rank, wire.CTRL)
        self._links["dispatch"].flush()
