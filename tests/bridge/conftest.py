"""Fixtures for bridge tests; the bench itself is in bridge_bench.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from snapshotter.bridge import FuseRemoteLayers
from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.fs.repository import Repository
from snapshotter.registry.client import RegistryClient
from tests.bridge.bridge_bench import FAST_RETRY, Bench, MakeBench
from tests.registry.fakeregistry import FakeRegistry


@pytest.fixture
async def make_bench(tmp_path: Path) -> AsyncIterator[MakeBench]:
    """Benches share the root (so a second one is "the daemon after a restart"), the
    cache, and by default the registry."""
    clients: list[RegistryClient] = []
    default_fake = FakeRegistry()
    with ChunkCache(tmp_path / "root" / "cache", max_bytes=64 << 20) as cache:

        def make(fake: FakeRegistry | None = None, **cfg: object) -> Bench:
            fake = fake or default_fake
            config = Config(root=tmp_path / "root", fetch_timeout=5.0, **cfg)  # type: ignore[arg-type]
            client = RegistryClient(
                hosts_dir=None, docker_config=tmp_path / "no-config.json",
                retry=FAST_RETRY, transport=fake.transport(),
            )
            clients.append(client)
            repo = Repository()
            bridge = FuseRemoteLayers(
                config, repository=repo, client=client, cache=cache,
                token=trio.lowlevel.current_trio_token(),
            )
            return Bench(bridge, repo, fake, config)

        try:
            yield make
        finally:
            for client in clients:
                await client.aclose()


@pytest.fixture
def bench(make_bench: MakeBench) -> Bench:
    return make_bench()
