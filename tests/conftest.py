"""Shared fixtures. PipeDream's published profiles live in ../shared beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO

PROFILES = REPO.parent / "shared" / "pipedream-profiles"


@pytest.fixture(scope="session")
def profiles_dir() -> Path:
    if not PROFILES.is_dir():
        pytest.fail(f"PipeDream profiles not found at {PROFILES} (expected ../shared beside the checkout)")
    return PROFILES


_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_IFNAME_AT_START = {k: os.environ.get(k) for k in _IFNAME_VARS}


@pytest.fixture(autouse=True)
def _interface_choice_does_not_leak():
    """A process group started in-process sets *_SOCKET_IFNAME in os.environ (the interface choice).

    Later tests' subprocesses would inherit it as if the user had set it, and ranks in network
    namespaces would then bind loopback; every test starts from the session's own values.
    """
    for k, v in _IFNAME_AT_START.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    yield
