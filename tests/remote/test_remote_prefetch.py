"""Prefetch planning from landmarks and sizes, and fetching a plan in few requests."""

from __future__ import annotations

import pytest
from remote_fakes import layout, pieces

from snapshotter.errors import Unavailable
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.remote import blob as blob_module
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.prefetch import plan_prefetch, prefetch


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
    monkeypatch.setattr(blob_module, "COALESCE_LIMIT", 2 * (chunks[0].end - chunks[0].offset))
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
