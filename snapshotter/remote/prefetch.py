"""Fetching a layer ahead of its readers: the startup prefetch (which bytes, fetched in a
few large requests) and background completion (the rest, politely), both through the
layer's `RemoteBlob`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from snapshotter.digest import Digest
from snapshotter.errors import LazysnapError
from snapshotter.format.toc import Chunk, Toc
from snapshotter.remote import _ranges
from snapshotter.remote.blob import DemandGauge, RemoteBlob

__all__ = [
    "BACKGROUND_BATCH",
    "PrefetchPlan",
    "PrefetchResult",
    "background_fetch",
    "blob_order",
    "missing_chunks",
    "plan_prefetch",
    "plan_whole_layer",
    "prefetch",
    "prefetch_steps",
]

BACKGROUND_BATCH = 4 << 20  # small enough that a waiting reader is never far behind

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    """Fetch the chunks whose gzip members start inside compressed bytes [0, end)."""

    end: int
    chunks: tuple[Chunk, ...]  # one per digest, by blob offset
    reason: str  # "landmark", "no-prefetch landmark", "size", "all", or the caller's own


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    chunks: int  # chunks now in the cache
    failed: int  # chunks whose batch failed (left to on-demand reads)
    bytes_fetched: int  # compressed bytes this prefetch caused to be fetched
    complete: bool = False  # every chunk it set out to fetch is in the cache


def blob_order(chunk: Chunk) -> tuple[int, int]:
    """Chunks in the order their bytes lie in the blob: adjacent ones merge into one
    range request."""
    return chunk.offset, chunk.inner_offset


def plan_prefetch(toc: Toc, *, size: int) -> PrefetchPlan:
    """What to prefetch, following eStargz conventions.

    `.no.prefetch.landmark` means nothing; `.prefetch.landmark` marks the end of the
    files the image's optimiser found are read at startup; otherwise the first `size`
    compressed bytes (the `stargz.prefetch` label or the configured default).
    """
    if toc.no_prefetch:
        end, reason = 0, "no-prefetch landmark"
    elif toc.prefetch_landmark is not None:
        end, reason = toc.prefetch_landmark, "landmark"
    else:
        end, reason = max(0, min(size, toc.toc_offset)), "size"
    return PrefetchPlan(end=end, chunks=_chunks_before(toc, end), reason=reason)


def plan_whole_layer(toc: Toc) -> PrefetchPlan:
    """Every chunk of the layer (`lazysnap prefetch --all`)."""
    return PrefetchPlan(
        end=toc.toc_offset, chunks=_chunks_before(toc, toc.toc_offset), reason="all"
    )


def _chunks_before(toc: Toc, end: int) -> tuple[Chunk, ...]:
    """One chunk per digest among those starting before `end`, by blob offset."""
    seen: dict[str, Chunk] = {}
    for chunk in toc.chunks():
        if chunk.offset < end:
            seen.setdefault(chunk.digest, chunk)
    return tuple(sorted(seen.values(), key=blob_order))


async def prefetch(blob: RemoteBlob, plan: PrefetchPlan, *, parallel: int = 4) -> PrefetchResult:
    """Fetch `plan` into the cache, `parallel` requests at a time, in the plan's order.

    Consecutive chunks of the plan are batched so that each batch is one coalesced range
    request (when they are adjacent in the blob), each bounded by the blob's fetch
    timeout on its own. A plan in first-access order (a learned profile) keeps its order.
    A prefetch is an optimisation: a failed batch is logged and left for on-demand reads,
    never raised.
    """
    return (await prefetch_steps([(blob, plan.chunks)], parallel=parallel))[blob]


async def prefetch_steps(
    steps: Sequence[tuple[RemoteBlob, Sequence[Chunk]]], *, parallel: int = 4
) -> dict[RemoteBlob, PrefetchResult]:
    """`prefetch` for several blobs sharing one order and one bound of `parallel`
    requests: the steps' batches start strictly in the given order (an image's profile
    interleaves its layers by first access). One result per blob."""
    blobs = list(dict.fromkeys(blob for blob, _ in steps))
    # Only the prefetch's own bytes: on-demand reads of the same blobs go on meanwhile.
    before = {blob: blob.statistics().bytes_prefetch for blob in blobs}
    done = dict.fromkeys(blobs, 0)
    failed = dict.fromkeys(blobs, 0)
    limiter = trio.CapacityLimiter(max(1, parallel))

    async def run(blob: RemoteBlob, batch: list[Chunk]) -> None:
        async with limiter:
            try:
                await blob.read_chunks(batch, purpose="prefetch")
            except LazysnapError as exc:
                failed[blob] += len(batch)
                log.warning("%s: prefetch of %d chunks failed: %s", blob.name, len(batch), exc)
            else:
                done[blob] += len(batch)

    async with trio.open_nursery() as nursery:
        for blob, chunks in steps:
            for batch in _batches(tuple(chunks), _ranges.COALESCE_LIMIT):
                nursery.start_soon(run, blob, batch)
                # Yield so batches queue on the limiter in order.
                await trio.lowlevel.checkpoint()
    return {blob: PrefetchResult(
        chunks=done[blob],
        failed=failed[blob],
        bytes_fetched=blob.statistics().bytes_prefetch - before[blob],
        complete=failed[blob] == 0,
    ) for blob in blobs}


def missing_chunks(blob: RemoteBlob, toc: Toc) -> list[Chunk]:
    """The layer's chunks not in the cache right now (one per digest, by blob offset)."""
    seen: dict[str, Chunk] = {}
    for chunk in toc.chunks():
        if chunk.digest not in seen and Digest.parse(chunk.digest) not in blob.cache:
            seen[chunk.digest] = chunk
    return sorted(seen.values(), key=blob_order)


async def background_fetch(
    blob: RemoteBlob,
    toc: Toc,
    *,
    quiet: float = 5.0,
    rate: float | None = None,
    batch_bytes: int = BACKGROUND_BATCH,
) -> PrefetchResult:
    """Fetch the rest of the layer into the cache, one modest request at a time.

    Before each request, wait until no on-demand read has been waiting (on the blob's
    DemandGauge) for `quiet` seconds; with `rate` (bytes per second) pace the requests
    so the average stays under it. Stops at the first failure (logged, not raised; a
    later run resumes where it stopped) and does nothing if the layer cannot fit in the
    cache at all, since it would only evict its own chunks. Cancel it to stop it.
    """
    gauge = blob.demand or DemandGauge()
    todo = missing_chunks(blob, toc)
    need = sum(c.size for c in todo)
    if need > blob.cache.max_bytes:
        log.info("%s: background fetch skipped: %d bytes exceed the cache", blob.name, need)
        return PrefetchResult(chunks=0, failed=0, bytes_fetched=0, complete=False)
    start_bytes = blob.statistics().bytes_background
    done = failed = 0
    batches = _batches(tuple(todo), batch_bytes)
    for i, batch in enumerate(batches):
        await gauge.wait_quiet(quiet)
        batch = [c for c in batch if Digest.parse(c.digest) not in blob.cache]
        if not batch:
            continue
        began = trio.current_time()
        before = blob.statistics().bytes_background
        try:
            await blob.read_chunks(batch, purpose="background")
        except LazysnapError as exc:
            failed = sum(len(b) for b in batches[i:])
            log.warning("%s: background fetch stopped: %s", blob.name, exc)
            break
        done += len(batch)
        if rate:
            got = blob.statistics().bytes_background - before
            await trio.sleep_until(began + got / rate)
    return PrefetchResult(
        chunks=done,
        failed=failed,
        bytes_fetched=blob.statistics().bytes_background - start_bytes,
        complete=failed == 0 and not missing_chunks(blob, toc),
    )


def _batches(chunks: tuple[Chunk, ...], limit: int) -> list[list[Chunk]]:
    batches: list[list[Chunk]] = []
    start = 0
    for chunk in chunks:
        if batches and start <= chunk.offset and chunk.end - start <= limit:
            batches[-1].append(chunk)
        else:
            batches.append([chunk])
            start = chunk.offset
    return batches
