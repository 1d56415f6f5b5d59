"""The control plane's wire format: length-prefixed JSON frames and a challenge–response handshake.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON whose
top level is an object with a string ``"type"``. JSON rather than pickle because the master
listens on a TCP port: a pickle from the network is remote code execution, a JSON object is
just data. Frames above a size limit are refused before their body is read, so a hostile or
corrupt length cannot make either side allocate gigabytes.

Authentication is mutual and binds the whole session to the token, which never crosses the
wire. Each side sends a fresh nonce; the peer proves the token over both
(``HMAC-SHA256(token, "hello" | role | master nonce | peer nonce)``); both then derive a session
key ``HMAC-SHA256(token, "session" | master nonce | peer nonce)`` and every later frame in either
direction carries ``HMAC-SHA256(key, direction | sequence number | body)`` in front of its JSON
body. The master's first such frame (the welcome) is its proof: a listener without the token
cannot make one, and one that relays a real master's handshake gets no key to add, change or
replay a single message with. Until the peer is authenticated the master reads at most
:data:`PRE_AUTH_MAX_BYTES` per frame, for at most its handshake timeout::

    master → {"type": "challenge", "version": 2, "nonce": "<hex>"}
    peer   → {"type": "hello", "role": "worker" | "ctl", "nonce": "<hex>", "auth": "<hex hmac>",
              worker only: "rank": int, "stage": int, "host": str, "pid": int}
    master → [mac] {"type": "welcome", "heartbeat_interval_s": f, "heartbeat_timeout_s": f}
             or {"type": "error", "error": "..."} (no mac) and the connection closes

After that every message gets exactly one reply (so a blocking client needs no reader thread):

    worker requests: heartbeat {step?}, report {step, window_steps, stage_times, total_steps?},
                     poll {} → {"type": "command", "command": {...} | null}, ack {id, status},
                     plan {plan, step?} (the plan the job now runs), bye {}
    ctl requests:    status {}, repartition {plan, at_step?}, resize {world_size, at_step?},
                     policy {enabled: bool}
    any reply:       {"type": "ok", ...} or {"type": "error", "error": "..."}

A repartition command (``poll``'s answer) is ``{"id": n, "type": "repartition", "plan": <plan.json>,
"at_step": N, "source": "operator" | "policy", "issued_at": unix time}``. ``at_step`` is the
earliest step at which to switch, not a rendezvous: ranks poll at different moments, so they
agree on the exact flush boundary among themselves (rank 0 polls and broadcasts the decision
over torch.distributed), then each acknowledges it (``ack``). A resize command is
``{"id": n, "type": "resize", "world_size": W, "at_step": N, …}``: the ranks checkpoint, exit,
and are restarted on W ranks by their supervisor, re-planning for W.

``stage_times`` maps a stage id (as a string, JSON keys are strings) to per-minibatch means over
the reporting window: ``{"compute_s": f, "wait_s": f, "comm_s": f}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
from typing import Any

from pipeshift.errors import PipeshiftError

PROTOCOL_VERSION = 2
HEADER = struct.Struct(">I")
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20  # a plan.json for thousands of nodes fits comfortably
PRE_AUTH_MAX_BYTES = 4096  # challenge, hello, an error before the session: a few hundred bytes each
MAC_BYTES = 32
DEFAULT_PORT = 29600  # away from torchrun's 29400 (rendezvous) and 29500 (MASTER_PORT)
TOKEN_ENV = "PIPESHIFT_TOKEN"
MASTER_ENV = "PIPESHIFT_MASTER"


class ProtocolError(PipeshiftError):
    """A frame that is too large, not UTF-8 JSON, or not a message object."""


class AuthError(PipeshiftError):
    """The peer's token does not match the master's."""


# -- frames -----------------------------------------------------------------------------
def encode(message: dict[str, Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """One frame: header + compact JSON. Refuses what the receiver would refuse anyway."""
    body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(body) > max_bytes:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {max_bytes}-byte limit")
    return HEADER.pack(len(body)) + body


def check_length(length: int, max_bytes: int) -> None:
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse a frame body; anything but a JSON object with a string ``type`` is an error."""
    try:
        message = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"frame is not UTF-8 JSON ({e})") from None
    except RecursionError:
        raise ProtocolError("frame nests JSON too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("frame is not a JSON object with a string 'type'")
    return message


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and we could not send them on.
    raise ProtocolError(f"frame contains {name}, which is not JSON")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        chunks += chunk
    return bytes(chunks)


def send_message(sock: socket.socket, message: dict[str, Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 session: Session | None = None) -> None:
    sock.sendall(session.seal(message, max_bytes) if session is not None else encode(message, max_bytes))


def recv_frame(sock: socket.socket, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    check_length(length, max_bytes)
    return _recv_exactly(sock, length)


def recv_message(sock: socket.socket, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 session: Session | None = None) -> dict[str, Any]:
    payload = recv_frame(sock, max_bytes)
    return session.open(payload) if session is not None else decode_body(payload)


# -- authentication ---------------------------------------------------------------------
def new_token() -> str:
    return secrets.token_urlsafe(24)


def new_nonce() -> str:
    return secrets.token_hex(16)


def _hmac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\0".join(parts).encode("utf-8"), hashlib.sha256).hexdigest()


def sign(token: str, master_nonce: str, peer_nonce: str = "", role: str = "") -> str:
    """The peer's proof that it holds ``token``, bound to both nonces and its role."""
    return _hmac(token.encode("utf-8"), "pipeshift-hello", role, master_nonce, peer_nonce)


def verify(token: str, master_nonce: str, answer: Any, peer_nonce: str = "", role: str = "") -> bool:
    if not isinstance(answer, str):
        return False
    expected = sign(token, master_nonce, peer_nonce, role).encode("ascii")
    return hmac.compare_digest(expected, answer.encode("utf-8", "replace"))


def valid_nonce(value: Any) -> bool:
    return isinstance(value, str) and 16 <= len(value) <= 128 and all(c in "0123456789abcdef" for c in value)


class Session:
    """The per-connection MAC: a key from the token and both nonces, and a counter per direction.

    ``outgoing``/``incoming`` are "m" (master to peer) or "p": a frame cannot be reflected back
    to its sender, replayed, dropped or reordered without the next MAC failing.
    """

    def __init__(self, token: str, master_nonce: str, peer_nonce: str, is_master: bool):
        self.key = hmac.new(token.encode("utf-8"), "\0".join(("pipeshift-session", master_nonce, peer_nonce))
                            .encode("utf-8"), hashlib.sha256).digest()
        self.outgoing, self.incoming = ("m", "p") if is_master else ("p", "m")
        self.sent = 0
        self.received = 0

    def _mac(self, direction: str, seq: int, body: bytes) -> bytes:
        return hmac.new(self.key, direction.encode() + seq.to_bytes(8, "big") + body, hashlib.sha256).digest()

    def seal(self, message: dict[str, Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
        if len(body) + MAC_BYTES > max_bytes:
            raise ProtocolError(f"message of {len(body)} bytes exceeds the {max_bytes}-byte limit")
        mac = self._mac(self.outgoing, self.sent, body)
        self.sent += 1
        return HEADER.pack(len(body) + MAC_BYTES) + mac + body

    def open(self, payload: bytes) -> dict[str, Any]:
        if len(payload) < MAC_BYTES:
            raise AuthError("frame without a message authentication code")
        mac, body = payload[:MAC_BYTES], payload[MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(self.incoming, self.received, body)):
            raise AuthError("message authentication failed (not from the authenticated peer, or altered)")
        self.received += 1
        return decode_body(body)


def read_token(token_file: str | None, flag: str = "--token-file") -> str | None:
    """The shared secret: from ``token_file`` when given, else ``$PIPESHIFT_TOKEN``, else None.

    Never from a command-line value: those are visible to every user of the machine in ``ps``.
    """
    if token_file:
        try:
            text = open(token_file, encoding="utf-8").read(4097)
        except OSError as e:
            raise PipeshiftError(f"{flag} {token_file}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PipeshiftError(f"{flag} {token_file}: not a text file") from None
        token = text.strip()
        if not token or len(text) > 4096 or any(c.isspace() for c in token):
            raise PipeshiftError(f"{flag} {token_file}: expected one line holding the token")
        return token
    return os.environ.get(TOKEN_ENV) or None


# -- addresses --------------------------------------------------------------------------
def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``:PORT`` (IPv6 hosts in brackets) → (host, port)."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise PipeshiftError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    host = host or "127.0.0.1"
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise PipeshiftError(f"bad address {text!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise PipeshiftError(f"bad address {text!r}: port out of range")
    return host, port
