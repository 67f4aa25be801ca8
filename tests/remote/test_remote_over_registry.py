"""remote/ over the real RegistryClient and the in-memory fake registry: the contract
between `fetch_range` and `read_blob_range` (end exclusive, errors as categories)."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import pytest
from remote_fakes import CHUNK, FILES, layer_tar

from snapshotter.digest import Digest
from snapshotter.errors import NotFound, Unavailable
from snapshotter.format.build import build_estargz
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.registry.retry import RetryPolicy
from snapshotter.remote.layer import open_layer
from tests.registry.fakeregistry import FakeRegistry

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, total_time=5.0)
REF = Reference.parse("registry.test/app:v1")


@pytest.fixture
async def served(tmp_path: Path):
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(layer_tar(FILES)), out, chunk_size=CHUNK)
    fake = FakeRegistry()
    digest = Digest.parse(fake.add_blob(out.getvalue()))
    client = RegistryClient(
        hosts_dir=None,
        docker_config=tmp_path / "no-docker-config.json",
        retry=FAST_RETRY,
        transport=fake.transport(),
    )
    yield fake, client, digest, result.toc_digest
    await client.aclose()


async def _open(client, digest, toc_digest, cache):  # type: ignore[no-untyped-def]
    size = await client.blob_size(REF, digest)
    fetch = partial(client.read_blob_range, REF, digest)
    return await open_layer(
        fetch, cache, blob_size=size, toc_digest=toc_digest, max_toc_size=1 << 20, name="layer x"
    )


async def test_layer_served_through_the_registry_client(served, cache) -> None:
    fake, client, digest, toc_digest = served
    layer = await _open(client, digest, toc_digest, cache)
    for entry in layer.toc.entries:
        if entry.type == "reg":
            assert b"".join(await layer.blob.read_chunks(entry.chunks)) == FILES[entry.name]
    ranges = [s.headers.get("range") for s in fake.seen if s.method == "GET"]
    assert all(r and r.startswith("bytes=") for r in ranges)


async def test_registry_hiccups_are_retried_below_us(served, cache) -> None:
    fake, client, digest, toc_digest = served
    layer = await _open(client, digest, toc_digest, cache)
    big = layer.toc.by_name()["usr/lib/big.bin"]
    fake.script(f"/v2/app/blobs/{digest}", [503, "ignore-range"])
    assert b"".join(await layer.blob.read_chunks(big.chunks)) == FILES["usr/lib/big.bin"]


@pytest.mark.allow_log_errors
async def test_registry_down_is_unavailable_and_recovers(served, cache) -> None:
    fake, client, digest, toc_digest = served
    layer = await _open(client, digest, toc_digest, cache)
    hello = layer.toc.by_name()["etc/hello.txt"]
    fake.script(f"/v2/app/blobs/{digest}", [503] * 10)
    with pytest.raises(Unavailable):
        await layer.blob.read_chunk(hello.chunks[0])
    fake._scripts.clear()
    assert await layer.blob.read_chunk(hello.chunks[0]) == FILES["etc/hello.txt"]


async def test_missing_blob_is_not_found(served, cache) -> None:
    _, client, _, toc_digest = served
    with pytest.raises(NotFound):
        await _open(client, Digest.of(b"not pushed"), toc_digest, cache)
