"""Fixtures for registry tests: the in-memory fake, clients on it, and real registries.

The real-registry fixtures (`plain_registry`, `htpasswd_registry`, `token_registry`)
live in `tests/registry/fixtures.py` so other test packages can import them too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.retry import RetryPolicy
from tests.registry.fakeregistry import FakeRegistry
from tests.registry.fixtures import (  # noqa: F401  (pytest fixtures, used by name)
    htpasswd_registry,
    plain_registry,
    tls_registry,
    token_registry,
)

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, total_time=10.0)


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
async def make_client(
    fake: FakeRegistry, tmp_path: Path
) -> AsyncIterator[Callable[..., RegistryClient]]:
    clients: list[RegistryClient] = []

    def make(**kwargs: object) -> RegistryClient:
        kwargs.setdefault("hosts_dir", None)
        kwargs.setdefault("docker_config", tmp_path / "no-docker-config.json")
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("transport", fake.transport())
        client = RegistryClient(**kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()
