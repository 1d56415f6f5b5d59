"""Shared fixtures. PipeDream's published profiles live in ../shared beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO

PROFILES = REPO.parent / "shared" / "pipedream-profiles"


@pytest.fixture(scope="session")
def profiles_dir() -> Path:
    if not PROFILES.is_dir():
        pytest.fail(f"PipeDream profiles not found at {PROFILES} (expected ../shared beside the checkout)")
    return PROFILES
