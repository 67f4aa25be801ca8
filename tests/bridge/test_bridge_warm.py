"""`FuseRemoteLayers` warming what it attaches: the `stargz.prefetch` label's size is
prefetched on attach, `check` (a container about to start) waits for it within
`prefetch_wait`, status shows bytes by purpose, and release stops the layer's work."""

from __future__ import annotations

import time

import trio

from snapshotter import labels as L
from tests.bridge.bridge_bench import MakeBench, layer_labels, push_estargz


def _range_gets(fake, digest: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [s.headers["range"] for s in fake.seen
            if s.method == "GET" and digest in str(s.url) and "range" in s.headers]


async def test_the_prefetch_label_is_fetched_on_attach_and_shown(make_bench: MakeBench) -> None:
    bench = make_bench(background_fetch=False)
    layer = push_estargz(bench.fake)
    labels = layer_labels(layer.digest, layer.toc_digest) | {L.STARGZ_PREFETCH: "100000"}
    handle = await bench.prepare(labels)
    assert handle is not None
    await bench.call("check", handle)  # returns once the prefetch is done
    row = bench.bridge.status()["layers"][0]
    assert row["prefetch"] == "size done" and row["bytes_prefetch"] > 0
    assert row["bytes_on_demand"] == 0 and row["background"] == "off"
    # the blob's end (footer and TOC), then the prefetch: one request (the chunks are
    # adjacent)
    assert len(_range_gets(bench.fake, layer.digest)) == 2
    await bench.call("release", handle)
    assert bench.bridge.warmer.keys() == []


async def test_check_waits_for_the_prefetch_only_so_long(make_bench: MakeBench) -> None:
    bench = make_bench(background_fetch=False, prefetch_wait=0.3)
    layer = push_estargz(bench.fake)
    gate = trio.Event()
    original = bench.bridge._client.read_blob_range

    async def slow(ref, digest, start, end):  # type: ignore[no-untyped-def]
        if end - start > 100_000:  # the prefetch, not the footer or TOC
            await gate.wait()
        return await original(ref, digest, start, end)

    bench.bridge._client.read_blob_range = slow  # type: ignore[method-assign]
    labels = layer_labels(layer.digest, layer.toc_digest) | {L.STARGZ_PREFETCH: "1000000"}
    handle = await bench.prepare(labels)
    assert handle is not None
    began = time.monotonic()
    await bench.call("check", handle)
    assert 0.2 < time.monotonic() - began < 5
    assert bench.bridge.status()["layers"][0]["prefetch"] == "size"
    gate.set()
    await bench.call("release", handle)


async def test_background_fetch_completes_an_attached_layer(make_bench: MakeBench) -> None:
    bench = make_bench(background_quiet=0.0, background_rate="0")
    layer = push_estargz(bench.fake)
    handle = await bench.prepare(layer_labels(layer.digest, layer.toc_digest))
    assert handle is not None
    deadline = time.monotonic() + 10
    while bench.bridge.status()["layers"][0]["background"] != "complete":
        assert time.monotonic() < deadline
        await trio.sleep(0.02)
    assert bench.bridge.status()["layers"][0]["bytes_background"] > 0
    await bench.call("release", handle)
    assert bench.bridge.warmer.keys() == []


async def test_trimming_the_toc_store_keeps_the_tocs_of_used_layers(
    make_bench: MakeBench,
) -> None:
    bench = make_bench(toc_store_size="0")
    layer = push_estargz(bench.fake)
    assert await bench.prepare(layer_labels(layer.digest, layer.toc_digest)) is not None
    tocs = bench.cfg.root / "tocs"
    used = tocs / layer.toc_digest.split(":")[1]
    assert used.exists()  # kept for a restart
    (tocs / ("e" * 64)).write_bytes(b"old")  # a layer no snapshot uses any more
    assert bench.bridge.trim_tocs() == (1, 3)
    assert [p.name for p in tocs.iterdir()] == [used.name]
