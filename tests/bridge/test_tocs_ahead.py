"""TOCs of an image's later layers loaded while containerd prepares the first one."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from snapshotter.bridge import FuseRemoteLayers
from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.fs.repository import Repository
from snapshotter.labels import TOC_DIGEST
from snapshotter.registry.client import RegistryClient
from snapshotter.remote import tocahead
from tests.bridge.bridge_bench import FAST_RETRY, Layer, layer_labels, push_estargz
from tests.registry.fakeregistry import FakeRegistry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _manifest(fake: FakeRegistry, layers: list[Layer]) -> None:
    """registry.test/app:v1 of `layers`, each annotated with its TOC digest."""
    config = fake.add_blob(b"{}")
    fake.add_manifest("app", "v1", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size,
                    "annotations": {TOC_DIGEST: layer.toc_digest}} for layer in layers],
    }, OCI_MANIFEST)  # fmt: skip


@contextlib.asynccontextmanager
async def _bridge(tmp_path: Path, fake: FakeRegistry) -> AsyncIterator[FuseRemoteLayers]:
    """A bridge over `fake` whose loads ahead run."""
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    try:
        with ChunkCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
            bridge = FuseRemoteLayers(
                Config(root=tmp_path / "root", fetch_timeout=5.0), repository=Repository(),
                client=client, cache=cache, token=trio.lowlevel.current_trio_token(),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(bridge.tocs_ahead.run)
                yield bridge
                nursery.cancel_scope.cancel()
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _image(tmp_path: Path) -> AsyncIterator[tuple[FakeRegistry, FuseRemoteLayers,
                                                       list[Layer]]]:
    """Two eStargz layers in registry.test/app:v1, and a bridge whose loads ahead run."""
    fake = FakeRegistry()
    layers = [push_estargz(fake, {"etc/a": b"a" * 1000}),
              push_estargz(fake, {"usr/b": b"b" * 2000, "usr/c": b"c"})]
    _manifest(fake, layers)
    async with _bridge(tmp_path, fake) as bridge:
        yield fake, bridge, layers


def _ranges(fake: FakeRegistry, layer: Layer) -> int:
    return sum(1 for s in fake.seen
               if s.method == "GET" and s.url.path.endswith(layer.digest) and "range" in s.headers)


async def _loaded_ahead(fake: FakeRegistry, layer: Layer) -> int:
    """Wait for the request for the blob's end (footer and TOC) of `layer`, unasked; how
    many were made."""
    with trio.fail_after(5):
        while _ranges(fake, layer) < 1:
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked()
    return _ranges(fake, layer)


async def _prepare(bridge: FuseRemoteLayers, key: str, layer: Layer, toc: str,
                   ref: str = "registry.test/app:v1") -> Any:
    return await trio.to_thread.run_sync(
        bridge.prepare, key, "", layer_labels(layer.digest, toc, ref=ref))


async def test_later_layers_tocs_are_loaded_ahead_and_used_by_their_prepare(tmp_path: Path) -> None:
    async with _image(tmp_path) as (fake, bridge, (first, second)):
        assert await _prepare(bridge, "k1", first, first.toc_digest) is not None
        fetched = await _loaded_ahead(fake, second)
        handle = await _prepare(bridge, "k2", second, second.toc_digest)
        assert handle is not None and json.loads(handle)["toc"] == second.toc_digest
        assert _ranges(fake, second) == fetched  # Prepare used the TOC loaded ahead


@pytest.mark.allow_log_errors
async def test_a_toc_loaded_ahead_is_used_only_for_the_digest_the_layer_names(
    tmp_path: Path,
) -> None:
    """The Prepare's label is the authority, not the manifest's annotation: a TOC loaded
    ahead (and verified against the annotation) is not served for a layer whose label
    names another TOC; that layer is then loaded as usual, here failing verification."""
    async with _image(tmp_path) as (fake, bridge, (first, second)):
        other = push_estargz(fake, {"usr/x": b"x"})
        assert await _prepare(bridge, "k1", first, first.toc_digest) is not None
        before = await _loaded_ahead(fake, second)
        # The label names another TOC: not this layer's, so it cannot be served.
        assert await _prepare(bridge, "k2", second, other.toc_digest) is None
        assert _ranges(fake, second) > before  # loaded again, for the label's digest


async def test_a_layer_shared_with_an_earlier_image_still_starts_the_loads(
    tmp_path: Path,
) -> None:
    """The first layer is attached already (another image has it), so its Prepare does
    no TOC work; the new image's other layers are loaded ahead all the same."""
    async with _image(tmp_path) as (fake, bridge, (first, second)):
        base = "registry.test/base:v1"  # no such image here: nothing to load ahead
        assert await _prepare(bridge, "b1", first, first.toc_digest, ref=base) is not None
        await trio.testing.wait_all_tasks_blocked()
        assert _ranges(fake, second) == 0
        assert await _prepare(bridge, "k1", first, first.toc_digest) is not None
        await _loaded_ahead(fake, second)


async def test_an_image_of_many_layers_loads_a_bounded_number_ahead(tmp_path: Path) -> None:
    """A manifest may list hundreds of layers: at most a bounded number of TOCs are
    loaded ahead (and held); the others are loaded by their own Prepare."""
    fake = FakeRegistry()
    layers = [push_estargz(fake, {f"f{i}": bytes([i]) * 100}) for i in range(tocahead._KEEP + 3)]
    _manifest(fake, layers)
    async with _bridge(tmp_path, fake) as bridge:
        assert await _prepare(bridge, "k0", layers[0], layers[0].toc_digest) is not None
        for layer in layers[1 : 1 + tocahead._KEEP]:
            await _loaded_ahead(fake, layer)
        await trio.sleep(0.2)
        assert [layer for layer in layers if _ranges(fake, layer)] == layers[: 1 + tocahead._KEEP]
        late = layers[-1]
        assert await _prepare(bridge, "k9", late, late.toc_digest) is not None
