"""RemoteBlob over a fake registry: verification, single flight, timeouts, coalescing.

The blobs here are concatenated gzip members laid out the way eStargz lays out file
payloads (one member per chunk, or several chunks in one member), so the chunk math is
the real one without needing a TOC.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import trio
import trio.testing
from remote_fakes import layout as _layout
from remote_fakes import pieces as _pieces

from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, InvalidArgument, Unavailable
from snapshotter.format.toc import Chunk
from snapshotter.remote import _ranges
from snapshotter.remote import blob as blob_module
from snapshotter.remote.blob import ChunkFetchTimeout, ChunkOutOfRange, RemoteBlob, ShortRead


def _blob(source, cache: ChunkCache, **kw) -> RemoteBlob:  # type: ignore[no-untyped-def]
    return RemoteBlob(source, cache, blob_size=len(source.blob), name="blob-under-test", **kw)


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    for _ in range(10_000):
        if cond():
            return
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0)
    raise AssertionError("condition never became true")


def _waiting(cache: ChunkCache, chunk: Chunk) -> int:
    flight = cache._flights.get(Digest.parse(chunk.digest))
    return 0 if flight is None else flight.done.statistics().tasks_waiting


async def test_read_verifies_caches_and_counts(cache, fake_source) -> None:
    pieces = _pieces(3)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    blob = _blob(source, cache)
    assert await blob.read_chunk(chunks[1]) == pieces[1]
    assert source.calls == [(chunks[1].offset, chunks[1].end)]
    assert await blob.read_chunk(chunks[1]) == pieces[1]
    assert len(source.calls) == 1
    st = blob.statistics()
    assert (st.reads, st.cache_hits, st.chunks_fetched, st.fetches) == (2, 1, 1, 1)
    assert st.bytes_fetched == chunks[1].end - chunks[1].offset
    assert Digest.parse(chunks[1].digest) in cache


async def test_chunk_inside_a_shared_member(cache, fake_source) -> None:
    pieces = _pieces(3, size=700)
    data, chunks = _layout([pieces])
    blob = _blob(fake_source(data), cache)
    assert [await blob.read_chunk(c) for c in reversed(chunks)] == pieces[::-1]


async def test_concurrent_readers_cause_one_fetch(cache, fake_source) -> None:
    pieces = _pieces(1)
    data, chunks = _layout([pieces])
    source = fake_source(data)
    source.gate = trio.Event()
    blob = _blob(source, cache)
    got: list[bytes] = []

    async def read() -> None:
        got.append(await blob.read_chunk(chunks[0]))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(read)
        await _until(lambda: _waiting(cache, chunks[0]) == 7)
        source.gate.set()
    assert got == pieces * 8
    assert len(source.calls) == 1
    assert blob.statistics().chunks_fetched == 1


async def test_layers_sharing_a_chunk_fetch_it_once(cache, fake_source) -> None:
    shared = _pieces(1, tag="shared")[0]
    data_a, chunks_a = _layout([[b"only in a" * 100], [shared]])
    data_b, chunks_b = _layout([[shared], [b"only in b" * 300]])
    src_a, src_b = fake_source(data_a), fake_source(data_b)
    src_a.gate = trio.Event()
    blob_a, blob_b = _blob(src_a, cache), _blob(src_b, cache)
    got: list[bytes] = []

    async def read(blob: RemoteBlob, chunk: Chunk) -> None:
        got.append(await blob.read_chunk(chunk))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, blob_a, chunks_a[1])
        await _until(lambda: len(src_a.calls) == 1)
        nursery.start_soon(read, blob_b, chunks_b[0])
        await _until(lambda: _waiting(cache, chunks_a[1]) == 1)
        src_a.gate.set()
    assert got == [shared, shared]
    assert src_b.calls == []
    assert await blob_b.read_chunk(chunks_b[0]) == shared
    assert src_b.calls == []
    assert blob_b.statistics().cache_hits == 2


@pytest.mark.parametrize("fault", ["corrupt", "short", "wrong-content"])
async def test_bad_bytes_are_never_returned_nor_cached(cache, fake_source, fault) -> None:
    pieces = _pieces(2)
    # Stored (level 0) members: the compressed size depends on the length only.
    data, chunks = _layout([[p] for p in pieces], level=0)
    if fault == "wrong-content":
        # Valid gzip, right length, wrong bytes: only the digest can tell.
        evil, _ = _layout([[pieces[0][:-1] + b"X"], [pieces[1]]], level=0)
        assert len(evil) == len(data)
        source = fake_source(evil)
    else:
        source = fake_source(data, [fault])
    blob = _blob(source, cache)
    with pytest.raises(DataLoss):
        await blob.read_chunk(chunks[0])
    assert Digest.parse(chunks[0].digest) not in cache
    assert cache.statistics().entries == 0
    assert blob.statistics().failures == 1
    if fault != "wrong-content":
        assert await blob.read_chunk(chunks[0]) == pieces[0]  # the next read retries


async def test_short_read_is_a_short_read(cache, fake_source) -> None:
    data, chunks = _layout([_pieces(1)])
    with pytest.raises(ShortRead):
        await _blob(fake_source(data, ["short"]), cache).read_chunk(chunks[0])


async def test_hanging_fetch_times_out_then_recovers(cache, fake_source) -> None:
    pieces = _pieces(1)
    data, chunks = _layout([pieces])
    source = fake_source(data, ["hang"])
    blob = _blob(source, cache, fetch_timeout=0.3)
    began = time.monotonic()
    with pytest.raises(ChunkFetchTimeout) as info:
        await blob.read_chunk(chunks[0])
    assert isinstance(info.value, Unavailable)
    assert time.monotonic() - began < 5
    assert cache.statistics().in_flight == 0
    assert await blob.read_chunk(chunks[0]) == pieces[0]
    assert len(source.calls) == 2


async def test_source_error_is_passed_on_and_retried(cache, fake_source) -> None:
    pieces = _pieces(1)
    data, chunks = _layout([pieces])
    source = fake_source(data, [Unavailable("registry: 503")])
    blob = _blob(source, cache)
    with pytest.raises(Unavailable):
        await blob.read_chunk(chunks[0])
    assert await blob.read_chunk(chunks[0]) == pieces[0]


async def test_chunk_outside_the_blob_is_refused(cache, fake_source) -> None:
    data, chunks = _layout([_pieces(1)])
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=chunks[0].end - 1)
    with pytest.raises(ChunkOutOfRange):
        await blob.read_chunk(chunks[0])
    assert source.calls == []
    bad = Chunk(0, 1, chunks[0].offset, chunks[0].end, 0, "md5:xyz")
    with pytest.raises(InvalidArgument):
        await _blob(source, cache).read_chunk(bad)


async def test_read_chunks_coalesces_adjacent_members(cache, fake_source) -> None:
    pieces = _pieces(6)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    blob = _blob(source, cache)
    assert await blob.read_chunks(chunks) == pieces
    assert source.calls == [(chunks[0].offset, chunks[-1].end)]
    st = blob.statistics()
    assert (st.fetches, st.chunks_fetched, st.reads) == (1, 6, 6)


async def test_read_chunks_skips_cached_ones_and_duplicates(cache, fake_source) -> None:
    pieces = _pieces(5)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    blob = _blob(source, cache)
    await blob.read_chunk(chunks[2])
    wanted = [chunks[4], *chunks, chunks[0]]
    assert await blob.read_chunks(wanted) == [pieces[4], *pieces, pieces[0]]
    assert sorted(source.calls[1:]) == [
        (chunks[0].offset, chunks[1].end),
        (chunks[3].offset, chunks[4].end),
    ]


async def test_read_chunks_respects_the_coalesce_limit(cache, fake_source, monkeypatch) -> None:
    pieces = _pieces(4)
    data, chunks = _layout([[p] for p in pieces])
    monkeypatch.setattr(_ranges, "COALESCE_LIMIT", 2 * (chunks[0].end - chunks[0].offset))
    source = fake_source(data)
    assert await _blob(source, cache).read_chunks(chunks) == pieces
    assert len(source.calls) == 2


async def test_read_chunks_with_a_corrupt_range_fails_and_caches_nothing_bad(
    cache, fake_source
) -> None:
    pieces = _pieces(3)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data, ["corrupt"])
    blob = _blob(source, cache)
    with pytest.raises(DataLoss):
        await blob.read_chunks(chunks)
    for chunk, piece in zip(chunks, pieces, strict=True):
        stored = cache.get(Digest.parse(chunk.digest))
        assert stored is None or stored == piece
    assert await blob.read_chunks(chunks) == pieces


@pytest.mark.allow_log_errors
async def test_corrupt_cache_file_is_refetched(cache, fake_source) -> None:
    pieces = _pieces(1)
    data, chunks = _layout([pieces])
    source = fake_source(data)
    blob = _blob(source, cache)
    await blob.read_chunk(chunks[0])
    cache.path(Digest.parse(chunks[0].digest)).write_bytes(b"bit rot" * 100)
    assert await blob.read_chunk(chunks[0]) == pieces[0]
    assert len(source.calls) == 2
    assert cache.statistics().corrupt == 1
    assert cache.get(Digest.parse(chunks[0].digest)) == pieces[0]


async def test_random_faults_never_yield_wrong_bytes(cache, fake_source) -> None:
    rnd = random.Random(3)
    pieces = _pieces(12, size=3000)
    groups = [[p] for p in pieces[:6]] + [pieces[6:9]] + [[p] for p in pieces[9:]]
    data, chunks = _layout(groups)
    faults: list[object] = ["ok", "ok", "corrupt", "short", Unavailable("registry: 503")]
    source = fake_source(data, [rnd.choice(faults) for _ in range(400)])
    blob = _blob(source, cache)
    served = 0

    async def reader(seed: int) -> None:
        nonlocal served
        r = random.Random(seed)
        for _ in range(25):
            picked = r.sample(range(len(chunks)), r.randint(1, 4))
            try:
                got = await blob.read_chunks([chunks[i] for i in picked])
            except (DataLoss, Unavailable):
                continue
            assert got == [pieces[i] for i in picked]
            served += 1

    async with trio.open_nursery() as nursery:
        for seed in range(8):
            nursery.start_soon(reader, seed)
    assert served > 0 and blob.statistics().failures > 0
    for chunk, piece in zip(chunks, pieces, strict=True):
        assert cache.get(Digest.parse(chunk.digest)) in (None, piece)


async def test_read_cached_serves_parts_of_stored_chunks_only(cache, fake_source) -> None:
    pieces = _pieces(2, size=5000)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    blob = _blob(source, cache)
    assert await blob.read_cached(chunks[0], 10, 20) is None  # never fetches
    assert source.calls == []
    await blob.read_chunk(chunks[0])
    assert await blob.read_cached(chunks[0], 10, 4000) == pieces[0][10:4000]
    assert await blob.read_cached(chunks[1], 0, 1) is None
    assert len(source.calls) == 1
    # Another process over the same directory verifies the chunk before serving parts.
    cache.close()
    with ChunkCache(cache.root, max_bytes=cache.max_bytes) as again:
        fresh = _blob(source, again)
        assert not again.verified(Digest.parse(chunks[0].digest))
        assert await fresh.read_cached(chunks[0], 100, 200) == pieces[0][100:200]
        assert again.verified(Digest.parse(chunks[0].digest))


async def test_along_takes_following_uncached_chunks_in_the_same_request(
    cache, fake_source
) -> None:
    pieces = _pieces(6, size=2000)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    blob = _blob(source, cache)
    await blob.read_chunk(chunks[4])  # cached: the extension must stop before it
    source.calls.clear()
    got = await blob.read_chunks([chunks[1]], along=chunks[2:])
    assert got == [pieces[1]]
    assert source.calls == [(chunks[1].offset, chunks[3].end)]
    for i in (2, 3):  # verified and stored, not returned
        assert cache.get(Digest.parse(chunks[i].digest)) == pieces[i]
    assert Digest.parse(chunks[5].digest) not in cache
    assert blob.statistics().chunks_fetched == 4  # chunks[4] earlier, then 1, 2 and 3
    # Nothing already held is fetched again: the next read of 2 and 3 is a cache hit.
    assert await blob.read_chunks([chunks[2], chunks[3]]) == pieces[2:4]
    assert len(source.calls) == 1


@pytest.mark.allow_log_errors
async def test_a_bad_neighbour_costs_a_log_line_not_the_read(cache, fake_source) -> None:
    pieces = _pieces(3, size=2000)
    data, chunks = _layout([[p] for p in pieces])
    bad = dataclasses.replace(chunks[2], digest="sha256:" + "0" * 64)  # bytes will not match
    blob = _blob(fake_source(data), cache)
    assert await blob.read_chunks([chunks[0]], along=[chunks[1], bad]) == [pieces[0]]
    assert Digest.parse(chunks[1].digest) in cache
    assert Digest.parse(bad.digest) not in cache


# --- several ranges in one request ------------------------------------------------------


def _reader_blob(source, many, usable, cache: ChunkCache) -> RemoteBlob:  # type: ignore[no-untyped-def]
    reader = blob_module.RangeReader(source, many, usable)
    return RemoteBlob(reader, cache, blob_size=len(source.blob), name="blob-under-test")


class _Many:
    """The `many` of a RangeReader over a FakeSource, counting its calls."""

    def __init__(self, source, fail: Exception | None = None) -> None:  # type: ignore[no-untyped-def]
        self.source, self.fail = source, fail
        self.calls: list[list[tuple[int, int]]] = []

    async def __call__(self, ranges) -> list[bytes]:  # type: ignore[no-untyped-def]
        self.calls.append(list(ranges))
        await trio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return [self.source.blob[a:b] for a, b in ranges]


async def test_ranges_that_do_not_touch_share_one_request(cache, fake_source) -> None:
    pieces = _pieces(7)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    many = _Many(source)
    blob = _reader_blob(source, many, lambda: True, cache)
    wanted = [chunks[0], chunks[2], chunks[3], chunks[6]]  # 2 and 3 touch: one range
    assert await blob.read_chunks(wanted) == [pieces[0], pieces[2], pieces[3], pieces[6]]
    assert source.calls == []
    assert many.calls == [[(chunks[0].offset, chunks[0].end), (chunks[2].offset, chunks[3].end),
                           (chunks[6].offset, chunks[6].end)]]  # fmt: skip
    st = blob.statistics()
    assert (st.fetches, st.chunks_fetched) == (1, 4)
    assert st.bytes_fetched == sum(b - a for a, b in many.calls[0])


async def test_multi_range_groups_stay_small_and_off_when_unusable(
    cache, fake_source, monkeypatch
) -> None:
    pieces = _pieces(9)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    many = _Many(source)
    monkeypatch.setattr(_ranges, "GROUP_RANGES", 2)
    blob = _reader_blob(source, many, lambda: True, cache)
    await blob.read_chunks([chunks[i] for i in (0, 2, 4, 6, 8)])
    assert [len(c) for c in many.calls] == [2, 2]  # and the last range alone
    assert source.calls == [(chunks[8].offset, chunks[8].end)]
    usable = False
    other = _reader_blob(source, many, lambda: usable,
                         ChunkCache(cache.root.parent / "other", 1 << 30))  # fmt: skip
    source.calls.clear()
    await other.read_chunks([chunks[i] for i in (1, 3, 5)])
    assert len(many.calls) == 2  # not asked again
    assert sorted(source.calls) == [(chunks[i].offset, chunks[i].end) for i in (1, 3, 5)]


async def test_a_failed_multi_range_request_fails_its_chunks_and_keeps_nothing(
    cache, fake_source
) -> None:
    pieces = _pieces(5)
    data, chunks = _layout([[p] for p in pieces])
    source = fake_source(data)
    many = _Many(source, fail=Unavailable("registry went away"))
    blob = _reader_blob(source, many, lambda: True, cache)
    with pytest.raises(Unavailable, match="went away"):
        await blob.read_chunks([chunks[0], chunks[2], chunks[4]])
    assert not any(Digest.parse(c.digest) in cache for c in chunks)
    many.fail = None
    assert await blob.read_chunks([chunks[0], chunks[2]]) == [pieces[0], pieces[2]]
    assert len(many.calls) == 2
