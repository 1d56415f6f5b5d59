"""The control-plane master: who is alive, how fast each stage runs, and which plan comes next.

Workers and operators connect over TCP (:mod:`pipeshift.launch.protocol`). Workers register,
heartbeat, report per-stage times and poll for commands; operators ask for status, queue a
repartition or switch the automatic policy on and off. The master only ever sees small JSON
messages — tensors and weights move between ranks over torch.distributed, never through here —
so it is a single asyncio loop with no locks.

Liveness is judged from the last message of any kind: a worker silent for longer than the
heartbeat timeout, or whose connection dropped without a goodbye, is reported dead. Nothing
secret is written to disk; the optional decisions log (JSON lines) records registrations,
deaths, commands and every policy decision with its numbers, never the token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from pipeshift.errors import PipeshiftError
from pipeshift.launch import protocol
from pipeshift.launch.protocol import ProtocolError
from pipeshift.plan import Plan, parse_plan
from pipeshift.runtime.policy import PolicyConfig
from pipeshift.runtime.policy_driver import PolicyDriver


MAX_RANKS = 1 << 16  # ranks, stages and world sizes: the same bound codegen puts on plans
MAX_STEP = 10 ** 9  # no job runs a billion minibatches; a larger step is a lie that would steer at_step
MAX_STAGE_ENTRIES = 1024  # stages one report may describe (a rank reports its own)
MAX_PAUSE_S = 86400.0  # a switch that paused longer than a day is not a measurement
DEFAULT_MAX_WORKERS = 1024


class MessageError(PipeshiftError):
    """A well-framed message whose fields are wrong; answered with an error, connection kept."""


def _int(message: dict[str, Any], name: str, lo: int, hi: int, required: bool = True) -> int | None:
    """An integer field within ``[lo, hi]``; booleans, floats and huge numbers are refused."""
    value = _field(message, name, int, required)
    if value is None:
        return None
    if not lo <= value <= hi:
        shown = value if abs(value) < 10 ** 12 else f"a {len(str(abs(value)))}-digit number"
        raise MessageError(f"'{name}' must be from {lo} to {hi}, got {shown}")
    return value


def _field(message: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = message.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise MessageError(f"'{name}' must be a number")
    if not isinstance(value, kind):
        raise MessageError(f"'{message.get('type')}' needs '{name}' of type {getattr(kind, '__name__', kind)}")
    return value


def _stage_times(value: Any) -> dict[int, dict[str, float]]:
    """Validate ``{"<stage>": {"compute_s": f, "wait_s": f, "comm_s": f}}``."""
    if not isinstance(value, dict) or not value:
        raise MessageError("'stage_times' must map stage ids to {compute_s, wait_s, comm_s}")
    if len(value) > MAX_STAGE_ENTRIES:
        raise MessageError(f"'stage_times' has {len(value)} entries; at most {MAX_STAGE_ENTRIES} stages")
    out: dict[int, dict[str, float]] = {}
    for key, times in value.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 6 and int(key) < MAX_RANKS):
            raise MessageError(f"stage id {str(key)[:20]!r} is not a stage number")
        stage = int(key)
        if not isinstance(times, dict) or len(times) > 8:
            raise MessageError(f"stage {stage}: times must be an object with compute_s, wait_s, comm_s")
        clean = {}
        for name, t in times.items():
            if name not in ("compute_s", "wait_s", "comm_s"):
                raise MessageError(f"stage {stage}: unknown time {str(name)[:20]!r}")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
                raise MessageError(f"stage {stage}: {name} must be a finite non-negative number")
            clean[str(name)] = float(t)
        if "compute_s" not in clean:
            raise MessageError(f"stage {stage}: 'compute_s' is required")
        out[stage] = clean
    return out


# -- what the master knows about each worker --------------------------------------------
@dataclasses.dataclass
class WorkerRecord:
    rank: int
    stage: int
    host: str
    pid: int
    registered_at: float  # wall clock
    last_seen: float  # monotonic
    connected: bool = True
    left: bool = False  # said goodbye
    step: int | None = None
    last_report: dict[str, Any] | None = None
    cursor: int = 0  # id of the last command delivered to this rank
    polled_step: int | None = None  # its step when it last polled for commands
    reported_dead: bool = False

    def state(self, now: float, timeout_s: float) -> tuple[str, str]:
        if self.left:
            return "left", "said goodbye"
        if not self.connected:
            return "dead", "connection closed"
        silent = now - self.last_seen
        if silent > timeout_s:
            return "dead", f"no heartbeat for {silent:.1f} s"
        return "alive", ""


# -- the server -------------------------------------------------------------------------
class Master:
    """The control-plane server. :meth:`serve_forever` in a CLI; :meth:`start_in_thread` in tests."""

    def __init__(
        self, token: str, host: str = "127.0.0.1", port: int = protocol.DEFAULT_PORT,
        heartbeat_timeout_s: float = 10.0, max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        handshake_timeout_s: float = 5.0, log: TextIO | None = None, policy: PolicyDriver | None = None,
        policy_enabled: bool = True, clock: Callable[[], float] = time.monotonic,
        max_workers: int = DEFAULT_MAX_WORKERS, max_connections: int = 512, max_connections_per_peer: int = 64,
        total_steps: int | None = None,
    ) -> None:
        if not token:
            raise PipeshiftError("the master needs a non-empty token")
        if heartbeat_timeout_s <= 0:
            raise PipeshiftError("the heartbeat timeout must be positive")
        self.token = token
        self.host, self.port = host, port
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_message_bytes = max_message_bytes
        self.handshake_timeout_s = handshake_timeout_s
        if not 1 <= max_workers <= MAX_RANKS:
            raise PipeshiftError(f"--max-workers must be from 1 to {MAX_RANKS}")
        self.max_workers = max_workers
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.total_steps = total_steps
        self._per_peer: dict[str, int] = {}
        self._refused_peers: set[str] = set()
        self.running_plan: Plan | None = policy.plan if policy is not None else None
        self.log_file = log
        self.policy = policy
        self.policy_enabled = policy_enabled
        self.clock = clock
        self.started = clock()
        self.workers: dict[int, WorkerRecord] = {}
        self.commands: list[dict[str, Any]] = []
        self.acks: dict[int, dict[int, str]] = {}
        self.address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()
        self._error: BaseException | None = None

    # -- running ------------------------------------------------------------------------
    async def serve_forever(self, on_listening: Callable[[tuple[str, int]], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as e:
            raise PipeshiftError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        self.address = server.sockets[0].getsockname()[:2]
        self._event("master_started", address=f"{self.address[0]}:{self.address[1]}")
        if on_listening:
            on_listening(self.address)
        self._ready.set()
        sweeper = asyncio.create_task(self._sweep())
        async with server:
            await self._stop.wait()
            server.close()
            # Close every open connection so each handler ends by itself instead of being cancelled.
            for writer in list(self._writers):
                writer.close()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=5)
        sweeper.cancel()
        self._event("master_stopped")

    def start_in_thread(self) -> tuple[str, int]:
        """Serve on a daemon thread; returns the bound address (useful with ``port=0``)."""

        def run() -> None:
            try:
                asyncio.run(self.serve_forever())
            except BaseException as e:  # surfaced to the caller of start_in_thread
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="pipeshift-master", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30) or self._error is not None:
            raise PipeshiftError(f"master failed to start: {self._error}")
        assert self.address is not None
        return self.address

    def request_stop(self) -> None:
        """Stop serving; call from the master's own event loop (e.g. a signal handler)."""
        if self._stop is not None:
            self._stop.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- logging ------------------------------------------------------------------------
    def _event(self, event: str, **fields: Any) -> None:
        self._log({"event": event, **fields})

    def _log(self, record: dict[str, Any]) -> None:
        if self.log_file is None:
            return
        line = json.dumps({"time": time.time(), **record}, default=str)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    # -- connections --------------------------------------------------------------------
    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any],
                    mac: protocol.Session | None = None) -> None:
        if mac is not None:
            writer.write(mac.seal(message, self.max_message_bytes))
        else:
            writer.write(protocol.encode(message, self.max_message_bytes))
        await writer.drain()

    async def _recv(self, reader: asyncio.StreamReader, mac: protocol.Session | None = None,
                    max_bytes: int | None = None) -> dict[str, Any]:
        (length,) = protocol.HEADER.unpack(await reader.readexactly(protocol.HEADER.size))
        protocol.check_length(length, max_bytes or self.max_message_bytes)
        payload = await reader.readexactly(length)
        return mac.open(payload) if mac is not None else protocol.decode_body(payload)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         peer: Any) -> tuple[dict[str, Any], protocol.Session] | None:
        """Challenge, hello, welcome — all small frames, all within the handshake timeout."""
        nonce = protocol.new_nonce()
        await self._send(writer, {"type": "challenge", "version": protocol.PROTOCOL_VERSION, "nonce": nonce})
        hello = await self._recv(reader, max_bytes=protocol.PRE_AUTH_MAX_BYTES)
        theirs = hello.get("nonce")
        role = hello.get("role")
        if (hello.get("type") != "hello" or not protocol.valid_nonce(theirs) or not isinstance(role, str)
                or not protocol.verify(self.token, nonce, hello.get("auth"), theirs, role)):
            self._event("auth_rejected", peer=str(peer))
            await self._send(writer, {"type": "error", "error": "authentication failed (wrong token)"})
            return None
        mac = protocol.Session(self.token, nonce, theirs, is_master=True)
        try:
            session = self._register(hello)
        except MessageError as e:
            await self._send(writer, {"type": "error", "error": str(e)})
            return None
        await self._send(writer, {
            "type": "welcome", "version": protocol.PROTOCOL_VERSION,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "heartbeat_interval_s": self.heartbeat_timeout_s / 3,
        }, mac)
        return session, mac

    def _admit(self, host: str) -> str | None:
        """Why a new connection from ``host`` is refused (too many in all, or from it), or None."""
        if len(self._writers) >= self.max_connections:
            return f"too many connections ({self.max_connections})"
        if self._per_peer.get(host, 0) >= self.max_connections_per_peer:
            return f"too many connections from {host} ({self.max_connections_per_peer})"
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        refused = self._admit(host)
        if refused is not None:
            if host not in self._refused_peers:  # log a flood once per peer, not once per connection
                self._refused_peers.add(host)
                self._event("connection_refused", peer=str(peer), reason=refused)
            writer.close()
            return
        session: dict[str, Any] | None = None
        mac: protocol.Session | None = None
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        self._per_peer[host] = self._per_peer.get(host, 0) + 1
        try:
            done = await asyncio.wait_for(self._handshake(reader, writer, peer), self.handshake_timeout_s)
            if done is None:
                return
            session, mac = done
            while True:
                message = await self._recv(reader, mac)
                try:
                    reply = self._dispatch(session, message)
                except MessageError as e:
                    reply = {"type": "error", "error": str(e)}
                except PipeshiftError as e:
                    reply = {"type": "error", "error": str(e)}
                await self._send(writer, reply, mac)
                if message.get("type") == "bye":
                    return
        except protocol.AuthError as e:  # a frame not from the authenticated peer: end the session
            self._event("mac_rejected", peer=str(peer), error=str(e))
        except ProtocolError as e:
            self._event("bad_frame", peer=str(peer), error=str(e))
            try:
                await self._send(writer, {"type": "error", "error": str(e)}, mac)
            except (ConnectionError, OSError):
                pass
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
            pass
        except Exception as e:  # a bug: keep serving everyone else, drop this connection
            print(f"pipeshift master: internal error with {peer}: {e!r}", file=sys.stderr)
            self._event("internal_error", peer=str(peer), error=repr(e))
        finally:
            if session is not None and session["role"] == "worker":
                record = self.workers.get(session["rank"])
                if record is not None and record is session["record"]:
                    record.connected = False
            self._writers.discard(writer)
            self._per_peer[host] -= 1
            if not self._per_peer[host]:
                del self._per_peer[host]
            self._handlers.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    def _register(self, hello: dict[str, Any]) -> dict[str, Any]:
        role = hello.get("role")
        if role == "ctl":
            return {"role": "ctl"}
        if role != "worker":
            raise MessageError("'role' must be 'worker' or 'ctl'")
        rank = _int(hello, "rank", 0, self.max_workers - 1)
        stage = _int(hello, "stage", 0, self.max_workers - 1)
        host = str(_field(hello, "host", str, required=False) or "?")[:255]
        pid = _int(hello, "pid", 0, 2 ** 32, required=False) or 0
        previous = self.workers.get(rank)
        record = WorkerRecord(
            rank=rank, stage=stage, host=host, pid=pid, registered_at=time.time(), last_seen=self.clock(),
            cursor=previous.cursor if previous is not None else self._last_command_id(),
            step=previous.step if previous is not None else None,
            last_report=previous.last_report if previous is not None else None,
        )
        self.workers[rank] = record
        self._event("worker_registered", rank=rank, stage=stage, host=host, pid=pid, rejoined=previous is not None)
        return {"role": "worker", "rank": rank, "record": record}

    # -- requests -----------------------------------------------------------------------
    def _dispatch(self, session: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
        kind = message["type"]
        if session["role"] == "worker":
            record: WorkerRecord = session["record"]
            record.last_seen = self.clock()
            record.connected = True
            handlers = {"heartbeat": self._on_heartbeat, "report": self._on_report, "poll": self._on_poll,
                        "ack": self._on_ack, "plan": self._on_plan, "bye": self._on_bye}
            if kind not in handlers:
                raise MessageError(f"unknown worker request {kind!r}")
            return handlers[kind](record, message)
        handlers = {"status": self._on_status, "repartition": self._on_repartition, "resize": self._on_resize,
                    "policy": self._on_policy}
        if kind not in handlers:
            raise MessageError(f"unknown ctl request {kind!r}")
        return handlers[kind](message)

    def _pending_for(self, record: WorkerRecord) -> int:
        return sum(1 for c in self.commands if c["id"] > record.cursor)

    def _step(self, message: dict[str, Any], name: str = "step", required: bool = False) -> int | None:
        """A step number within the job: at most its length, when the master knows it."""
        return _int(message, name, 0, self.total_steps if self.total_steps is not None else MAX_STEP, required)

    def _on_heartbeat(self, record: WorkerRecord, message: dict[str, Any]) -> dict[str, Any]:
        step = self._step(message)
        if step is not None:
            record.step = step
        return {"type": "ok", "commands_pending": self._pending_for(record)}

    def _on_report(self, record: WorkerRecord, message: dict[str, Any]) -> dict[str, Any]:
        total = _int(message, "total_steps", 1, MAX_STEP, required=False)
        if total is not None:
            self.total_steps = total
        step = self._step(message, required=True)
        window = _int(message, "window_steps", 0, MAX_STEP, required=False)
        times = _stage_times(message.get("stage_times"))
        if self.policy is not None and max(times) >= self.policy.policy.num_stages:
            raise MessageError(f"'stage_times' names stage {max(times)}; the job has "
                               f"{self.policy.policy.num_stages} stages")
        record.step = step
        record.last_report = {"step": step, "window_steps": window, "time": time.time(),
                              "stage_times": {str(k): v for k, v in times.items()}}
        self._log({"event": "report", "rank": record.rank, **record.last_report})
        if self.policy is not None and self.policy_enabled:
            outcome = self.policy.on_report(record.rank, step, times, total)
            if outcome is not None:
                decision, new_plan = outcome
                self._log(decision.to_json())
                if new_plan is not None:
                    self._queue_repartition(new_plan, self._switch_step(), "policy", decision=decision.window)
        return {"type": "ok", "commands_pending": self._pending_for(record)}

    def _on_poll(self, record: WorkerRecord, message: dict[str, Any]) -> dict[str, Any]:
        record.polled_step = record.step
        for command in self.commands:
            if command["id"] > record.cursor:
                record.cursor = command["id"]
                command["delivered_to"].append(record.rank)
                self._event("command_delivered", id=command["id"], rank=record.rank)
                return {"type": "command", "command": {k: v.to_json() if isinstance(v, Plan) else v
                                                       for k, v in command.items() if k != "delivered_to"}}
        return {"type": "command", "command": None}

    def _on_ack(self, record: WorkerRecord, message: dict[str, Any]) -> dict[str, Any]:
        command_id = _int(message, "id", 0, 2 ** 62)
        status = str(_field(message, "status", str))[:200]
        if not any(c["id"] == command_id for c in self.commands):
            raise MessageError(f"no command with id {command_id}")
        self.acks.setdefault(command_id, {})[record.rank] = status
        self._event("command_ack", id=command_id, rank=record.rank, status=status)
        return {"type": "ok"}

    def _on_plan(self, record: WorkerRecord, message: dict[str, Any]) -> dict[str, Any]:
        """The job runs this plan now: the policy judges it from here on, stages follow its ranks."""
        step = self._step(message)
        pause = _field(message, "pause_s", (int, float), required=False)
        if pause is not None and not 0 <= pause <= MAX_PAUSE_S:
            raise MessageError(f"'pause_s' must be from 0 to {MAX_PAUSE_S:g} seconds, got {pause!r}"[:200])
        try:
            plan = _plan(message, f"rank {record.rank}'s plan")
            stages = plan.node_lists
            if self.policy is not None and stages != self.policy.policy.stages:  # not the policy's own decision
                self.policy.adopt_plan(plan)
        except PipeshiftError as e:
            raise MessageError(f"invalid plan: {e}") from None
        self.running_plan = plan
        if pause is not None and self.policy is not None:
            self.policy.record_pause(float(pause))  # later switches must repay what this one cost
        for k, ranks in enumerate(plan.stage_ranks):
            for rank in ranks:
                if rank in self.workers:
                    self.workers[rank].stage = k
        self._event("plan_in_force", rank=record.rank, step=step, stages=stages)
        return {"type": "ok"}

    def _on_bye(self, record: WorkerRecord, message: dict[str, Any]) -> dict[str, Any]:
        record.left = True
        self._event("worker_left", rank=record.rank)
        return {"type": "ok"}

    def _on_status(self, message: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        workers = []
        for rank in sorted(self.workers):
            w = self.workers[rank]
            state, reason = w.state(now, self.heartbeat_timeout_s)
            workers.append({
                "rank": w.rank, "stage": w.stage, "host": w.host, "pid": w.pid, "state": state, "reason": reason,
                "last_seen_s": round(now - w.last_seen, 3), "step": w.step, "last_report": w.last_report,
            })
        commands = [
            {"id": c["id"], "type": c["type"], "source": c["source"], "at_step": c["at_step"],
             "stages": c["plan"].num_stages if "plan" in c else None, "world_size": c.get("world_size"),
             "delivered_to": list(c["delivered_to"]),
             "acks": {str(r): s for r, s in self.acks.get(c["id"], {}).items()}}
            for c in self.commands
        ]
        policy: dict[str, Any] = {"enabled": self.policy_enabled, "active": self.policy is not None}
        if self.policy is not None:
            policy.update(self.policy.summary())
        return {"type": "ok", "uptime_s": round(now - self.started, 3), "heartbeat_timeout_s": self.heartbeat_timeout_s,
                "workers": workers, "policy": policy, "commands": commands}

    def _on_repartition(self, message: dict[str, Any]) -> dict[str, Any]:
        at_step = self._step(message, "at_step")
        try:
            plan = _plan(message, "the operator's plan")
            if self.policy is not None:
                self.policy.check_plan(plan)
            if self.running_plan is not None:
                check_against_running(plan, self.running_plan)
        except PipeshiftError as e:
            raise MessageError(f"invalid plan: {e}") from None
        at_step = self._switch_step(at_step)  # the step the ranks will really switch after
        if self.policy is not None:
            self.policy.adopt_plan(plan)
        command = self._queue_repartition(plan, at_step, "operator")
        return {"type": "ok", "id": command["id"], "at_step": at_step}

    def _on_resize(self, message: dict[str, Any]) -> dict[str, Any]:
        world_size = _int(message, "world_size", 1, self.max_workers)
        at_step = self._next_tick(self._step(message, "at_step"))  # the tick the ranks will stop at
        command = {"id": self._last_command_id() + 1, "type": "resize", "world_size": world_size, "at_step": at_step,
                   "source": "operator", "issued_at": time.time(), "delivered_to": []}
        self.commands.append(command)
        self._event("resize_queued", id=command["id"], world_size=world_size, at_step=at_step)
        return {"type": "ok", "id": command["id"], "at_step": at_step}

    def _on_policy(self, message: dict[str, Any]) -> dict[str, Any]:
        enabled = message.get("enabled")
        if not isinstance(enabled, bool):
            raise MessageError("'policy' needs 'enabled': true or false")
        self.policy_enabled = enabled
        self._event("policy_switched", enabled=enabled)
        return {"type": "ok", "enabled": enabled, "active": self.policy is not None}

    # -- commands -----------------------------------------------------------------------
    def _next_step(self) -> int:
        """The step after the latest any live worker has reached: the earliest a switch can happen."""
        steps = [w.step for w in self.workers.values() if w.step is not None and not w.left]
        return max(steps) + 1 if steps else 0

    def _next_tick(self, requested: int | None = None) -> int:
        """The control tick at which rank 0 will take a command queued now (at ``requested`` or later).

        Rank 0 polls at its ticks (every ``window_steps`` of its reports), right after reporting:
        once it has polled at its latest step, the next chance is one window on.
        """
        lead = self.workers.get(0)
        report = (lead.last_report or {}) if lead is not None else {}
        if lead is None or lead.step is None or "step" not in report:
            return max(requested or 0, self._next_step())
        k = max(int(report.get("window_steps") or 1), 1)
        reported = int(report["step"])  # a tick; heartbeats may have moved lead.step on since
        polled = lead.polled_step is not None and lead.polled_step >= reported
        tick = max(reported + (k if polled else 0), -(-lead.step // k) * k)
        if requested is not None and requested > tick:
            tick = -(-requested // k) * k
        return tick

    def _switch_step(self, requested: int | None = None) -> int:
        """The step after which the ranks will switch to a plan queued now: the one to announce.

        A switch agreed at a tick happens at the next synchronisation point, one step later.
        """
        return self._next_tick(None if requested is None else requested - 1) + 1

    def _last_command_id(self) -> int:
        return self.commands[-1]["id"] if self.commands else 0

    def _queue_repartition(self, plan: Plan, at_step: int, source: str, **extra: Any) -> dict[str, Any]:
        command = {"id": self._last_command_id() + 1, "type": "repartition", "plan": plan, "at_step": at_step,
                   "source": source, "issued_at": time.time(), "delivered_to": []}
        self.commands.append(command)
        self._event("repartition_queued", id=command["id"], source=source, at_step=at_step,
                    stages=plan.node_lists, **extra)
        return command

    # -- liveness -----------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Log each worker's death once, when it happens (status computes liveness itself)."""
        while True:
            await asyncio.sleep(min(self.heartbeat_timeout_s / 4, 1.0))
            now = self.clock()
            for w in self.workers.values():
                state, reason = w.state(now, self.heartbeat_timeout_s)
                if state == "dead" and not w.reported_dead:
                    w.reported_dead = True
                    self._event("worker_dead", rank=w.rank, stage=w.stage, reason=reason)
                elif state == "alive":
                    w.reported_dead = False


def _plan(message: dict[str, Any], source: str) -> Plan:
    """The message's plan, checked (errors name ``source`` and the field)."""
    return parse_plan(_field(message, "plan", dict), source)


def check_against_running(plan: Plan, running: Plan) -> None:
    """A new plan may re-split the running job, not change it: same model, seed and batch size, same ranks,
    and no worker predicted beyond the job's memory limit."""
    for key in ("model", "batch_size"):
        if key in running.doc and plan.doc.get(key) != running.doc.get(key):
            what = "model spec (callable, arguments or seed)" if key == "model" else key
            raise PipeshiftError(f"its {what} differs from the running job's; a repartition only moves layers")
    memory = running.doc.get("memory")
    limit = memory.get("limit_bytes") if isinstance(memory, dict) else None
    need = plan.doc.get("memory_per_worker_bytes")
    if isinstance(limit, (int, float)) and isinstance(need, list) and need:
        worst = max((m for m in need if isinstance(m, (int, float)) and not isinstance(m, bool)), default=0)
        if worst > limit:
            raise PipeshiftError(f"it needs {worst:.3g} bytes on one worker, more than the job's memory limit "
                                 f"{limit:.3g}")
    ranks = sorted(r for st in plan.stages for r in st.ranks)
    mine = sorted(r for st in running.stages for r in st.ranks)
    if ranks != mine:
        raise PipeshiftError(f"its stages use ranks {ranks[:8]} but the job runs on ranks {mine[:8]}; "
                             "use `ctl resize` to change the number of workers")


# -- building a policy driver from files -------------------------------------------------
def load_policy_driver(plan_path: str, graph_path: str | None, config: PolicyConfig, optimizer: str,
                       total_steps: int | None) -> PolicyDriver:
    """The automatic policy for a running job: its plan.json and the profiled graph.txt."""
    from pipeshift.errors import InputFileError
    from pipeshift.graph.graphtxt import read_graph_txt
    from pipeshift.plan import read_plan
    from pipeshift.runtime.policy import chain_from_graph

    plan = read_plan(plan_path)
    path = Path(plan.source)
    if graph_path is None:
        named = plan.graph
        if named is None:
            raise InputFileError(str(path), None, "plan names no 'graph'; pass --graph")
        candidates = [path.parent / named, Path(named), path.parent / Path(named).name]
        graph_path = str(next((c for c in candidates if c.is_file()), candidates[0]))
    chain = chain_from_graph(read_graph_txt(graph_path), optimizer=optimizer)
    try:
        return PolicyDriver(plan, chain, config, total_steps)
    except PipeshiftError as e:
        raise InputFileError(str(path), None, f"does not match {graph_path}: {e}") from None
