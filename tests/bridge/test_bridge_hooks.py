"""Layer hooks (profiles, native layers): what the bridge tells them and asks of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.bridge import FuseRemoteLayers
from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.format.toc import Toc
from snapshotter.fs.repository import Repository
from snapshotter.labels import LayerSource
from snapshotter.registry.client import RegistryClient
from snapshotter.remote.blob import RemoteBlob
from tests.bridge.bridge_bench import FAST_RETRY, layer_labels, push_estargz
from tests.registry.fakeregistry import FakeRegistry


class FakeHook:
    def __init__(self, native: str | None = None, broken: bool = False) -> None:
        self.native = native
        self.broken = broken
        self.preparing_: list[str] = []
        self.attached_: list[tuple[str, str, int]] = []
        self.released_: list[str] = []
        self.restored_: frozenset[str] | None = None

    def preparing(self, source: LayerSource) -> None:
        if self.broken:
            raise RuntimeError("hook bug")
        self.preparing_.append(source.layer_digest)

    def attached(self, layer_id: str, source: LayerSource, toc: Toc, blob: RemoteBlob) -> None:
        if self.broken:
            raise RuntimeError("hook bug")
        self.attached_.append((layer_id, source.layer_digest, len(toc)))

    def lowerdir(self, digest: str) -> str | None:
        return self.native

    def released(self, digest: str) -> None:
        self.released_.append(digest)

    def restored(self, in_use: frozenset[str]) -> None:
        self.restored_ = in_use

    def status(self, digest: str) -> dict[str, Any]:
        return {"fake": digest[:12]}


async def _bridge(tmp_path: Path, cache: ChunkCache, hooks: list[FakeHook]):  # type: ignore[no-untyped-def]
    fake = FakeRegistry()
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    bridge = FuseRemoteLayers(
        Config(root=tmp_path / "root", fetch_timeout=5.0), repository=Repository(),
        client=client, cache=cache, token=trio.lowlevel.current_trio_token(), hooks=hooks,
    )
    return fake, client, bridge


async def test_hooks_hear_of_attach_and_release_and_may_answer_the_lowerdir(tmp_path) -> None:
    with ChunkCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        quiet, native = FakeHook(), FakeHook(native="/somewhere/native")
        fake, client, bridge = await _bridge(tmp_path, cache, [quiet, native])
        try:
            layer = push_estargz(fake)
            labels = layer_labels(layer.digest, layer.toc_digest)
            one = await trio.to_thread.run_sync(bridge.prepare, "k1", "", labels)
            two = await trio.to_thread.run_sync(bridge.prepare, "k2", "", labels)
            assert one is not None and two is not None
            # told of each Prepare, and of the attach once, with the TOC (root, etc, usr
            # and two files)
            assert quiet.preparing_ == [layer.digest, layer.digest]
            assert quiet.attached_ == [(json.loads(one)["dir"], layer.digest, 5)]
            assert bridge.lowerdir(one) == "/somewhere/native"
            assert bridge.status()["layers"][0]["fake"] == layer.digest[:12]
            bridge.restore_done()  # the daemon's restore is over: the layers in use
            assert quiet.restored_ == native.restored_ == frozenset({layer.digest})
            await trio.to_thread.run_sync(bridge.release, one)
            assert quiet.released_ == []  # another snapshot still uses the layer
            await trio.to_thread.run_sync(bridge.release, two)
            assert quiet.released_ == native.released_ == [layer.digest]
        finally:
            await client.aclose()


@pytest.mark.allow_log_errors
async def test_a_failing_hook_does_not_fail_the_layer(tmp_path) -> None:
    with ChunkCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        fake, client, bridge = await _bridge(tmp_path, cache, [FakeHook(broken=True)])
        try:
            layer = push_estargz(fake)
            handle = await trio.to_thread.run_sync(
                bridge.prepare, "k1", "", layer_labels(layer.digest, layer.toc_digest))
            assert handle is not None
            assert bridge.lowerdir(handle).endswith("/repo/" + json.loads(handle)["dir"])
        finally:
            await client.aclose()
