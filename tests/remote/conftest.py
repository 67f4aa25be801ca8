"""Fixtures for remote/: a fresh chunk cache and the fake blob source."""

from __future__ import annotations

from pathlib import Path

import pytest
from remote_fakes import FakeSource

from snapshotter.cache.chunks import ChunkCache


@pytest.fixture
def cache(tmp_path: Path):
    with ChunkCache(tmp_path / "cache", max_bytes=64 << 20) as c:
        yield c


@pytest.fixture
def fake_source() -> type[FakeSource]:
    return FakeSource
