"""ChunkCache: verify-before-store, corruption, LRU bound and order, restart, concurrency."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from snapshotter.cache.chunks import CacheInUse, ChunkCache
from snapshotter.digest import Digest
from snapshotter.errors import ClosedError, DataLoss, Unavailable


def _chunk(tag: str, size: int = 100) -> tuple[Digest, bytes]:
    data = (tag.encode() * size)[:size]
    return Digest.of(data), data


def _files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (root / "sha256").glob("*/*")}


def _assert_consistent(cache: ChunkCache) -> None:
    st = cache.statistics()
    files = _files(cache.root)
    assert st.entries == len(files)
    assert st.bytes == sum(files.values())
    assert st.bytes <= cache.max_bytes
    assert list((cache.root / "tmp").iterdir()) == []


@pytest.fixture
def cache(tmp_path: Path):
    with ChunkCache(tmp_path / "cache", max_bytes=1000) as c:
        yield c


def test_put_then_get_content_addressed(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    cache.put(d, data)
    assert cache.get(d) == data
    assert cache.path(d) == cache.root / "sha256" / d.hex[:2] / d.hex
    assert cache.path(d).read_bytes() == data
    st = cache.statistics()
    assert (st.entries, st.bytes, st.hits, st.misses) == (1, 100, 1, 0)
    _assert_consistent(cache)


def test_get_absent_is_a_miss(cache: ChunkCache) -> None:
    assert cache.get(_chunk("x")[0]) is None
    assert cache.statistics().misses == 1


def test_put_refuses_bytes_that_do_not_match(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    with pytest.raises(DataLoss):
        cache.put(d, data + b"!")
    assert d not in cache
    assert cache.get(d) is None
    _assert_consistent(cache)
    assert cache.statistics().entries == 0


def test_put_twice_stores_once(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    cache.put(d, data)
    cache.put(d, data)
    assert cache.statistics().bytes == 100
    _assert_consistent(cache)


@pytest.mark.allow_log_errors
def test_damage_is_caught_on_the_first_read_after_a_restart(tmp_path: Path) -> None:
    d, data = _chunk("a")
    with ChunkCache(tmp_path, max_bytes=1000) as cache:
        cache.put(d, data)
    (tmp_path / "sha256" / d.hex[:2] / d.hex).write_bytes(b"B" * 100)  # same size
    with ChunkCache(tmp_path, max_bytes=1000) as cache:
        assert cache.read_range(d, 0, 10) is None
        st = cache.statistics()
        assert (st.corrupt, st.misses, st.entries) == (1, 1, 0)
        assert not cache.path(d).exists()
        cache.put(d, data)  # a refetch stores it again
        assert cache.get(d) == data
        _assert_consistent(cache)


@pytest.mark.allow_log_errors
@pytest.mark.parametrize("read", ["get", "read_range"])
def test_a_verified_chunk_whose_file_changes_size_is_removed(cache: ChunkCache, read) -> None:
    d, data = _chunk("a")
    cache.put(d, data)
    cache.path(d).write_bytes(b"B" * 60)
    got = cache.get(d) if read == "get" else cache.read_range(d, 0, 10)
    assert got is None
    assert cache.statistics().corrupt == 1
    assert d not in cache
    _assert_consistent(cache)


def test_read_range_preads_a_verified_chunk_and_clips_at_its_end(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    d = Digest.of(data)
    with ChunkCache(tmp_path, max_bytes=1 << 20) as cache:
        cache.put(d, data)
        assert cache.read_range(d, 100, 300) == data[100:300]
        assert cache.read_range(d, 10_000, 20_000) == data[10_000:]
        assert cache.read_range(d, 20_000, 20_100) == b""
    with ChunkCache(tmp_path, max_bytes=1 << 20) as cache:  # verified whole, then pread
        assert cache.read_range(d, 5, 9) == data[5:9]
        assert cache.read_range(d, 4000, 4100) == data[4000:4100]
        assert cache.statistics().hits == 2
    unknown = Digest.of(b"never stored")
    with ChunkCache(tmp_path, max_bytes=1 << 20) as cache:
        assert cache.read_range(unknown, 0, 1) is None
        assert cache.statistics().misses == 1


def test_vanished_file_is_a_miss(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    cache.put(d, data)
    cache.path(d).unlink()
    assert cache.get(d) is None
    assert cache.statistics().entries == 0


def test_lru_evicts_least_recently_used_first(tmp_path: Path) -> None:
    with ChunkCache(tmp_path, max_bytes=300) as cache:
        (a, da), (b, db), (c, dc), (d, dd) = (_chunk(t) for t in "abcd")
        cache.put(a, da)
        cache.put(b, db)
        cache.put(c, dc)
        assert cache.get(a) == da  # a is now the most recent; b the oldest
        cache.put(d, dd)
        assert b not in cache
        assert all(x in cache for x in (a, c, d))
        assert cache.statistics().evictions == 1
        assert not cache.path(b).exists()
        _assert_consistent(cache)


def test_bound_holds_for_a_chunk_larger_than_the_cache(tmp_path: Path) -> None:
    with ChunkCache(tmp_path, max_bytes=150) as cache:
        d, data = _chunk("big", 200)
        cache.put(d, data)
        assert cache.statistics().bytes == 0
        _assert_consistent(cache)


def test_restart_rebuilds_index_and_lru_order_from_file_times(tmp_path: Path) -> None:
    chunks = [_chunk(t) for t in "abc"]
    with ChunkCache(tmp_path, max_bytes=300) as cache:
        for d, data in chunks:
            cache.put(d, data)
        # Pin the times: b oldest, then c, then a (filesystem clocks are too coarse to
        # rely on the order of writes).
        for (d, _), t in zip(chunks, (3000, 1000, 2000), strict=True):
            os.utime(cache.path(d), ns=(t * 10**9, t * 10**9))
    (tmp_path / "tmp" / "half-written").write_bytes(b"x")
    (tmp_path / "sha256" / "zz").mkdir()
    (tmp_path / "sha256" / "zz" / "not-a-digest").write_bytes(b"x" * 50)

    with ChunkCache(tmp_path, max_bytes=300) as cache:
        st = cache.statistics()
        assert (st.entries, st.bytes) == (3, 300)
        assert not (tmp_path / "tmp" / "half-written").exists()
        assert (tmp_path / "sha256" / "zz" / "not-a-digest").exists()  # not ours: left alone
        assert cache.get(chunks[1][0]) == chunks[1][1]
        d, data = _chunk("d")
        cache.put(d, data)
        # b was refreshed by the hit, so c (next oldest on disk) goes.
        assert chunks[2][0] not in cache
        assert chunks[1][0] in cache and chunks[0][0] in cache


def test_restart_with_smaller_budget_evicts_down(tmp_path: Path) -> None:
    with ChunkCache(tmp_path, max_bytes=1000) as cache:
        for t in "abcde":
            cache.put(*_chunk(t))
    with ChunkCache(tmp_path, max_bytes=250) as cache:
        st = cache.statistics()
        assert (st.entries, st.bytes, st.evictions) == (2, 200, 3)
        _assert_consistent(cache)


def test_one_owner_per_directory(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=100)
    with pytest.raises(CacheInUse):
        ChunkCache(tmp_path, max_bytes=100)
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(ClosedError):
        cache.get(_chunk("a")[0])
    ChunkCache(tmp_path, max_bytes=100).close()


def test_threads_share_one_cache_consistently(tmp_path: Path) -> None:
    chunks = [_chunk(f"t{i}", 100 + i) for i in range(40)]
    errors: list[BaseException] = []
    with ChunkCache(tmp_path, max_bytes=2000) as cache:

        def worker(seed: int) -> None:
            try:
                for i in range(200):
                    d, data = chunks[(seed * 7 + i) % len(chunks)]
                    got = cache.get(d)
                    if got is None:
                        cache.put(d, data)
                    else:
                        assert got == data
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert cache.statistics().evictions > 0
        _assert_consistent(cache)


# -- single flight ------------------------------------------------------------------------


class _Fetcher:
    """A scripted fetch: counts calls, waits for `gate`, then answers `result`."""

    def __init__(self, result: bytes | BaseException) -> None:
        self.result = result
        self.calls = 0
        self.gate = trio.Event()

    async def __call__(self) -> bytes:
        self.calls += 1
        await self.gate.wait()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    for _ in range(10_000):
        if cond():
            return
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0)
    raise AssertionError("condition never became true")


def _waiting(cache: ChunkCache, d: Digest) -> int:
    flight = cache._flights.get(d)
    return 0 if flight is None else flight.done.statistics().tasks_waiting


async def _readers(cache: ChunkCache, d: Digest, fetch: _Fetcher, n: int) -> list[object]:
    results: list[object] = []

    async def read() -> None:
        try:
            results.append(await cache.get_or_fetch(d, fetch, what=f"chunk {d}"))
        except Exception as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(read)
        await _until(lambda: _waiting(cache, d) == n - 1)
        fetch.gate.set()
    return results


async def test_concurrent_readers_share_one_fetch(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    fetch = _Fetcher(data)
    assert await _readers(cache, d, fetch, 10) == [data] * 10
    assert fetch.calls == 1
    assert d in cache
    assert await cache.get_or_fetch(d, fetch) == data
    assert fetch.calls == 1
    st = cache.statistics()  # the leader missed; the last read hit
    assert st.misses >= 1 and st.hits >= 1


async def test_bad_bytes_fail_every_reader_and_are_not_stored(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    fetch = _Fetcher(b"evil" + data)
    results = await _readers(cache, d, fetch, 5)
    assert fetch.calls == 1
    assert all(isinstance(r, DataLoss) for r in results)
    assert d not in cache
    _assert_consistent(cache)
    fetch.result = data  # the next read fetches again
    assert await cache.get_or_fetch(d, fetch) == data
    assert fetch.calls == 2


async def test_failed_fetch_is_shared_then_retried(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    fetch = _Fetcher(Unavailable("registry down"))
    results = await _readers(cache, d, fetch, 4)
    assert all(isinstance(r, Unavailable) for r in results)
    fetch.result = data
    assert await cache.get_or_fetch(d, fetch) == data
    assert fetch.calls == 2


async def test_waiter_takes_over_when_the_leader_is_cancelled(cache: ChunkCache) -> None:
    d, data = _chunk("a")
    fetch = _Fetcher(data)
    got: list[bytes] = []

    async def waiter() -> None:
        got.append(await cache.get_or_fetch(d, fetch))

    async with trio.open_nursery() as nursery:
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await cache.get_or_fetch(d, fetch)

        nursery.start_soon(leader)
        await _until(lambda: fetch.calls == 1)
        nursery.start_soon(waiter)
        await _until(lambda: _waiting(cache, d) == 1)
        leader_scope.cancel()
        await _until(lambda: fetch.calls == 2)
        fetch.gate.set()
    assert got == [data]
    assert cache.statistics().in_flight == 0


@pytest.mark.allow_log_errors
async def test_verified_bytes_are_served_even_if_the_disk_refuses_them(cache, caplog) -> None:
    d, data = _chunk("a")
    (cache.root / "sha256").mkdir(exist_ok=True)
    (cache.root / "sha256" / d.hex[:2]).write_bytes(b"a file where a directory belongs")
    fetch = _Fetcher(data)
    fetch.gate.set()
    assert await cache.get_or_fetch(d, fetch) == data
    assert d not in cache
    assert "cannot store" in caplog.text
    assert list((cache.root / "tmp").iterdir()) == []
