"""Startup prefetch of one layer: which bytes to fetch before they are asked for, and
fetching them in a few large requests through the layer's `RemoteBlob`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from snapshotter.errors import LazysnapError
from snapshotter.format.toc import Chunk, Toc
from snapshotter.remote import blob as _blob
from snapshotter.remote.blob import RemoteBlob

__all__ = ["PrefetchPlan", "PrefetchResult", "plan_prefetch", "prefetch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    """Fetch the chunks whose gzip members start inside compressed bytes [0, end)."""

    end: int
    chunks: tuple[Chunk, ...]  # one per digest, by blob offset
    reason: str  # "landmark", "no-prefetch landmark", "size"


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    chunks: int  # chunks now in the cache
    failed: int  # chunks whose batch failed (left to on-demand reads)
    bytes_fetched: int  # compressed bytes this prefetch caused to be fetched


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
    seen: dict[str, Chunk] = {}
    for entry in toc.entries:
        for chunk in entry.chunks:
            if chunk.offset < end:
                seen.setdefault(chunk.digest, chunk)
    chunks = tuple(sorted(seen.values(), key=lambda c: (c.offset, c.inner_offset)))
    return PrefetchPlan(end=end, chunks=chunks, reason=reason)


async def prefetch(blob: RemoteBlob, plan: PrefetchPlan, *, parallel: int = 4) -> PrefetchResult:
    """Fetch `plan` into the cache, `parallel` requests at a time, first bytes first.

    Chunks are batched so that each batch is one coalesced range request and each is
    bounded by the blob's fetch timeout on its own. A prefetch is an optimisation: a
    failed batch is logged and left for on-demand reads, never raised.
    """
    before = blob.statistics().bytes_fetched
    limiter = trio.CapacityLimiter(max(1, parallel))
    done = failed = 0

    async def run(batch: list[Chunk]) -> None:
        nonlocal done, failed
        async with limiter:
            try:
                await blob.read_chunks(batch)
            except LazysnapError as exc:
                failed += len(batch)
                log.warning("%s: prefetch of %d chunks failed: %s", blob.name, len(batch), exc)
            else:
                done += len(batch)

    async with trio.open_nursery() as nursery:
        for batch in _batches(plan.chunks, _blob.COALESCE_LIMIT):
            nursery.start_soon(run, batch)
            # Yield so batches queue on the limiter in offset order.
            await trio.lowlevel.checkpoint()
    return PrefetchResult(
        chunks=done, failed=failed, bytes_fetched=blob.statistics().bytes_fetched - before
    )


def _batches(chunks: tuple[Chunk, ...], limit: int) -> list[list[Chunk]]:
    batches: list[list[Chunk]] = []
    start = 0
    for chunk in chunks:
        if batches and chunk.end - start <= limit:
            batches[-1].append(chunk)
        else:
            batches.append([chunk])
            start = chunk.offset
    return batches
