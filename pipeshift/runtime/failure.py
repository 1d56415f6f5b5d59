"""The first failure of a job, told to every rank: each names the rank that failed, not its neighbour.

When rank 2 dies, rank 1 sees its connection close and stops; rank 0 then sees *rank 1* go away,
and on its own would blame rank 1. So the first rank to fail writes what it saw into the
process group's key-value store (the rendezvous store every rank already holds), first writer
wins; every rank's final message then leads with that first failure. A rank that only saw a
peer go away waits a moment before writing, so the rank next to the failure — which sees it
first — is the one whose account is kept. If the store itself is gone (it lives with rank 0, or
torchrun's agent) each rank says what it saw, as before.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

PREFIX = "pipeshift/failure/"  # one record per rank that failed: what it saw
PEER_GRACE_S = 2.0  # how long a record of a peer that exited, or of a rank further along, may take
STORE_TIMEOUT_S = 3.0


def _store() -> Any | None:
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
        return store
    except Exception:  # no group, or a store that is already gone: nothing to share
        return None


def _read(store: Any, rank: int, wait_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([f"{PREFIX}{rank}"]):
                record = json.loads(store.get(f"{PREFIX}{rank}").decode())
                return record if isinstance(record, dict) else None
        except Exception:  # the store went away with its host: nothing more to learn
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def explain(rank: int, message: str, *, witness: bool, peer: int | None = None, silent: bool = False,
            timeout_s: float = 60.0) -> str:
    """This rank's final message, led by the job's original failure when that was another rank's.

    ``witness``: this rank only saw ``peer`` fail (exited, or ``silent``: no answer within the
    timeout); otherwise the error is its own. A silent peer may itself be waiting for a rank
    further along, so its account is awaited up to ``timeout_s``; the chain of accounts is
    followed to the rank that left none (it died or hangs) or whose error was its own.
    """
    store = _store()
    if store is None:
        return message
    try:
        store.set(f"{PREFIX}{rank}", json.dumps({"rank": rank, "peer": peer, "witness": witness, "silent": silent,
                                                 "message": message}))
    except Exception:
        return message
    if not witness or peer is None:
        return message
    culprit, evidence, seen = peer, None, {rank}
    wait = timeout_s + PEER_GRACE_S if silent else PEER_GRACE_S
    while culprit not in seen:
        record = _read(store, culprit, wait)
        if record is None:
            break  # it left no account: it is the one that failed
        if not record.get("witness"):
            evidence = record.get("message")
            break  # its own error
        seen.add(culprit)
        if not isinstance(record.get("peer"), int):
            evidence = None
            break
        evidence, culprit = record.get("message"), int(record["peer"])
        wait = PEER_GRACE_S
    if culprit == peer and evidence is None:
        return message  # the peer this rank saw is the one: its own message names it
    if culprit == rank:
        return message
    return f"rank {culprit} failed first ({evidence}); here: {message}"
