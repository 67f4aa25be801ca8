"""Chunks of one remote eStargz blob, served through the shared chunk cache.

This module turns a plain async `fetch_range(start, end)` into verified chunk bytes; it
knows nothing of HTTP (the caller binds the registry client) nor of files (fs/ asks for
`Chunk`s from the TOC).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import trio

from snapshotter import metrics
from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, InvalidArgument, LazysnapError, Unavailable
from snapshotter.format.estargz import extract_chunk
from snapshotter.format.toc import Chunk
from snapshotter.remote import _ranges
from snapshotter.remote._ranges import SharedRange

__all__ = [
    "BlobStatistics",
    "ChunkFetchTimeout",
    "ChunkOutOfRange",
    "DemandGauge",
    "FetchRange",
    "FetchRanges",
    "Purpose",
    "RangeReader",
    "RemoteBlob",
    "ShortRead",
]

log = logging.getLogger(__name__)

FetchRange = Callable[[int, int], Awaitable[bytes]]
"""`await fetch_range(start, end)` -> bytes [start, end) of the blob (end exclusive)."""

FetchRanges = Callable[[Sequence[tuple[int, int]]], Awaitable[list[bytes]]]
"""`await fetch_ranges([(start, end), ...])` -> the bytes of each range, in one request."""


Purpose = Literal["demand", "prefetch", "background"]
"""Why a read happens: a reader is waiting, startup prefetch, or background completion."""

FETCH_PURPOSE: contextvars.ContextVar[Purpose | Literal["toc"]] = contextvars.ContextVar(
    "lazysnap_fetch_purpose", default="demand"
)
"""Why the range request being made now is made, for a `FetchRange` to read (the per-host
pool lets TOC fetches go first, `remote/warm.py`): set around the request by the blob
(its read's purpose) and by the TOC load ("toc"), so fetch functions keep their
`(start, end)` signature."""


class RangeReader:
    """A `FetchRange` that can also fetch several ranges of its blob in one request, while
    `usable()` says the source answers such requests (the registry client learns it)."""

    def __init__(self, one: FetchRange, many: FetchRanges, usable: Callable[[], bool]) -> None:
        self.one, self.many, self.usable = one, many, usable

    async def __call__(self, start: int, end: int) -> bytes:
        return await self.one(start, end)


class ChunkFetchTimeout(Unavailable):
    """A chunk did not arrive within the blob's fetch timeout."""


class ChunkOutOfRange(InvalidArgument):
    """A chunk's compressed extent is not inside the blob."""


class ShortRead(DataLoss):
    """The source answered a range with the wrong number of bytes."""


@dataclass(frozen=True, slots=True)
class BlobStatistics:
    blob_size: int
    reads: int  # chunk reads answered (successfully)
    cache_hits: int  # of those, answered without a fetch by this blob
    chunks_fetched: int  # chunks this blob fetched, verified and stored
    fetches: int  # range requests made
    bytes_fetched: int  # compressed bytes received, all purposes
    failures: int  # chunk reads that raised
    bytes_on_demand: int = 0  # of bytes_fetched: for readers waiting
    bytes_prefetch: int = 0  # ... for startup prefetch
    bytes_background: int = 0  # ... for background completion
    demand_waits: int = 0  # on-demand reads that had to wait for the network
    demand_fetches: int = 0  # range requests made for them (a wait may join a prefetch's)


class DemandGauge:
    """On-demand reads waiting on the network, across every blob that shares the gauge.

    Background work calls `wait_quiet(q)` between requests: it returns once no reader
    has been waiting for `q` seconds, so background fetches never compete with readers
    for the connection pool for long.
    """

    def __init__(self) -> None:
        self.waiting = 0
        self._last_busy = -math.inf
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def enter(self) -> None:
        self.waiting += 1
        self._notify()

    def leave(self) -> None:
        self.waiting -= 1
        self._last_busy = trio.current_time()
        self._notify()

    async def wait_quiet(self, quiet: float) -> None:
        while True:
            if self.waiting == 0:
                remaining = self._last_busy + quiet - trio.current_time()
                if remaining <= 0:
                    return
                with trio.move_on_after(remaining):
                    await self._changed.wait()
            else:
                await self._changed.wait()


class RemoteBlob:
    """Reads `Chunk`s of one blob: cache hit, else fetch, extract, verify, store.

    Implements fs/'s ChunkReader protocol (`await read_chunk(chunk) -> bytes`). A chunk's
    bytes are returned only after they matched `chunk.digest`; bytes that do not match
    raise DataLoss and are neither returned nor cached. Readers of one digest share one
    fetch, also across blobs that share `cache` (chunks are deduplicated by content).
    Every read is bounded by `fetch_timeout` seconds (ChunkFetchTimeout, an Unavailable);
    a failed read leaves nothing behind, so the next read tries again. On-demand reads
    that miss the cache are counted on `demand` (shared by the daemon's blobs) so that
    background fetching can make way for them.

    `fetch_range(start, end)` returns bytes [start, end) of the blob and raises error
    categories (the registry client translates its own errors). `name` appears in errors.

        blob = RemoteBlob(partial(client.read_blob_range, ref, digest), cache,
                          blob_size=size, name=str(digest))
        data = await blob.read_chunk(entry.chunks[0])
        parts = await blob.read_chunks(entry.chunks)  # adjacent chunks in one request
    """

    def __init__(
        self,
        fetch_range: FetchRange,
        cache: ChunkCache,
        *,
        blob_size: int,
        fetch_timeout: float = 30.0,
        name: str = "blob",
        demand: DemandGauge | None = None,
    ) -> None:
        if blob_size < 0:
            raise InvalidArgument(f"{name}: negative blob size {blob_size}")
        self._fetch_range = fetch_range
        self._reader = fetch_range if isinstance(fetch_range, RangeReader) else None
        self.cache = cache
        self.blob_size = blob_size
        self.fetch_timeout = fetch_timeout
        self.name = name
        self.demand = demand
        self._reads = self._hits = self._chunks_fetched = 0
        self._fetches = self._failures = self._demand_waits = self._demand_fetches = 0
        self._bytes: dict[str, int] = {"demand": 0, "prefetch": 0, "background": 0}

    def statistics(self) -> BlobStatistics:
        return BlobStatistics(
            blob_size=self.blob_size,
            reads=self._reads,
            cache_hits=self._hits,
            chunks_fetched=self._chunks_fetched,
            fetches=self._fetches,
            bytes_fetched=sum(self._bytes.values()),
            failures=self._failures,
            bytes_on_demand=self._bytes["demand"],
            bytes_prefetch=self._bytes["prefetch"],
            bytes_background=self._bytes["background"],
            demand_waits=self._demand_waits,
            demand_fetches=self._demand_fetches,
        )

    async def read_chunk(self, chunk: Chunk) -> bytes:
        """The verified uncompressed bytes of `chunk`."""
        return (await self.read_chunks([chunk]))[0]

    async def read_cached(self, chunk: Chunk, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of `chunk` if the cache holds it, else None.

        A chunk the cache has verified in this process is read with one `pread` right
        here, on the caller's (FUSE) thread: handing it to a worker thread and back costs
        more than the read (measured: 4 KiB random reads at 1,300/s through a thread,
        2,700/s inline, 8,500/s native). The price is that a stalled local disk stalls
        the mount, as it stalls every other reader of that disk. The first read of a
        chunk in a process hashes it whole, which happens in a worker thread.
        """
        self._check(chunk)
        digest = _parse_digest(chunk.digest, self.name)
        if digest not in self.cache:
            return None
        if self.cache.verified(digest):
            data = self.cache.read_range(digest, start, end)
        else:
            data = await self.cache.aread_range(digest, start, end)
        if data is not None:
            self._reads += 1
            self._hits += 1
        return data

    async def read_chunks(
        self,
        chunks: Sequence[Chunk],
        *,
        purpose: Purpose = "demand",
        along: Sequence[Chunk] = (),
    ) -> list[bytes]:
        """The verified bytes of each chunk, in order; missing neighbours share one request.

        Chunks whose compressed extents touch or overlap are fetched with a single range
        request (up to `_ranges.COALESCE_LIMIT` bytes). The whole call is bounded by
        `fetch_timeout`. `purpose` only sorts the statistics and decides whether the read
        counts as demand.

        `along`: chunks that follow the last requested one in the blob (in blob order),
        worth taking in the same request because a reader that wants one file soon wants
        its neighbours (an `import` walks a package's files in archive order) and on a
        long round trip a few more kilobytes cost nothing. The request is extended over
        them up to the first one that is cached or being fetched already (so no byte is
        fetched twice); they are verified and cached, not returned, and one that fails
        only costs a log line.
        """
        unique: dict[str, Chunk] = {}
        for chunk in chunks:
            self._check(chunk)
            unique.setdefault(chunk.digest, chunk)
        digests = {text: _parse_digest(text, self.name) for text in unique}
        # Plan ranges only for chunks not already stored; in-flight ones are joined by
        # get_or_fetch without calling our fetch, so planning them costs nothing.
        missing = [c for t, c in unique.items() if digests[t] not in self.cache]
        planned = _ranges.plan(missing, self, purpose)
        extra = self._extend(planned[-1], along, unique) if planned and along else []
        if len(planned) > 1 and self._reader is not None and self._reader.usable():
            _ranges.group(planned)
        ranges = {c.digest: r for r in planned for c in r.chunks}

        results: dict[str, bytes] = {}
        errors: list[BaseException] = []

        async def take(chunk: Chunk) -> bytes:
            """The chunk through the cache, fetched from its planned range if missing."""
            source = ranges.get(chunk.digest) or SharedRange(
                self, chunk.offset, chunk.end, [chunk], purpose
            )
            fetched = False

            async def fetch() -> bytes:
                nonlocal fetched
                member = await source.member(chunk)
                fetched = True
                return member

            data = await self.cache.get_or_fetch(
                _parse_digest(chunk.digest, self.name), fetch, what=self._what(chunk),
                prepare=functools.partial(_extract, chunk=chunk, name=self.name),
            )  # fmt: skip
            if fetched:
                self._chunks_fetched += 1
            else:
                self._hits += 1
            return data

        async def one(text: str, chunk: Chunk) -> None:
            try:
                results[text] = await take(chunk)
            except Exception as exc:
                errors.append(exc)

        async def alongside(chunk: Chunk) -> None:
            try:
                await take(chunk)
            except LazysnapError as exc:
                log.warning("%s: neighbour fetched along failed: %s", self._what(chunk), exc)

        waits = purpose == "demand" and bool(missing)
        gauge = self.demand if waits else None
        self._demand_waits += waits
        if gauge is not None:
            gauge.enter()
        try:
            with trio.fail_after(self.fetch_timeout):
                async with trio.open_nursery() as nursery:
                    for text, chunk in unique.items():
                        nursery.start_soon(one, text, chunk)
                    for chunk in extra:
                        nursery.start_soon(alongside, chunk)
        except trio.TooSlowError:
            self._failures += len(chunks)
            what = self._what(chunks[0]) if len(chunks) == 1 else f"{self.name}: chunks"
            raise ChunkFetchTimeout(f"{what}: not fetched within {self.fetch_timeout}s") from None
        finally:
            if gauge is not None:
                gauge.leave()
        if errors:
            self._failures += len(chunks)
            raise errors[0]
        self._reads += len(chunks)
        return [results[c.digest] for c in chunks]

    # -- internals ----------------------------------------------------------------------

    def _extend(
        self, last: SharedRange, along: Sequence[Chunk], taken: dict[str, Chunk]
    ) -> list[Chunk]:
        """Grow `last` over the chunks of `along` that follow it and nobody has yet."""
        extra: dict[str, Chunk] = {}
        for chunk in along:
            if chunk.end <= last.end or chunk.offset < last.end:
                continue  # inside (or overlapping) the range already
            if chunk.end - last.start > _ranges.COALESCE_LIMIT or chunk.end > self.blob_size:
                break
            if chunk.digest in taken or chunk.digest in extra:
                break
            if self.cache.has_or_fetching(_parse_digest(chunk.digest, self.name)):
                break
            last.end = chunk.end
            last.chunks.append(chunk)
            extra[chunk.digest] = chunk
        return list(extra.values())

    def _what(self, chunk: Chunk) -> str:
        return f"{self.name}: chunk {chunk.digest} at [{chunk.offset}, {chunk.end})"

    def _check(self, chunk: Chunk) -> None:
        if not 0 <= chunk.offset < chunk.end <= self.blob_size:
            raise ChunkOutOfRange(
                f"{self._what(chunk)}: outside the blob of {self.blob_size} bytes"
            )

    async def fetch(self, start: int, end: int, purpose: Purpose) -> bytes:
        """One counted request for [start, end) (`_ranges.SharedRange` calls it)."""
        async def one() -> list[bytes]:
            return [await self._fetch_range(start, end)]

        return (await self._request([(start, end)], purpose, one))[0]

    async def fetch_many(self, ranges: list[tuple[int, int]], purpose: Purpose) -> list[bytes]:
        """One counted multi-range request (`_ranges.RangeGroup` calls it)."""
        assert self._reader is not None
        return await self._request(ranges, purpose, functools.partial(self._reader.many, ranges))

    async def _request(
        self, ranges: list[tuple[int, int]], purpose: Purpose,
        fetch: Callable[[], Awaitable[list[bytes]]],
    ) -> list[bytes]:  # fmt: skip
        """One request for `ranges`, counted, timed and checked: each answer must be
        exactly its range's length (ShortRead otherwise)."""
        self._fetches += 1
        self._demand_fetches += purpose == "demand"
        started = time.perf_counter()
        token = FETCH_PURPOSE.set(purpose)
        try:
            parts = await fetch()
        except Exception:
            metrics.count_fetch_error(purpose)
            raise
        finally:
            FETCH_PURPOSE.reset(token)
        got = sum(len(p) for p in parts)
        metrics.observe_fetch(purpose, got, time.perf_counter() - started)
        self._bytes[purpose] += got
        for (start, end), data in zip(ranges, parts, strict=True):
            if len(data) != end - start:
                raise ShortRead(
                    f"{self.name}: range [{start}, {end}) answered with {len(data)} bytes"
                )
        return parts


def _extract(member: bytes, *, chunk: Chunk, name: str) -> bytes:
    try:
        return extract_chunk(member, chunk)
    except DataLoss:
        raise
    except (LazysnapError, EOFError, ValueError) as exc:
        # The TOC was verified, so bytes that do not inflate as it says were damaged.
        raise DataLoss(
            f"{name}: chunk {chunk.digest} at [{chunk.offset}, {chunk.end}): {exc}"
        ) from exc


def _parse_digest(text: str, name: str) -> Digest:
    try:
        return _digest(text)
    except InvalidArgument:
        raise InvalidArgument(f"{name}: chunk digest {text!r} is not a digest") from None


@functools.lru_cache(maxsize=4096)
def _digest(text: str) -> Digest:
    # Parsed on every cached read; the same few digests come back again and again.
    return Digest.parse(text)
