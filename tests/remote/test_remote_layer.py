"""load_toc / open_layer over a fake registry serving eStargz blobs built by format/build.py."""

from __future__ import annotations

import gzip
import io

import pytest
import trio
from remote_fakes import CHUNK, FILES
from remote_fakes import layer_tar as _tar

from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, InvalidArgument, Unavailable
from snapshotter.format.build import build_estargz
from snapshotter.format.estargz import InvalidFooter, read_toc_json
from snapshotter.remote.blob import ShortRead
from snapshotter.remote.layer import (
    TAIL_BYTES,
    TocDigestMissing,
    TocFetchTimeout,
    TocTooLarge,
    load_toc,
    open_layer,
)
from snapshotter.remote.tocstore import TocStore


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, Digest]:
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(_tar(FILES)), out, chunk_size=CHUNK)
    blob = out.getvalue()
    assert result.size == len(blob)
    return blob, result.toc_digest


async def _load(source, toc_digest, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("max_toc_size", 1 << 20)
    return await load_toc(source, blob_size=len(source.blob), toc_digest=toc_digest, **kw)


async def test_good_small_toc_is_verified_and_parsed_in_one_fetch(
    layer, fake_source, tmp_path
) -> None:
    blob, toc_digest = layer
    source = fake_source(blob)
    toc = await _load(source, toc_digest, toc_store=TocStore(tmp_path))
    # The store keeps the member as the blob holds it (compressed), not the JSON.
    toc_offset = int(blob[-51:][16:32], 16)
    stored = (tmp_path / toc_digest.hex).read_bytes()
    assert stored == b"%d\n" % toc_offset + blob[toc_offset:-51]
    assert Digest.of(read_toc_json(stored.partition(b"\n")[2], max_size=1 << 20)) == toc_digest
    names = {e.name: e for e in toc.entries}
    assert {"etc", "etc/hello.txt", "etc/link", "usr/lib/big.bin", "usr/lib/empty"} <= set(names)
    assert names["etc/link"].link_name == "hello.txt"
    assert len(names["usr/lib/big.bin"].chunks) == 5
    assert len({c.digest for c in names["usr/lib/zeros"].chunks}) == 2
    assert toc.blob_size == len(blob)
    assert source.calls == [(max(0, len(blob) - TAIL_BYTES), len(blob))]


@pytest.fixture(scope="module")
def big_layer() -> tuple[bytes, Digest]:
    """A layer whose TOC member is larger than TAIL_BYTES."""
    files = {f"usr/share/doc/package-{i:05d}/{'long-name-' * 8}{i}.txt": b"x%d" % i
             for i in range(3000)}  # fmt: skip
    blob, toc_digest = _build(files)
    toc_offset = int(blob[-51:][16:32], 16)
    assert len(blob) - 51 - toc_offset > TAIL_BYTES
    return blob, toc_digest


async def test_large_toc_takes_a_second_fetch_for_the_rest_only(big_layer, fake_source) -> None:
    blob, toc_digest = big_layer
    source = fake_source(blob)
    toc = await _load(source, toc_digest)
    toc_offset = int(blob[-51:][16:32], 16)
    assert source.calls == [(len(blob) - TAIL_BYTES, len(blob)),
                            (toc_offset, len(blob) - TAIL_BYTES)]  # fmt: skip
    assert len(toc.entries) > 3000


@pytest.mark.parametrize("big", [False, True], ids=["one-fetch", "two-fetches"])
async def test_without_a_size_the_suffix_range_tells_it(
    layer, big_layer, fake_source, big: bool
) -> None:
    blob, toc_digest = big_layer if big else layer
    source = fake_source(blob)
    tails: list[int] = []

    async def fetch_tail(n: int) -> tuple[bytes, int]:
        tails.append(n)
        return blob[-n:], len(blob)

    toc = await load_toc(source, blob_size=None, fetch_tail=fetch_tail, toc_digest=toc_digest,
                         max_toc_size=1 << 20)  # fmt: skip
    assert toc.blob_size == len(blob) and tails == [TAIL_BYTES]
    assert len(source.calls) == int(big)


async def test_open_layer_serves_every_file_exactly(layer, fake_source, cache) -> None:
    blob, toc_digest = layer
    source = fake_source(blob)
    opened = await open_layer(
        source, cache, blob_size=len(blob), toc_digest=toc_digest, max_toc_size=1 << 20
    )
    assert opened.verified
    for entry in opened.toc.entries:
        if entry.type == "reg":
            parts = await opened.blob.read_chunks(entry.chunks)
            assert b"".join(parts) == FILES[entry.name], entry.name
    before = len(source.calls)
    big = opened.toc.by_name()["usr/lib/big.bin"]
    assert b"".join(await opened.blob.read_chunks(big.chunks)) == FILES["usr/lib/big.bin"]
    assert len(source.calls) == before  # all from the cache now


async def test_wrong_toc_digest_is_data_loss(layer, fake_source) -> None:
    blob, _ = layer
    with pytest.raises(DataLoss):
        await _load(fake_source(blob), Digest.of(b"some other toc"))


async def test_missing_toc_digest_is_refused_before_any_fetch(layer, fake_source) -> None:
    blob, _ = layer
    source = fake_source(blob)
    with pytest.raises(TocDigestMissing) as info:
        await _load(source, None)
    assert isinstance(info.value, InvalidArgument)
    assert source.calls == []


async def test_missing_toc_digest_allowed_when_configured(layer, fake_source, cache) -> None:
    blob, _ = layer
    source = fake_source(blob)
    opened = await open_layer(
        source,
        cache,
        blob_size=len(blob),
        toc_digest=None,
        max_toc_size=1 << 20,
        allow_unverified=True,
    )
    assert not opened.verified
    assert opened.toc.entries


@pytest.mark.parametrize("cut", [1, 30, 51])
async def test_blob_cut_short_is_not_estargz(layer, fake_source, cut) -> None:
    blob, toc_digest = layer
    with pytest.raises(InvalidFooter):
        await _load(fake_source(blob[:-cut]), toc_digest)


async def test_toc_member_cut_short_is_data_loss(layer, fake_source) -> None:
    blob, toc_digest = layer
    tail = blob[-51:]
    toc_offset = int(tail[16:32], 16)
    damaged = blob[: toc_offset + 40] + tail
    with pytest.raises(DataLoss):
        await _load(fake_source(damaged), toc_digest)


@pytest.mark.parametrize("big", [False, True], ids=["one-fetch", "two-fetches"])
async def test_source_answering_short_is_data_loss(
    layer, big_layer, fake_source, big: bool
) -> None:
    blob, toc_digest = big_layer if big else layer
    with pytest.raises(ShortRead):
        await _load(fake_source(blob, ["ok", "short"] if big else ["short"]), toc_digest)


@pytest.mark.parametrize("big", [False, True], ids=["one-fetch", "two-fetches"])
async def test_corrupt_toc_bytes_are_data_loss(layer, big_layer, fake_source, big: bool) -> None:
    blob, toc_digest = big_layer if big else layer
    if not big:  # one flipped byte in the TOC member, which the first request brings
        toc_offset = int(blob[-51:][16:32], 16)
        mid = (toc_offset + len(blob) - 51) // 2
        blob = blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1 :]
    with pytest.raises(DataLoss):
        await _load(fake_source(blob, ["ok", "corrupt"] if big else []), toc_digest)


@pytest.mark.parametrize(
    "blob",
    [b"", b"tiny", gzip.compress(_tar(FILES)), b"\0" * 4096],
    ids=["empty", "tiny", "plain-gzip-tar", "zeros"],
)
async def test_not_estargz_is_invalid_footer(fake_source, blob) -> None:
    source = fake_source(blob)
    with pytest.raises(InvalidFooter):
        await _load(source, Digest.of(b"x"))
    assert all(start < end for start, end in source.calls)  # never an empty range


async def test_toc_over_the_size_limit_is_refused(layer, fake_source) -> None:
    blob, toc_digest = layer
    with pytest.raises(InvalidArgument):
        await _load(fake_source(blob), toc_digest, max_toc_size=64)


async def test_toc_member_over_the_limit_is_refused_before_fetching(fake_source) -> None:
    from snapshotter.format.estargz import footer_bytes

    blob = b"\0" * (300 << 10) + footer_bytes(0)
    source = fake_source(blob)
    with pytest.raises(TocTooLarge):
        await _load(source, Digest.of(b"x"), max_toc_size=1024)
    assert len(source.calls) == 1


@pytest.mark.parametrize("big", [False, True], ids=["one-fetch", "two-fetches"])
async def test_hanging_registry_times_out(layer, big_layer, fake_source, big: bool) -> None:
    blob, toc_digest = big_layer if big else layer
    source = fake_source(blob, ["ok", "hang"] if big else ["hang"])
    with pytest.raises(TocFetchTimeout) as info:
        await _load(source, toc_digest, timeout=0.3)
    assert isinstance(info.value, Unavailable)
    await trio.lowlevel.checkpoint()


def _build(files: dict[str, bytes], **kw) -> tuple[bytes, Digest]:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(_tar(files)), out, chunk_size=CHUNK, **kw)
    return out.getvalue(), result.toc_digest


async def _open(source, cache, toc_digest):  # type: ignore[no-untyped-def]
    return await open_layer(
        source, cache, blob_size=len(source.blob), toc_digest=toc_digest, max_toc_size=1 << 20
    )


async def test_two_layers_sharing_a_file_fetch_its_chunks_once(fake_source, cache) -> None:
    shared = FILES["usr/lib/big.bin"]
    blob_a, toc_a = _build({"a.txt": b"only in a" * 50, "usr/lib/big.bin": shared})
    blob_b, toc_b = _build({"usr/lib/big.bin": shared, "b.txt": b"only in b" * 70})
    src_a, src_b = fake_source(blob_a), fake_source(blob_b)
    layer_a, layer_b = await _open(src_a, cache, toc_a), await _open(src_b, cache, toc_b)
    assert len(src_b.calls) == 1  # the blob's end: footer and toc

    big_a = layer_a.toc.by_name()["usr/lib/big.bin"]
    big_b = layer_b.toc.by_name()["usr/lib/big.bin"]
    assert [c.offset for c in big_a.chunks] != [c.offset for c in big_b.chunks]
    async with trio.open_nursery() as nursery:
        for chunk in big_a.chunks:
            nursery.start_soon(layer_a.blob.read_chunk, chunk)
        for chunk in big_b.chunks:
            nursery.start_soon(layer_b.blob.read_chunk, chunk)
    fetched = layer_a.blob.statistics().chunks_fetched + layer_b.blob.statistics().chunks_fetched
    assert fetched == len(big_a.chunks)
    assert b"".join(await layer_b.blob.read_chunks(big_b.chunks)) == shared
    assert b"".join(await layer_a.blob.read_chunks(big_a.chunks)) == shared


async def test_landmark_prefetch_fetches_exactly_the_prioritized_files(fake_source, cache) -> None:
    from snapshotter.remote.prefetch import plan_prefetch, prefetch

    blob, toc_digest = _build(FILES, prioritized=["etc/hello.txt", "usr/lib/big.bin"])
    source = fake_source(blob)
    layer = await _open(source, cache, toc_digest)
    plan = plan_prefetch(layer.toc, size=0)
    assert plan.reason == "landmark"
    by_name = layer.toc.by_name()
    wanted = {c.digest for n in ("etc/hello.txt", "usr/lib/big.bin") for c in by_name[n].chunks}
    assert {c.digest for c in plan.chunks} == wanted
    result = await prefetch(layer.blob, plan)
    assert result.failed == 0
    assert len(source.calls) == 2  # the blob's end (footer and toc), one for the prefetch
    assert source.calls[1][0] < source.calls[1][1] <= layer.toc.prefetch_landmark
    for name in ("etc/hello.txt", "usr/lib/big.bin"):
        assert b"".join(await layer.blob.read_chunks(by_name[name].chunks)) == FILES[name]
    assert len(source.calls) == 2


async def test_toc_store_keeps_the_verified_member_for_a_restart(
    layer, fake_source, tmp_path
) -> None:
    blob, toc_digest = layer
    store = TocStore(tmp_path)
    toc = await _load(fake_source(blob), toc_digest, toc_store=store)
    stored = TocStore(tmp_path).load(toc_digest, blob_size=len(blob), max_entries=1000)
    assert stored is not None and list(stored.entries) == list(toc.entries)


async def test_toc_store_keeps_nothing_unverified(layer, fake_source, tmp_path) -> None:
    blob, _ = layer
    with pytest.raises(DataLoss):
        await _load(fake_source(blob), Digest.of(b"some other toc"), toc_store=TocStore(tmp_path))
    toc = await _load(fake_source(blob), None, allow_unverified=True, toc_store=TocStore(tmp_path))
    assert toc.entries
    assert list(tmp_path.iterdir()) == []
