"""Every rank names the rank that failed first, not the neighbour it saw go."""

from __future__ import annotations

import threading
import time

import pytest

from pipeshift.runtime import failure


class FakeStore:
    """The c10d store calls failure.py makes, over a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set_timeout(self, _t) -> None:
        pass

    def set(self, key: str, value: str) -> None:
        with self.lock:
            self.data[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        with self.lock:
            return all(k in self.data for k in keys)

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.data[key]


@pytest.fixture
def store(monkeypatch) -> FakeStore:
    s = FakeStore()
    monkeypatch.setattr(failure, "_store", lambda: s)
    monkeypatch.setattr(failure, "PEER_GRACE_S", 0.3)
    return s


def test_a_silent_rank_is_named_by_the_rank_two_hops_away(store) -> None:
    """Rank 2 hangs; rank 1 times out on it a little after rank 0 timed out on rank 1."""
    said: dict[int, str] = {}
    r0 = threading.Thread(target=lambda: said.__setitem__(0, failure.explain(
        0, "rank 0 (stage 0): no answer within 1 s ... from rank 1 (stage 1)", witness=True, peer=1, silent=True,
        timeout_s=1.0)))
    r0.start()
    time.sleep(0.4)
    said[1] = failure.explain(1, "rank 1 (stage 1): no answer within 1 s ... from rank 2 (stage 2)", witness=True,
                              peer=2, silent=True, timeout_s=1.0)
    r0.join(10)
    assert said[1].startswith("rank 1 (stage 1): no answer")  # it saw rank 2 itself
    assert said[0].startswith("rank 2 failed first (rank 1 (stage 1): no answer within 1 s ... from rank 2")
    assert said[0].endswith("here: rank 0 (stage 0): no answer within 1 s ... from rank 1 (stage 1)")


def test_a_rank_that_exits_with_its_own_error_is_named_by_every_witness(store) -> None:
    assert failure.explain(2, "rank 2: the loss is nan at step 7", witness=False) == "rank 2: the loss is nan at step 7"
    # rank 1 writes its account before it exits, so rank 0 sees rank 1 go only after that
    near = failure.explain(1, "rank 1: peer exited (connection closed) ... rank 2", witness=True, peer=2, timeout_s=1)
    far = failure.explain(0, "rank 0: peer exited (connection closed) ... rank 1", witness=True, peer=1, timeout_s=1)
    assert near == "rank 2 failed first (rank 2: the loss is nan at step 7); here: rank 1: peer exited (connection closed) ... rank 2"
    assert far.startswith("rank 2 failed first (rank 2: the loss is nan at step 7)")


def test_a_killed_neighbour_is_named_by_the_message_itself(store) -> None:
    message = "rank 0: peer exited (connection closed) ... from rank 1 (stage 1)"
    assert failure.explain(0, message, witness=True, peer=1, timeout_s=1) == message


def test_without_a_store_each_rank_says_what_it_saw(monkeypatch) -> None:
    monkeypatch.setattr(failure, "_store", lambda: None)
    assert failure.explain(0, "as seen", witness=True, peer=1) == "as seen"
