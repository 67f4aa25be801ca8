"""Fakes for remote/: a blob source with scripted faults, and a fresh chunk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from snapshotter.cache.chunks import ChunkCache


class FakeSource:
    """`fetch_range` over in-memory blob bytes, counting calls, with faults as data.

    `script` lists what each next call does: "ok", "hang" (never answers), "corrupt"
    (one byte flipped in the middle), "short" (one byte missing), or an exception to
    raise; once it runs out, calls answer "ok". While `gate` is set to an unset Event,
    calls wait for it first.
    """

    def __init__(self, blob: bytes, script: list[object] | None = None) -> None:
        self.blob = blob
        self.script = list(script or [])
        self.calls: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None

    @property
    def bytes_served(self) -> int:
        return sum(end - start for start, end in self.calls)

    async def __call__(self, start: int, end: int) -> bytes:
        assert 0 <= start <= end <= len(self.blob), (start, end)
        self.calls.append((start, end))
        action = self.script.pop(0) if self.script else "ok"
        if self.gate is not None:
            await self.gate.wait()
        data = self.blob[start:end]
        if action == "ok":
            return data
        if action == "hang":
            await trio.sleep_forever()
        if action == "corrupt":
            mid = len(data) // 2
            return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        if action == "short":
            return data[:-1]
        assert isinstance(action, BaseException), action
        raise action


@pytest.fixture
def cache(tmp_path: Path):
    with ChunkCache(tmp_path / "cache", max_bytes=64 << 20) as c:
        yield c


@pytest.fixture
def fake_source() -> type[FakeSource]:
    return FakeSource
