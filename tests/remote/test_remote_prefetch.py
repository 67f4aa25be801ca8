"""Prefetch planning from landmarks and sizes, and fetching a plan in few requests."""

from __future__ import annotations

import time
from functools import partial

import pytest
import trio
import trio.testing
from remote_fakes import layout, pieces

from snapshotter.cache.chunks import ChunkCache
from snapshotter.errors import Unavailable
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.remote import _ranges
from snapshotter.remote.blob import DemandGauge, RemoteBlob
from snapshotter.remote.prefetch import (
    PrefetchPlan,
    background_fetch,
    missing_chunks,
    plan_prefetch,
    plan_whole_layer,
    prefetch,
)


def _toc(chunks: list[Chunk], size: int, **kw: object) -> Toc:
    # One file per chunk, plus a second name for chunk 0's content (a duplicate digest).
    entries = [Entry("", "dir", mode=0o755)]
    entries += [Entry(f"f{i}", "reg", size=c.size, chunks=(c,)) for i, c in enumerate(chunks)]
    entries.append(Entry("copy-of-f0", "reg", size=chunks[0].size, chunks=(chunks[0],)))
    return Toc(entries=tuple(entries), toc_offset=size, blob_size=size + 100, **kw)  # type: ignore[arg-type]


@pytest.fixture
def six():
    data, chunks = layout([[p] for p in pieces(6)])
    return data, chunks, _toc(chunks, len(data))


def test_landmark_plan_is_everything_before_it(six) -> None:
    data, chunks, toc = six
    toc = _toc(chunks, len(data), prefetch_landmark=chunks[3].offset)
    plan = plan_prefetch(toc, size=1 << 30)
    assert plan.reason == "landmark"
    assert plan.chunks == tuple(chunks[:3])


def test_no_prefetch_landmark_wins(six) -> None:
    data, chunks, _ = six
    toc = _toc(chunks, len(data), prefetch_landmark=chunks[3].offset, no_prefetch=True)
    plan = plan_prefetch(toc, size=1 << 30)
    assert (plan.reason, plan.chunks, plan.end) == ("no-prefetch landmark", (), 0)


def test_size_plan_takes_members_starting_before_the_size(six) -> None:
    _, chunks, toc = six
    plan = plan_prefetch(toc, size=chunks[2].offset + 1)
    assert plan.reason == "size"
    assert plan.chunks == tuple(chunks[:3])
    assert plan_prefetch(toc, size=0).chunks == ()


async def test_prefetch_fetches_the_plan_in_one_request(six, cache, fake_source) -> None:
    data, chunks, toc = six
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    result = await prefetch(blob, plan_prefetch(toc, size=1 << 30))
    assert (result.chunks, result.failed) == (6, 0)
    assert source.calls == [(chunks[0].offset, chunks[-1].end)]
    assert result.bytes_fetched == chunks[-1].end - chunks[0].offset
    for c, p in zip(chunks, pieces(6), strict=True):
        assert await blob.read_chunk(c) == p
    assert len(source.calls) == 1


async def test_prefetch_splits_large_plans(six, cache, fake_source, monkeypatch) -> None:
    data, chunks, toc = six
    monkeypatch.setattr(_ranges, "COALESCE_LIMIT", 2 * (chunks[0].end - chunks[0].offset))
    source = fake_source(data)
    result = await prefetch(
        RemoteBlob(source, cache, blob_size=len(data)), plan_prefetch(toc, size=1 << 30)
    )
    assert result.chunks == 6
    assert sorted(source.calls) == [(chunks[i].offset, chunks[i + 1].end) for i in range(0, 6, 2)]


@pytest.mark.allow_log_errors
async def test_failed_prefetch_is_logged_not_raised(six, cache, fake_source, caplog) -> None:
    data, _, toc = six
    source = fake_source(data, [Unavailable("registry: 503")])
    result = await prefetch(
        RemoteBlob(source, cache, blob_size=len(data)), plan_prefetch(toc, size=1 << 30)
    )
    assert (result.chunks, result.failed) == (0, 6)
    assert "prefetch of 6 chunks failed" in caplog.text


# -- background completion ----------------------------------------------------------------


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    # Bounded in real time: worker threads (cache I/O) do not advance a MockClock.
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0)


async def test_background_completes_the_layer(six, cache, fake_source) -> None:
    data, chunks, toc = six
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    await blob.read_chunk(chunks[2])
    assert len(missing_chunks(blob, toc)) == 5
    result = await background_fetch(blob, toc, quiet=0)
    assert result.complete and result.chunks == 5
    assert missing_chunks(blob, toc) == []
    assert sorted(source.calls[1:]) == [
        (chunks[0].offset, chunks[1].end),
        (chunks[3].offset, chunks[5].end),
    ]
    st = blob.statistics()
    assert st.bytes_background == result.bytes_fetched == st.bytes_fetched - st.bytes_on_demand
    assert st.demand_waits == 1


async def test_background_waits_for_waiting_readers(six, cache, fake_source) -> None:
    data, _, toc = six
    gauge = DemandGauge()
    other_data, other_chunks = layout([[b"somebody else's file" * 50]])
    reader_source = fake_source(other_data)
    reader_source.gate = trio.Event()
    reader = RemoteBlob(reader_source, cache, blob_size=len(other_data), demand=gauge)
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data), demand=gauge)
    results = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.read_chunk, other_chunks[0])
        await _until(lambda: gauge.waiting == 1)

        async def background() -> None:
            results.append(await background_fetch(blob, toc, quiet=0))

        nursery.start_soon(background)
        await _until(lambda: len(reader_source.calls) == 1)
        await _until(lambda: gauge._changed.statistics().tasks_waiting == 1)  # background
        assert source.calls == []
        reader_source.gate.set()
    assert results[0].complete
    assert gauge.waiting == 0


async def test_background_starts_after_a_quiet_period(six, cache, fake_source, mock_clock) -> None:
    data, _, toc = six
    gauge = DemandGauge()
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data), demand=gauge)
    gauge.enter()
    gauge.leave()  # a reader finished just now
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(background_fetch, blob, toc, quiet=10))
        waiting = gauge._changed.statistics
        await _until(lambda: waiting().tasks_waiting == 1)
        mock_clock.jump(9)
        await _until(lambda: waiting().tasks_waiting == 1)
        assert source.calls == []
        mock_clock.jump(2)
        await _until(lambda: len(source.calls) == 1)


async def test_background_respects_the_rate(six, cache, fake_source) -> None:
    data, chunks, toc = six
    member = chunks[0].end - chunks[0].offset
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    began = time.monotonic()
    result = await background_fetch(blob, toc, quiet=0, rate=member / 0.05, batch_bytes=member)
    # Six one-member requests at one member per 50 ms cannot finish sooner than this.
    assert time.monotonic() - began >= 0.25
    assert len(source.calls) == 6 and result.complete


async def test_background_skips_a_layer_larger_than_the_cache(six, tmp_path, fake_source) -> None:
    data, _, toc = six
    source = fake_source(data)
    with ChunkCache(tmp_path / "small", max_bytes=100) as small:
        result = await background_fetch(RemoteBlob(source, small, blob_size=len(data)), toc)
    assert not result.complete
    assert source.calls == []


@pytest.mark.allow_log_errors
async def test_background_stops_at_the_first_failure(six, cache, fake_source) -> None:
    data, chunks, toc = six
    member = chunks[0].end - chunks[0].offset
    source = fake_source(data, [Unavailable("registry: 503")])
    blob = RemoteBlob(source, cache, blob_size=len(data))
    result = await background_fetch(blob, toc, quiet=0, batch_bytes=member)
    assert (result.chunks, result.failed, result.complete) == (0, 6, False)
    assert len(source.calls) == 1
    again = await background_fetch(blob, toc, quiet=0, batch_bytes=member)
    assert again.complete and again.chunks == 6


def test_whole_layer_plan_ignores_landmarks(six) -> None:
    data, chunks, _ = six
    toc = _toc(chunks, len(data), prefetch_landmark=chunks[1].offset, no_prefetch=True)
    plan = plan_whole_layer(toc)
    assert (plan.reason, plan.chunks) == ("all", tuple(chunks))


async def test_a_plan_in_access_order_is_fetched_in_that_order(six, cache, fake_source) -> None:
    data, chunks, _ = six
    source = fake_source(data)
    order = [chunks[4], chunks[5], chunks[0], chunks[1], chunks[2]]
    plan = PrefetchPlan(end=0, chunks=tuple(order), reason="profile")
    result = await prefetch(RemoteBlob(source, cache, blob_size=len(data)), plan, parallel=1)
    assert result.complete and result.chunks == 5
    assert source.calls == [(chunks[4].offset, chunks[5].end), (chunks[0].offset, chunks[2].end)]


async def test_a_read_that_joins_a_prefetch_waits_without_a_request_of_its_own(
    six, cache, fake_source
) -> None:
    """`demand_waits` counts readers that waited for the network, `demand_fetches` the
    range requests made for them: a reader of a chunk a prefetch is fetching waits for
    that fetch (issue 6 counts on-demand requests, as a proxy in front would)."""
    data, chunks, _toc6 = six
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    source.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(blob.read_chunks, [chunks[0]], purpose="prefetch"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(blob.read_chunk, chunks[0])  # joins the prefetch's fetch
        await trio.testing.wait_all_tasks_blocked()
        source.gate.set()
    st = blob.statistics()
    assert (st.demand_waits, st.demand_fetches, len(source.calls)) == (1, 0, 1)
    await blob.read_chunk(chunks[3])
    st = blob.statistics()
    assert (st.demand_waits, st.demand_fetches, len(source.calls)) == (2, 1, 2)
