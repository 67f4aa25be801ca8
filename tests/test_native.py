"""Native materialisation of complete layers: when, what it checks, budget, and removal.

The "mount" here is a plain directory standing in for the layer's FUSE view; the real
view is exercised in tests/e2e/test_profiles.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.format.toc import Entry, Toc
from snapshotter.labels import LayerSource
from snapshotter.native import NativeLayers
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.prefetch import plan_whole_layer, prefetch
from tests.remote.remote_fakes import FakeSource, layout, pieces

LAYER = str(Digest.of(b"native layer"))
SOURCE = LayerSource(image_ref="r.test/app:1", layer_digest=LAYER)


@pytest.fixture
def layer(tmp_path: Path):
    parts = pieces(3, size=3000)
    data, chunks = layout([[p] for p in parts])
    entries = [Entry("", "dir", mode=0o755), Entry("lib", "dir", mode=0o755)]
    entries += [Entry(f"lib/f{i}", "reg", mode=0o644, size=c.size, chunks=(c,),
                      digest=str(Digest.of(parts[i]))) for i, c in enumerate(chunks)]
    toc = Toc(entries=tuple(entries), toc_offset=len(data), blob_size=len(data) + 100)
    view = tmp_path / "repo" / "7"
    (view / "lib").mkdir(parents=True)
    for i, part in enumerate(parts):
        (view / "lib" / f"f{i}").write_bytes(part)
    with ChunkCache(tmp_path / "cache", max_bytes=1 << 20) as cache:
        blob = RemoteBlob(FakeSource(data), cache, blob_size=len(data))
        yield tmp_path, cache, toc, blob, view


async def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_a_layer_goes_native_once_complete_and_back_when_released(layer) -> None:
    root, cache, toc, blob, view = layer
    native = NativeLayers(root, cache, root / "repo", interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(native.run)
        native.attached("7", SOURCE, toc, blob)
        await trio.sleep(0.1)
        assert native.lowerdir(LAYER) is None  # nothing fetched yet
        await prefetch(blob, plan_whole_layer(toc))
        await _until(lambda: native.lowerdir(LAYER) is not None)
        path = Path(native.lowerdir(LAYER) or "")
        assert (path / "lib" / "f1").read_bytes() == (view / "lib" / "f1").read_bytes()
        assert cache.max_bytes == (1 << 20) - 9000  # the native bytes come off the budget
        assert native.status(LAYER)["native_in_use"]
        native.released(LAYER)
        assert not path.exists()
        assert cache.max_bytes == 1 << 20
        assert native.lowerdir(LAYER) is None
        nursery.cancel_scope.cancel()


@pytest.mark.allow_log_errors
async def test_a_copy_that_does_not_match_the_toc_is_not_used(layer) -> None:
    root, cache, toc, blob, view = layer
    (view / "lib" / "f2").write_bytes(b"tampered")
    await prefetch(blob, plan_whole_layer(toc))
    native = NativeLayers(root, cache, root / "repo", interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(native.run)
        native.attached("7", SOURCE, toc, blob)
        await trio.sleep(0.5)
        assert native.lowerdir(LAYER) is None
        assert not native.path(LAYER).exists()
        assert not any(p.name.endswith(".tmp") for p in (root / "native").iterdir())
        assert cache.max_bytes == 1 << 20
        nursery.cancel_scope.cancel()


async def test_a_layer_over_the_native_share_stays_lazy(layer) -> None:
    root, cache, toc, blob, _ = layer
    await prefetch(blob, plan_whole_layer(toc))
    cache.max_bytes = 10_000  # half of it cannot hold 9000 bytes
    native = NativeLayers(root, cache, root / "repo", interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(native.run)
        native.attached("7", SOURCE, toc, blob)
        await trio.sleep(0.3)
        assert native.lowerdir(LAYER) is None
        nursery.cancel_scope.cancel()


async def test_a_directory_from_an_earlier_run_is_kept_as_in_use(layer) -> None:
    root, cache, toc, blob, _ = layer
    native = NativeLayers(root, cache, root / "repo")
    os.makedirs(native.path(LAYER) / "lib")
    native.attached("7", SOURCE, toc, blob)
    assert native.lowerdir(LAYER) == str(native.path(LAYER))
    assert cache.max_bytes == (1 << 20) - 9000
    native.released(LAYER)
    assert not native.path(LAYER).exists()


async def test_after_the_restore_directories_of_unused_layers_go(layer) -> None:
    """Snapshots removed while the daemon was down leave native directories (and maybe a
    half-made copy) nobody can use: once the restore says which layers are in use, they
    are removed; those of used layers, and anything not named like a layer's, stay."""
    root, cache, _toc, _blob, _ = layer
    native = NativeLayers(root, cache, root / "repo")
    used, gone = LAYER, "sha256:" + "e" * 64
    for path in (native.path(used), native.path(gone), Path(f"{native.path(gone)}.tmp"),
                 native.directory / "lost+found"):  # fmt: skip
        os.makedirs(path / "lib")
    async with trio.open_nursery() as nursery:
        await nursery.start(native.run)
        native.restored(frozenset({used}))
        await _until(lambda: not native.path(gone).exists()
                     and not Path(f"{native.path(gone)}.tmp").exists())  # fmt: skip
        nursery.cancel_scope.cancel()
    assert sorted(p.name for p in native.directory.iterdir()) == [
        "lost+found", native.path(used).name]
