"""Fixtures for converter tests: a registry client for the in-memory fake, and `convert`
that runs one conversion with a temp dir the test can inspect afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from snapshotter.convert import ConvertOptions, ConvertSummary, convert_image
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.retry import RetryPolicy
from tests.registry.fakeregistry import FakeRegistry

FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05, total_time=5.0)
Convert = Callable[..., Awaitable[ConvertSummary]]


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def client(fake: FakeRegistry, tmp_path: Path) -> AsyncIterator[RegistryClient]:
    c = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json", retry=FAST_RETRY,
                       transport=fake.transport())
    yield c
    await c.aclose()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    return d


@pytest.fixture
def convert(client: RegistryClient, scratch: Path) -> Convert:
    async def run(src: str, dst: str, **opts: object) -> ConvertSummary:
        opts.setdefault("tmp_dir", scratch)
        opts.setdefault("compression_level", 1)
        return await convert_image(src, dst, client=client,
                                   options=ConvertOptions(**opts))  # type: ignore[arg-type]

    return run
