"""`FuseRemoteLayers` keeping layers: one repository dir per layer digest shared by its
snapshots, repository-root paths, restore after a restart, and the kernel's view."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytest
import trio

from snapshotter import labels as L
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.errors import AlreadyExists, Unavailable
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.fs.mount import mounted, run_repository
from tests.bridge.bridge_bench import (
    FILES,
    Bench,
    MakeBench,
    layer_labels,
    push_estargz,
    registry_down,
)

# -- sharing ------------------------------------------------------------------------------


async def test_snapshots_of_one_layer_share_one_repository_dir(bench: Bench) -> None:
    layer = push_estargz(bench.fake)
    first = await bench.prepare(layer_labels(layer.digest, layer.toc_digest))
    # The same layer in another image: another reference, another chain.
    second = await bench.prepare(
        layer_labels(layer.digest, layer.toc_digest, cri=True, ref="registry.test/other:v2")
    )
    assert first is not None and second is not None
    assert bench.bridge.lowerdir(first) == bench.bridge.lowerdir(second)
    assert len(bench.repo.layer_ids()) == 1
    assert [r["snapshots"] for r in bench.bridge.status()["layers"]] == [2]

    await bench.call("release", first)
    assert len(bench.repo.layer_ids()) == 1
    await bench.call("check", second)
    await bench.call("release", second)
    assert bench.repo.layer_ids() == [] and bench.bridge.status()["layers"] == []

    third = await bench.prepare(layer_labels(layer.digest, layer.toc_digest))
    assert third is not None and json.loads(third)["dir"] != json.loads(first)["dir"]


async def test_concurrent_prepares_of_one_layer_share_it(bench: Bench) -> None:
    """Two images with a common layer pulled at once: both lazy, one dir."""
    layer = push_estargz(bench.fake)
    handles: list[str | None] = []

    async def one(ref: str) -> None:
        handles.append(await bench.prepare(layer_labels(layer.digest, layer.toc_digest, ref=ref)))

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, f"registry.test/app{i}:v1")
    assert None not in handles
    assert len({json.loads(h)["dir"] for h in handles if h}) == 1
    assert bench.bridge.status()["fallback_counts"] == {}
    assert [r["snapshots"] for r in bench.bridge.status()["layers"]] == [4]
    assert len(bench.repo.layer_ids()) == 1


# -- repository roots ---------------------------------------------------------------------


async def test_layer_found_in_a_repository_root_is_used_as_is(
    make_bench: MakeBench, tmp_path: Path
) -> None:
    roots = [tmp_path / "empty-root", tmp_path / "unpacked"]
    bench = make_bench(repository_roots=[str(r) for r in roots])
    layer = push_estargz(bench.fake)
    hexd = layer.digest.removeprefix("sha256:")
    layerfs = roots[1] / hexd[:2] / hexd / "layerfs"
    layerfs.mkdir(parents=True)
    handle = await bench.prepare(layer_labels(layer.digest, layer.toc_digest))
    assert handle is not None
    assert bench.bridge.lowerdir(handle) == str(layerfs)
    assert bench.fake.seen == [] and bench.repo.layer_ids() == []
    await bench.call("check", handle)
    [row] = bench.bridge.status()["layers"]
    assert (row["layer_digest"], row["path"]) == (layer.digest, str(layerfs))
    assert row["mode"].startswith("path")

    layerfs.rmdir()
    with pytest.raises(Unavailable):
        await bench.call("check", handle)
    await bench.call("release", handle)
    assert bench.bridge.status()["layers"] == []


# -- restart ------------------------------------------------------------------------------


async def test_restart_restores_from_the_stored_toc_without_the_registry(
    make_bench: MakeBench,
) -> None:
    before = make_bench()
    layer = push_estargz(before.fake)
    handle = await before.prepare(layer_labels(layer.digest, layer.toc_digest))
    assert handle is not None

    after = make_bench()  # same root: the daemon after a restart
    asked = len(after.fake.seen)
    await after.call("restore", handle)
    await after.call("check", handle)
    assert len(after.fake.seen) == asked, "restore went to the registry"
    assert after.repo.layer_ids() == [json.loads(handle)["dir"]]
    [row] = after.bridge.status()["layers"]
    assert (row["mode"], row["snapshots"]) == ("lazy", 1)
    # New layers get new dirs, not the restored one's.
    other = push_estargz(after.fake, {"x": b"x"})
    new = await after.prepare(layer_labels(other.digest, other.toc_digest))
    assert new is not None and json.loads(new)["dir"] != json.loads(handle)["dir"]


async def test_restart_without_a_stored_toc_fetches_it_on_first_use(
    make_bench: MakeBench, tmp_path: Path
) -> None:
    """Boot never waits for the registry: a layer whose TOC is not on disk is attached
    by `check` (containerd's first Prepare or Mounts above it), and its TOC kept then."""
    before = make_bench()
    layer = push_estargz(before.fake)
    handle = await before.prepare(layer_labels(layer.digest, layer.toc_digest))
    assert handle is not None
    for stored in (tmp_path / "root" / "tocs").iterdir():
        stored.unlink()

    broken = registry_down()
    after = make_bench(broken)
    await after.call("restore", handle)
    assert after.repo.layer_ids() == []
    [row] = after.bridge.status()["layers"]
    assert row["mode"] == "lazy (not restored)" and "first use" in row["error"]
    with pytest.raises(Unavailable):
        await after.call("check", handle)
    [row] = after.bridge.status()["layers"]
    assert row["mode"] == "lazy (not restored)" and row["error"]

    # The registry is back (a fresh client on the good registry stands in for that).
    back = make_bench()
    await back.call("restore", handle)
    await back.call("check", handle)
    assert back.repo.layer_ids() == [json.loads(handle)["dir"]]
    assert [r["error"] for r in back.bridge.status()["layers"]] == [""]
    # The TOC fetched on first use is stored: the next start needs no registry again.
    again = make_bench(registry_down())
    await again.call("restore", handle)
    assert again.repo.layer_ids() == [json.loads(handle)["dir"]]


# -- the kernel's view ---------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.root
async def test_released_snapshot_leaves_the_shared_layer_readable(bench: Bench) -> None:
    layer = push_estargz(bench.fake)
    mountpoint = bench.cfg.root / "repo"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_repository, mountpoint, bench.repo, read_timeout=5))
        try:
            first = await bench.prepare(layer_labels(layer.digest, layer.toc_digest))
            second = await bench.prepare(layer_labels(layer.digest, layer.toc_digest, cri=True))
            assert first is not None and second is not None
            top = Path(bench.bridge.lowerdir(second))
            # What core does with a lazy parent: stat its root, name it as lowerdir.
            sn = await trio.to_thread.run_sync(
                partial(Snapshotter, bench.cfg.root / "core", remote=bench.bridge)
            )
            try:
                labels = layer_labels(layer.digest, layer.toc_digest, ref="registry.test/third:v3")
                with pytest.raises(AlreadyExists):
                    await trio.to_thread.run_sync(sn.prepare, "extract-1", "", labels)
                mounts = await trio.to_thread.run_sync(
                    sn.prepare, "container", labels[L.SNAPSHOT_REF], {}
                )
                assert f"lowerdir={top}" in mounts[0].options
                await trio.to_thread.run_sync(sn.remove, "container")
                await trio.to_thread.run_sync(sn.remove, labels[L.SNAPSHOT_REF])
            finally:
                sn.close()
            await bench.call("release", first)
            big = await trio.to_thread.run_sync((top / "usr/big.bin").read_bytes)
            assert big == FILES["usr/big.bin"]
            [row] = bench.bridge.status()["layers"]
            assert row["bytes_fetched"] > 0 and row["percent_fetched"] > 0
            await bench.call("release", second)
            assert not await trio.to_thread.run_sync(top.exists)
        finally:
            nursery.cancel_scope.cancel()
    assert mounted(mountpoint) == []


async def test_restart_restores_repository_path_layers(
    make_bench: MakeBench, tmp_path: Path
) -> None:
    roots = tmp_path / "unpacked"
    before = make_bench(repository_roots=[str(roots)])
    layer = push_estargz(before.fake)
    hexd = layer.digest.removeprefix("sha256:")
    (roots / hexd[:2] / hexd / "layerfs").mkdir(parents=True)
    handle = await before.prepare(layer_labels(layer.digest, layer.toc_digest))
    assert handle is not None

    after = make_bench(repository_roots=[str(roots)])
    await after.call("restore", handle)
    assert [(r["mode"], r["snapshots"]) for r in after.bridge.status()["layers"]] == [("path", 1)]
    await after.call("release", handle)
    assert after.bridge.status()["layers"] == []


async def test_a_failed_attach_leaves_no_row_behind(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    """Something else holds the layer's dir in the repository: fall back, and forget it."""
    caplog.set_level(logging.INFO, logger="lazysnap.remote")
    squatter = push_estargz(bench.fake, {"other": b"x"})
    first = await bench.prepare(layer_labels(squatter.digest, squatter.toc_digest))
    assert first is not None and json.loads(first)["dir"] == "1"
    bench.repo.detach("1")
    bench.repo.attach("2", Toc(entries=[Entry("", "dir", mode=0o755)]), _NoChunks())
    layer = push_estargz(bench.fake)
    assert await bench.prepare(layer_labels(layer.digest, layer.toc_digest)) is None
    assert bench.bridge.status()["fallback_counts"] == {"internal-error": 1}
    assert [r["layer_digest"] for r in bench.bridge.status()["layers"]] == [squatter.digest]


class _NoChunks:
    async def read_chunk(self, chunk: Chunk) -> bytes:
        raise AssertionError(f"nothing should read {chunk}")
