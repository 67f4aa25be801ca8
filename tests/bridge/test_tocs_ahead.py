"""TOCs of an image's later layers loaded while containerd prepares the first one."""

from __future__ import annotations

import json
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
from tests.bridge.bridge_bench import FAST_RETRY, Layer, layer_labels, push_estargz
from tests.registry.fakeregistry import FakeRegistry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _image(fake: FakeRegistry, layers: list[Layer], tocs: list[str]) -> None:
    config = fake.add_blob(b"{}")
    fake.add_manifest("app", "v1", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size,
                    "annotations": {TOC_DIGEST: toc}}
                   for layer, toc in zip(layers, tocs, strict=True)],
    }, OCI_MANIFEST)  # fmt: skip


def _ranges(fake: FakeRegistry, layer: Layer) -> int:
    return sum(1 for s in fake.seen
               if s.method == "GET" and s.url.path.endswith(layer.digest) and "range" in s.headers)


async def _prepare(bridge: FuseRemoteLayers, key: str, layer: Layer, toc: str) -> Any:
    return await trio.to_thread.run_sync(
        bridge.prepare, key, "", layer_labels(layer.digest, toc))


async def test_later_layers_tocs_are_loaded_ahead_and_used_by_their_prepare(tmp_path: Path) -> None:
    fake = FakeRegistry()
    first = push_estargz(fake, {"etc/a": b"a" * 1000})
    second = push_estargz(fake, {"usr/b": b"b" * 2000, "usr/c": b"c"})
    _image(fake, [first, second], [first.toc_digest, second.toc_digest])
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    with ChunkCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        bridge = FuseRemoteLayers(
            Config(root=tmp_path / "root", fetch_timeout=5.0), repository=Repository(),
            client=client, cache=cache, token=trio.lowlevel.current_trio_token(),
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(bridge.tocs_ahead.run)
                assert await _prepare(bridge, "k1", first, first.toc_digest) is not None
                with trio.fail_after(5):  # footer and TOC of the second layer, unasked
                    while _ranges(fake, second) < 2:
                        await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                fetched = _ranges(fake, second)
                handle = await _prepare(bridge, "k2", second, second.toc_digest)
                assert handle is not None and json.loads(handle)["toc"] == second.toc_digest
                assert _ranges(fake, second) == fetched  # Prepare used the TOC loaded ahead
                nursery.cancel_scope.cancel()
        finally:
            await client.aclose()


@pytest.mark.allow_log_errors
async def test_a_toc_loaded_ahead_is_used_only_for_the_digest_the_layer_names(
    tmp_path: Path,
) -> None:
    """The Prepare's label is the authority, not the manifest's annotation: a TOC loaded
    ahead (and verified against the annotation) is not served for a layer whose label
    names another TOC; that layer is then loaded as usual, here failing verification."""
    fake = FakeRegistry()
    first = push_estargz(fake, {"etc/a": b"a" * 1000})
    second = push_estargz(fake, {"usr/b": b"b" * 2000})
    other = push_estargz(fake, {"usr/x": b"x"})
    _image(fake, [first, second], [first.toc_digest, second.toc_digest])
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    with ChunkCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        bridge = FuseRemoteLayers(
            Config(root=tmp_path / "root", fetch_timeout=5.0), repository=Repository(),
            client=client, cache=cache, token=trio.lowlevel.current_trio_token(),
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(bridge.tocs_ahead.run)
                assert await _prepare(bridge, "k1", first, first.toc_digest) is not None
                with trio.fail_after(5):
                    while _ranges(fake, second) < 2:
                        await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked()
                before = _ranges(fake, second)
                # The label names another TOC: not this layer's, so it cannot be served.
                assert await _prepare(bridge, "k2", second, other.toc_digest) is None
                assert _ranges(fake, second) > before  # loaded again, for the label's digest
                nursery.cancel_scope.cancel()
        finally:
            await client.aclose()


async def test_a_layer_shared_with_an_earlier_image_still_starts_the_loads(
    tmp_path: Path,
) -> None:
    """The first layer is attached already (another image has it), so its Prepare does
    no TOC work; the new image's other layers are loaded ahead all the same."""
    fake = FakeRegistry()
    first = push_estargz(fake, {"etc/a": b"a" * 1000})
    second = push_estargz(fake, {"usr/b": b"b" * 2000})
    _image(fake, [first, second], [first.toc_digest, second.toc_digest])
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    with ChunkCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        bridge = FuseRemoteLayers(
            Config(root=tmp_path / "root", fetch_timeout=5.0), repository=Repository(),
            client=client, cache=cache, token=trio.lowlevel.current_trio_token(),
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(bridge.tocs_ahead.run)
                base = layer_labels(first.digest, first.toc_digest, ref="registry.test/base:v1")
                assert await trio.to_thread.run_sync(bridge.prepare, "b1", "", base)
                await trio.testing.wait_all_tasks_blocked()  # base:v1 is no image here
                assert _ranges(fake, second) == 0
                assert await _prepare(bridge, "k1", first, first.toc_digest) is not None
                with trio.fail_after(5):
                    while _ranges(fake, second) < 2:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            await client.aclose()
