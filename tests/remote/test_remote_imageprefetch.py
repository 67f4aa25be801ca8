"""Warming the cache for whole images (`lazysnap prefetch`), directly and through the
daemon's control socket, over the real RegistryClient and the in-memory fake registry."""

from __future__ import annotations

import gzip
import io
import random
from pathlib import Path

import pytest
import trio
from remote_fakes import layer_tar

from snapshotter import control
from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.errors import InvalidArgument, NotFound
from snapshotter.format.build import build_estargz
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.retry import RetryPolicy
from snapshotter.remote.imageprefetch import (
    TOC_DIGEST_ANNOTATION,
    ImagePrefetch,
    prefetch_images,
)
from tests.registry.fakeregistry import FakeRegistry

CHUNK = 16 << 10
RNG = random.Random(5)
HOT = {"app/main.py": RNG.randbytes(40_000), "app/lib.py": RNG.randbytes(20_000)}
COLD = {f"data/{i}.bin": RNG.randbytes(30_000) for i in range(6)}
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"


def _layer(files: dict[str, bytes], prioritized: list[str] | None) -> tuple[bytes, str]:
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(layer_tar(files)), out, chunk_size=CHUNK,
                           prioritized=prioritized)
    return out.getvalue(), str(result.toc_digest)


@pytest.fixture
async def registry(tmp_path: Path):
    fake = FakeRegistry()
    landmark, toc1 = _layer({**HOT, **COLD}, ["app/main.py", "app/lib.py"])
    plain, toc2 = _layer(COLD | {"etc/x": b"x" * 5000}, None)
    legacy = gzip.compress(layer_tar({"legacy": b"not estargz"}))
    layers = []
    for data, toc in ((landmark, toc1), (plain, toc2), (legacy, "")):
        desc = {"mediaType": MEDIA, "digest": fake.add_blob(data), "size": len(data)}
        if toc:
            desc["annotations"] = {TOC_DIGEST_ANNOTATION: toc}
        layers.append(desc)
    config = fake.add_blob(b"{}")
    fake.add_manifest("app", "v1", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": layers,
    }, "application/vnd.oci.image.manifest.v1+json")
    client = RegistryClient(
        hosts_dir=None, docker_config=tmp_path / "none.json", transport=fake.transport(),
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_time=2.0),
    )
    yield fake, client, layers
    await client.aclose()


def _ranges(fake: FakeRegistry, digest: str) -> list[str]:
    return [s.headers.get("range", "") for s in fake.seen
            if s.method == "GET" and digest in str(s.url)]


async def test_startup_plan_fetches_up_to_the_landmark_only_and_is_idempotent(
    registry, cache
) -> None:
    fake, client, layers = registry
    events: list[dict] = []
    how = ImagePrefetch(client=client, cache=cache, on_event=events.append)
    summary = await prefetch_images(["registry.test/app:v1"], how)
    assert (summary.layers, summary.skipped, summary.failed_chunks) == (2, 1, 0)
    assert summary.bytes_fetched > 0 and summary.bytes_cached == 0
    # Landmark layer: the blob's end (footer and TOC, small here), then one range for
    # the prioritized files.
    assert len(_ranges(fake, layers[0]["digest"])) == 2
    # Plain layer with prefetch_size 0: only footer and TOC.
    assert len(_ranges(fake, layers[1]["digest"])) == 1
    kinds = [e["event"] for e in events]
    assert kinds.count("layer") == 2 and kinds.count("layer-done") == 2
    assert kinds.count("skip") == 1
    landmark = next(e for e in events if e["event"] == "layer" and e["reason"] == "landmark")
    assert landmark["total"] == summary.bytes_fetched

    again = await prefetch_images(["registry.test/app:v1"], how)
    assert again.bytes_fetched == 0 and again.bytes_cached == summary.bytes_fetched
    # Only footer and TOC are read again.
    assert len(_ranges(fake, layers[0]["digest"])) == 2 + 1


async def test_all_fetches_every_chunk(registry, cache) -> None:
    _, client, _ = registry
    how = ImagePrefetch(client=client, cache=cache, whole=True)
    summary = await prefetch_images(["registry.test/app:v1"], how)
    data = sum(len(v) for v in (HOT | COLD).values()) + 5000
    stats = cache.statistics()
    assert summary.layers == 2 and stats.bytes >= data - len(HOT["app/lib.py"])
    again = await prefetch_images(["registry.test/app:v1"], how)
    assert again.bytes_fetched == 0


async def test_the_cache_quota_holds(registry, tmp_path: Path) -> None:
    _, client, _ = registry
    with ChunkCache(tmp_path / "small", max_bytes=100_000) as small:
        how = ImagePrefetch(client=client, cache=small, whole=True)
        summary = await prefetch_images(["registry.test/app:v1"], how)
        assert summary.bytes_over_quota > 0
        assert small.statistics().evictions == 0
        assert small.statistics().bytes <= 100_000


async def test_unknown_image_is_not_found(registry, cache) -> None:
    _, client, _ = registry
    with pytest.raises(NotFound):
        await prefetch_images(["registry.test/app:nope"], ImagePrefetch(client=client, cache=cache))


async def test_through_the_control_socket(registry, cache, tmp_path: Path) -> None:
    _, client, _ = registry
    sock = tmp_path / "control.sock"
    handler = control.prefetch_handler(Config(root=tmp_path), client, cache)
    server = control.ControlServer(sock, {"prefetch": handler})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        events: list[dict] = []
        req = {"op": "prefetch", "images": ["registry.test/app:v1"], "all": True}
        result = await trio.to_thread.run_sync(control.request, sock, req, events.append)
        assert result["layers"] == 2 and result["bytes_fetched"] > 0
        assert any(e["event"] == "progress" for e in events)
        with pytest.raises(NotFound):
            await trio.to_thread.run_sync(
                control.request, sock, {"op": "prefetch", "images": ["registry.test/app:no"]})
        with pytest.raises(InvalidArgument):
            await trio.to_thread.run_sync(control.request, sock, {"op": "explode"})
        with pytest.raises(InvalidArgument):
            await trio.to_thread.run_sync(control.request, sock, {"op": "prefetch"})
        nursery.cancel_scope.cancel()
    assert not sock.exists()
    with pytest.raises(control.NoDaemon):
        control.request(sock, {"op": "prefetch"})


async def test_control_socket_in_a_deep_directory(registry, cache, tmp_path: Path) -> None:
    _, client, _ = registry
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = deep / "control.sock"
    handler = control.prefetch_handler(Config(root=tmp_path), client, cache)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.ControlServer(sock, {"prefetch": handler}).run)
        req = {"op": "prefetch", "images": ["registry.test/app:v1"]}
        result = await trio.to_thread.run_sync(control.request, sock, req)
        assert result["layers"] == 2
        nursery.cancel_scope.cancel()
