"""Warming the shared chunk cache for whole images ahead of their containers
(`lazysnap prefetch`): resolve each image, plan each eStargz layer, fetch the plans.

Knows registries, TOCs and the cache; knows nothing of who asked (the daemon's control
socket or the command line when no daemon runs) nor how progress is shown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.errors import LazysnapError
from snapshotter.format.toc import Chunk
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.layer import load_toc
from snapshotter.remote.prefetch import PrefetchPlan, plan_prefetch, plan_whole_layer, prefetch
from snapshotter.remote.profile import Profile, plan_profile
from snapshotter.remote.warm import HostPool

__all__ = ["TOC_DIGEST_ANNOTATION", "ImagePrefetch", "PrefetchSummary", "prefetch_images"]

log = logging.getLogger("lazysnap.prefetch")

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
PROGRESS_INTERVAL = 0.2

FetchRange = Callable[[int, int], Awaitable[bytes]]
Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class PrefetchSummary:
    images: int
    layers: int  # eStargz layers planned
    skipped: int  # layers that are not eStargz (or whose TOC could not be read)
    bytes_fetched: int  # compressed bytes fetched now
    bytes_cached: int  # compressed bytes whose chunks were in the cache already
    bytes_over_quota: int  # compressed bytes left out: they would not fit in the cache
    failed_chunks: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass
class ImagePrefetch:
    """How `prefetch_images` reaches registries and reports: `fetcher(ref, digest)` gives
    a layer's `fetch_range` (the daemon passes its per-host pool), `on_event(event)` gets
    plain dicts: {"event": "layer", "image", "layer", "reason", "total", "cached"},
    {"event": "progress", "layer", "done"}, {"event": "layer-done", "layer", "fetched",
    "failed"}, {"event": "skip", "image", "layer", "reason"}."""

    client: RegistryClient
    cache: ChunkCache
    whole: bool = False  # every chunk, not just the startup plan
    size: int = 0  # startup plan size for layers without a landmark
    parallel: int = 4
    per_host: int = 16  # range requests in flight to one registry host, without `fetcher`
    timeout: float = 30.0
    max_toc_bytes: int = 64 << 20
    max_toc_entries: int = 1_000_000
    fetcher: Callable[[Reference, Digest], FetchRange] | None = None
    on_event: Callable[[Event], None] = lambda event: None
    # manifest digest -> its learned access profile, if any (snapshotter/profiles.py)
    profiles: Callable[[str], Profile | None] | None = None


@dataclass
class _Planned:
    image: str
    digest: Digest
    blob: RemoteBlob
    plan: PrefetchPlan
    total: int
    cached: int


async def prefetch_images(images: Sequence[str], how: ImagePrefetch) -> PrefetchSummary:
    """Fetch the startup plan (or, with `whole`, every chunk) of each image's layers.

    Idempotent: chunks in the cache are not fetched again. The cache quota holds: once
    the planned chunks would outgrow the cache, later layers' chunks are left out (and
    counted in `bytes_over_quota`) rather than evicting what was just fetched. Layers
    that are not eStargz are skipped and reported; a bad image name, an unknown image or
    an unreachable registry raise error categories.
    """
    began = time.monotonic()
    # Without the daemon's fetcher, range requests go as the daemon sends them: within a
    # per-host bound, and several ranges in one request where the registry answers those.
    fetcher = how.fetcher or partial(HostPool(how.per_host).blob_reader, how.client)
    refs = [Reference.parse(image) for image in images]
    planned: list[_Planned] = []
    skipped = over_quota = 0
    room = how.cache.max_bytes
    seen: set[str] = set()
    for image, ref in zip(images, refs, strict=True):
        manifest = await how.client.get_manifest(ref)
        profile = how.profiles(str(manifest.digest)) if how.profiles and not how.whole else None
        for desc in manifest.layers:
            if str(desc.digest) in seen:
                continue
            seen.add(str(desc.digest))
            item = await _plan(image, fetcher(ref, desc.digest), desc.digest, desc.size,
                               desc.annotations.get(TOC_DIGEST_ANNOTATION, ""), how, profile)
            if item is None:
                skipped += 1
                continue
            need = sum(c.size for c in item.plan.chunks if Digest.parse(c.digest) not in how.cache)
            if need > room:
                kept = _fit(item.plan.chunks, room, how.cache)
                over_quota += item.total - _extent(kept)
                item.plan = PrefetchPlan(item.plan.end, kept, item.plan.reason + " (quota)")
                item.total = _extent(kept)
                need = room
            room -= need
            planned.append(item)
            how.on_event({"event": "layer", "image": image, "layer": str(item.digest),
                          "reason": item.plan.reason, "total": item.total, "cached": item.cached})
    failed = 0

    async def one(item: _Planned) -> None:
        nonlocal failed
        result = await prefetch(item.blob, item.plan, parallel=how.parallel)
        failed += result.failed
        how.on_event({"event": "layer-done", "layer": str(item.digest),
                      "fetched": result.bytes_fetched, "failed": result.failed})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_report, planned, how)
        async with trio.open_nursery() as layers:
            for item in planned:
                layers.start_soon(one, item)
        nursery.cancel_scope.cancel()
    return PrefetchSummary(
        images=len(images), layers=len(planned), skipped=skipped,
        bytes_fetched=sum(p.blob.statistics().bytes_prefetch for p in planned),
        bytes_cached=sum(p.cached for p in planned), bytes_over_quota=over_quota,
        failed_chunks=failed, seconds=round(time.monotonic() - began, 3),
    )


async def _plan(
    image: str, fetch: FetchRange, digest: Digest, size: int, toc_digest: str,
    how: ImagePrefetch, profile: Profile | None = None,
) -> _Planned | None:
    name = f"layer {digest}"
    if not toc_digest:
        how.on_event({"event": "skip", "image": image, "layer": str(digest),
                      "reason": "no TOC digest annotation (not eStargz)"})
        return None
    try:
        toc = await load_toc(fetch, blob_size=size, toc_digest=Digest.parse(toc_digest),
                             max_toc_size=how.max_toc_bytes, max_entries=how.max_toc_entries,
                             timeout=how.timeout, name=name)
    except LazysnapError as exc:
        log.warning("%s of %s: not prefetched: %s", name, image, exc)
        how.on_event({"event": "skip", "image": image, "layer": str(digest), "reason": str(exc)})
        return None
    plan = plan_whole_layer(toc) if how.whole else plan_prefetch(toc, size=how.size)
    if profile is not None:  # what this image's containers read first, in that order
        learned = plan_profile(profile, str(digest), toc)
        plan = learned if learned.chunks else plan
    blob = RemoteBlob(fetch, how.cache, blob_size=size, fetch_timeout=how.timeout, name=name)
    cached = _extent([c for c in plan.chunks if Digest.parse(c.digest) in how.cache])
    return _Planned(image, digest, blob, plan, _extent(plan.chunks), cached)


def _extent(chunks: Sequence[Chunk]) -> int:
    """Compressed bytes of the gzip members behind `chunks` (members shared count once)."""
    return sum(end - start for start, end in {(c.offset, c.end) for c in chunks})


def _fit(chunks: tuple[Chunk, ...], room: int, cache: ChunkCache) -> tuple[Chunk, ...]:
    kept: list[Chunk] = []
    for chunk in chunks:
        if Digest.parse(chunk.digest) not in cache:
            if chunk.size > room:
                break
            room -= chunk.size
        kept.append(chunk)
    return tuple(kept)


async def _report(planned: list[_Planned], how: ImagePrefetch) -> None:
    last: dict[str, int] = {}
    while True:
        for item in planned:
            done = min(item.total, item.cached + item.blob.statistics().bytes_prefetch)
            if last.get(str(item.digest)) != done:
                last[str(item.digest)] = done
                how.on_event({"event": "progress", "layer": str(item.digest), "done": done})
        await trio.sleep(PROGRESS_INTERVAL)
