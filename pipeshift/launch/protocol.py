"""The control plane's wire format: length-prefixed JSON frames and a challenge–response handshake.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON whose
top level is an object with a string ``"type"``. JSON rather than pickle because the master
listens on a TCP port: a pickle from the network is remote code execution, a JSON object is
just data. Frames above a size limit are refused before their body is read, so a hostile or
corrupt length cannot make either side allocate gigabytes.

Authentication is a shared secret that never crosses the wire: on connect the master sends a
random nonce, the peer answers with ``HMAC-SHA256(token, nonce)``, and the master checks it
with :func:`hmac.compare_digest`. The exchange, after which every message gets exactly one
reply (so a blocking client needs no reader thread)::

    master → {"type": "challenge", "version": 1, "nonce": "<hex>"}
    peer   → {"type": "hello", "role": "worker" | "ctl", "auth": "<hex hmac>",
              worker only: "rank": int, "stage": int, "host": str, "pid": int}
    master → {"type": "welcome", "heartbeat_interval_s": f, "heartbeat_timeout_s": f}
             or {"type": "error", "error": "..."} and the connection closes

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
import secrets
import socket
import struct
from typing import Any

from pipeshift.errors import PipeshiftError

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20  # a plan.json for thousands of nodes fits comfortably
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


def send_message(sock: socket.socket, message: dict[str, Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
    sock.sendall(encode(message, max_bytes))


def recv_message(sock: socket.socket, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    (length,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    check_length(length, max_bytes)
    return decode_body(_recv_exactly(sock, length))


# -- authentication ---------------------------------------------------------------------
def new_token() -> str:
    return secrets.token_urlsafe(24)


def new_nonce() -> str:
    return secrets.token_hex(16)


def sign(token: str, nonce: str) -> str:
    return hmac.new(token.encode("utf-8"), nonce.encode("utf-8"), hashlib.sha256).hexdigest()


def verify(token: str, nonce: str, answer: Any) -> bool:
    if not isinstance(answer, str):
        return False
    return hmac.compare_digest(sign(token, nonce).encode("ascii"), answer.encode("utf-8", "replace"))


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
