"""Blocking clients of the master: :class:`MasterClient` for training ranks, :class:`CtlClient` for operators.

The worker side is built so the control plane can never stop training: after a successful
connect, a master that goes away turns every call into a no-op (``poll`` returns ``None``),
logged once; the client quietly tries to reconnect every ``reconnect_interval_s`` and logs once
when it is back. Only what the caller got wrong raises: a rejected token at connect time, or a
request the master refuses (bad stage times).

Typical use from a training loop (rank 0, or every rank)::

    client = connect("10.0.0.1:29600", token, rank=0, stage=0)   # MasterClient.connect
    client.start_heartbeat_thread()          # or call client.heartbeat(step) in the loop
    ...
    if step % K == 0:
        client.report(step, {0: {"compute_s": c, "wait_s": w, "comm_s": m}}, window_steps=K)
        command = client.poll()              # a runtime.control.Command: its type, plan, at_step, id
        ...
        client.ack(command["id"], "applied")
    client.close()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from pipeshift.errors import PipeshiftError
from pipeshift.launch import protocol
from pipeshift.launch.protocol import AuthError, ProtocolError
from pipeshift.plan import Plan
from pipeshift.runtime.control import Command, parse_command

log = logging.getLogger("pipeshift.master")


class MasterUnavailable(PipeshiftError):
    """The master cannot be reached, or stopped answering."""


class RequestRefused(PipeshiftError):
    """The master answered a request with an error."""


class _Connection:
    """One authenticated connection: handshake, then strictly one reply per request."""

    def __init__(self, address: str | tuple[str, int], token: str, hello: dict[str, Any], timeout_s: float,
                 max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.host, self.port = protocol.parse_address(address) if isinstance(address, str) else address
        self.where = f"{self.host}:{self.port}"
        self.max_message_bytes = max_message_bytes
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
        except socket.timeout:
            raise MasterUnavailable(f"cannot reach the master at {self.where}: timed out after {timeout_s} s") from None
        except OSError as e:
            raise MasterUnavailable(f"cannot reach the master at {self.where}: {e.strerror or e}") from None
        self.session: protocol.Session | None = None
        try:
            challenge = protocol.recv_message(self.sock, protocol.PRE_AUTH_MAX_BYTES)
            if challenge.get("type") != "challenge" or not protocol.valid_nonce(challenge.get("nonce")):
                raise MasterUnavailable(f"{self.where} is not a pipeshift master (no challenge)")
            if challenge.get("version") != protocol.PROTOCOL_VERSION:
                raise MasterUnavailable(f"the master at {self.where} speaks protocol version "
                                        f"{challenge.get('version')!r}, this pipeshift {protocol.PROTOCOL_VERSION}")
            mine = protocol.new_nonce()
            role = str(hello.get("role", ""))
            protocol.send_message(self.sock, {**hello, "type": "hello", "nonce": mine,
                                              "auth": protocol.sign(token, challenge["nonce"], mine, role)})
            session = protocol.Session(token, challenge["nonce"], mine, is_master=False)
            payload = protocol.recv_frame(self.sock, protocol.PRE_AUTH_MAX_BYTES)  # nobody is proven yet
            try:
                welcome = session.open(payload)
            except AuthError:
                welcome = self._refusal(payload)  # an unauthenticated error, or a master without the token
        except (OSError, ProtocolError) as e:
            self.close()
            raise MasterUnavailable(f"handshake with the master at {self.where} failed: {e}") from None
        except MasterUnavailable:
            self.close()
            raise
        if welcome.get("type") != "welcome":
            self.close()
            raise RequestRefused(f"the master at {self.where} refused to register us: {welcome.get('error')}")
        self.session = session
        self.welcome = welcome

    def _refusal(self, payload: bytes) -> dict[str, Any]:
        """A frame without a valid MAC: the master's plain error, or proof that this is no real master."""
        try:
            message = protocol.decode_body(payload)
        except ProtocolError:
            message = {}
        error = str(message.get("error", ""))[:300]
        if message.get("type") == "error" and "authentication" in error:
            self.close()
            raise AuthError(f"the master at {self.where} rejected the token (check {protocol.TOKEN_ENV} or "
                            "--token-file)")
        if message.get("type") == "error":
            return message
        self.close()
        raise AuthError(f"{self.where} did not prove that it holds the token: not our master (or a relay); "
                        "nothing was sent to it")

    def _send(self, message: dict[str, Any]) -> None:
        protocol.send_message(self.sock, message, self.max_message_bytes, self.session)

    def _recv(self) -> dict[str, Any]:
        return protocol.recv_message(self.sock, self.max_message_bytes, self.session)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return its reply; transport failures raise :class:`MasterUnavailable`."""
        try:
            self._send(message)
            reply = self._recv()
        except socket.timeout:
            raise MasterUnavailable(f"the master at {self.where} did not answer in time") from None
        except (OSError, ProtocolError, AuthError) as e:
            raise MasterUnavailable(f"lost the master at {self.where}: {e}") from None
        if reply.get("type") == "error":
            raise RequestRefused(f"the master refused {message.get('type')!r}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class MasterClient:
    """A training rank's link to the master; see the module docstring for the guarantees."""

    def __init__(self, address: str | tuple[str, int], token: str, rank: int, stage: int, host: str | None = None,
                 timeout_s: float = 10.0, reconnect_interval_s: float = 30.0) -> None:
        self.address = address
        self.token = token
        self.hello = {"role": "worker", "rank": int(rank), "stage": int(stage),
                      "host": host or socket.gethostname(), "pid": os.getpid()}
        self.timeout_s = timeout_s
        self.reconnect_interval_s = reconnect_interval_s
        self.step: int | None = None
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._last_attempt = 0.0
        self._last_heartbeat = 0.0
        self._give_up = False
        self._closed = False
        self._heartbeat_thread: threading.Thread | None = None
        self._stop_heartbeats = threading.Event()
        self.heartbeat_interval_s = 1.0

    @classmethod
    def connect(cls, address: str | tuple[str, int], token: str, rank: int, stage: int, **kwargs: Any) -> MasterClient:
        """Connect and register; raises :class:`AuthError` or :class:`MasterUnavailable` right away."""
        client = cls(address, token, rank, stage, **kwargs)
        client._conn = client._open(client.timeout_s)
        return client

    def _open(self, timeout_s: float) -> _Connection:
        conn = _Connection(self.address, self.token, self.hello, timeout_s)
        conn.sock.settimeout(self.timeout_s)
        self.heartbeat_interval_s = float(conn.welcome.get("heartbeat_interval_s", 1.0))
        return conn

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _request(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The reply, or ``None`` while the master is away (training goes on without it)."""
        with self._lock:
            if self._closed:
                return None
            if self._conn is None and not self._reconnect():
                return None
            assert self._conn is not None
            try:
                return self._conn.request(message)
            except MasterUnavailable as e:
                self._conn.close()
                self._conn = None
                self._last_attempt = time.monotonic()
                log.warning("pipeshift: %s; training continues without the control plane", e)
                return None

    def _reconnect(self) -> bool:
        now = time.monotonic()
        if self._give_up or now - self._last_attempt < self.reconnect_interval_s:
            return False
        self._last_attempt = now
        try:
            self._conn = self._open(min(self.timeout_s, 2.0))
        except AuthError as e:
            self._give_up = True
            log.warning("pipeshift: %s; no further attempts", e)
            return False
        except PipeshiftError:
            return False
        log.warning("pipeshift: reconnected to the master at %s", self._conn.where)
        return True

    # -- the calls a training loop makes ------------------------------------------------
    def heartbeat(self, step: int | None = None, force: bool = False) -> int | None:
        """Tell the master we are alive (at most once per its heartbeat interval unless ``force``).

        Returns the number of commands waiting for us, or ``None`` if nothing was sent.
        """
        if step is not None:
            self.step = step
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.heartbeat_interval_s:
            return None
        self._last_heartbeat = now
        message: dict[str, Any] = {"type": "heartbeat"}
        if self.step is not None:
            message["step"] = self.step
        reply = self._request(message)
        return None if reply is None else int(reply.get("commands_pending", 0))

    def report(self, step: int, stage_times: dict[Any, dict[str, float]], window_steps: int | None = None,
               total_steps: int | None = None) -> int | None:
        """Per-stage means per minibatch over the last window: ``{stage: {compute_s, wait_s, comm_s}}``."""
        self.step = step
        message: dict[str, Any] = {
            "type": "report", "step": int(step),
            "stage_times": {str(k): {n: float(t) for n, t in v.items()} for k, v in stage_times.items()},
        }
        if window_steps is not None:
            message["window_steps"] = int(window_steps)
        if total_steps is not None:
            message["total_steps"] = int(total_steps)
        reply = self._request(message)
        self._last_heartbeat = time.monotonic()
        return None if reply is None else int(reply.get("commands_pending", 0))

    def poll(self) -> Command | None:
        """The next command for this rank, checked (a malformed one comes with its ``error``), or None."""
        reply = self._request({"type": "poll"})
        command = None if reply is None else reply.get("command")
        if command is None:
            return None
        return parse_command(command if isinstance(command, dict) else {"type": command})

    def ack(self, command_id: int, status: str = "applied") -> None:
        self._request({"type": "ack", "id": int(command_id), "status": status})

    def announce_plan(self, plan: Plan, step: int | None = None, pause_s: float | None = None) -> None:
        """Tell the master which plan the job runs now (after a switch or a restart), so its policy follows."""
        message: dict[str, Any] = {"type": "plan", "plan": plan.to_json()}
        if step is not None:
            message["step"] = int(step)
        if pause_s is not None:
            message["pause_s"] = float(pause_s)
        self._request(message)

    # -- heartbeats without the training loop -------------------------------------------
    def start_heartbeat_thread(self) -> None:
        """One daemon thread that heartbeats while the loop is busy in long steps or collectives."""
        if self._heartbeat_thread is not None:
            return

        def beat() -> None:
            while not self._stop_heartbeats.wait(self.heartbeat_interval_s):
                self.heartbeat(force=True)

        self._heartbeat_thread = threading.Thread(target=beat, name="pipeshift-heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def close(self) -> None:
        """Say goodbye (the master then reports us as left, not dead) and disconnect."""
        self._stop_heartbeats.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=self.timeout_s)
        with self._lock:
            self._closed = True
            if self._conn is not None:
                try:
                    self._conn.request({"type": "bye"})
                except PipeshiftError:
                    pass
                self._conn.close()
                self._conn = None

    def __enter__(self) -> MasterClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(address: str | tuple[str, int], token: str, rank: int, stage: int, **kwargs: Any) -> MasterClient:
    """Shorthand for :meth:`MasterClient.connect`."""
    return MasterClient.connect(address, token, rank, stage, **kwargs)


class CtlClient:
    """An operator's session: every failure raises, with a message fit for one line on stderr."""

    def __init__(self, address: str | tuple[str, int], token: str, timeout_s: float = 10.0) -> None:
        self._conn = _Connection(address, token, {"role": "ctl"}, timeout_s)
        self._conn.sock.settimeout(timeout_s)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request as it is (the master checks every field; a refusal raises ``RequestRefused``)."""
        return self._conn.request(message)

    def status(self) -> dict[str, Any]:
        return self._conn.request({"type": "status"})

    def repartition(self, plan: Plan, at_step: int | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "repartition", "plan": plan.to_json()}
        if at_step is not None:
            message["at_step"] = int(at_step)
        return self._conn.request(message)

    def policy(self, enabled: bool) -> dict[str, Any]:
        return self._conn.request({"type": "policy", "enabled": bool(enabled)})

    def resize(self, world_size: int, at_step: int | None = None) -> dict[str, Any]:
        """Ask the job to restart on ``world_size`` ranks (planned removal or addition of workers)."""
        message: dict[str, Any] = {"type": "resize", "world_size": int(world_size)}
        if at_step is not None:
            message["at_step"] = int(at_step)
        return self._conn.request(message)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CtlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
