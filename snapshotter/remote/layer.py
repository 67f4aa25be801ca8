"""Resolve a remote eStargz layer: fetch its footer and TOC, verify the TOC, bundle its blob.

The TOC is checked against the `toc.digest` the image declares before anything is parsed
or served; format/ does the byte-level work, this module only fetches and decides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument, Unavailable
from snapshotter.format.estargz import (
    FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    InvalidFooter,
    parse_footer,
    parse_toc_member,
)
from snapshotter.format.toc import Toc
from snapshotter.remote.blob import (
    FETCH_PURPOSE,
    DemandGauge,
    FetchRange,
    RemoteBlob,
    ShortRead,
)
from snapshotter.remote.tocparse import TocParser
from snapshotter.remote.tocstore import TocStore

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "TAIL_BYTES",
    "FetchTail",
    "RemoteLayer",
    "TocDigestMissing",
    "TocFetchTimeout",
    "TocTooLarge",
    "load_toc",
    "open_layer",
]

DEFAULT_MAX_ENTRIES = 1 << 20
# The first request for a TOC asks for this much of the blob's end: the footer, and the
# whole TOC member of most layers (~45 compressed bytes per entry: up to ~1,400 entries),
# so one round trip instead of two; a larger member costs one more request for the rest.
# It wastes at most 64 KiB on a layer with a tiny TOC: 5 ms at 100 Mbit/s, a quarter of a
# 20 ms round trip.
TAIL_BYTES = 64 * 1024
# A suffix range: (last n bytes, blob size).
FetchTail = Callable[[int], Awaitable[tuple[bytes, int]]]
# Deflate may add a few bytes per block, and the member carries tar headers and the
# end-of-archive trailer besides the JSON.
_MEMBER_SLACK = 64 * 1024


class TocDigestMissing(InvalidArgument):
    """The layer declares no TOC digest and unverified layers are not allowed."""


class TocFetchTimeout(Unavailable):
    """The footer or the TOC did not arrive within the timeout."""


class TocTooLarge(InvalidArgument):
    """The TOC member is larger than the configured TOC size allows."""


@dataclass(frozen=True, slots=True)
class RemoteLayer:
    """A layer ready to serve: its validated TOC and the blob its chunks come from."""

    toc: Toc
    blob: RemoteBlob
    verified: bool  # False only when opened with allow_unverified and no digest


async def load_toc(
    fetch_range: FetchRange,
    *,
    blob_size: int | None,
    toc_digest: Digest | None,
    max_toc_size: int,
    fetch_tail: FetchTail | None = None,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    allow_unverified: bool = False,
    timeout: float = 30.0,
    name: str = "layer",
    toc_store: TocStore | None = None,
    parser: TocParser | None = None,
    build: Callable[[Toc], Any] | None = None,
) -> Any:
    """The validated TOC of the eStargz blob behind `fetch_range` (or `build(toc)`).

    The blob's last TAIL_BYTES first: the footer, and the whole TOC member when it is
    small; then what it lacks of the member, if anything. With `blob_size` None, that
    first request is `fetch_tail`'s suffix range, which tells the size as well (no HEAD).
    The TOC JSON must hash to `toc_digest` (DataLoss otherwise) before it is used. With
    no digest, raise TocDigestMissing unless `allow_unverified`. A blob that is not
    eStargz raises InvalidFooter, a malformed or hostile TOC InvalidTOC (both
    InvalidArgument: the caller falls back to a normal pull); the fetches together are
    bounded by `timeout` (TocFetchTimeout).

    To keep the TOC for restarts, pass `toc_store`: a verified TOC's member (as fetched,
    gzip, a fraction of the JSON) is written there and parsed back from the file, so
    the daemon does not hold it during the parse; nothing is kept if it fails. With a
    `parser` too, the parse runs in its worker process (tocparse.py).

    `build`, a function of the TOC (e.g. the layer's inode tree), runs right after the
    parse, where the parse ran (the worker, or a thread), and its result is returned
    instead of the TOC; what it raises is raised here.
    """
    if toc_digest is None and not allow_unverified:
        raise TocDigestMissing(f"{name}: no toc digest; refusing to serve an unverified layer")
    if blob_size is None and fetch_tail is None:
        raise ValueError("load_toc: neither blob_size nor fetch_tail")
    try:
        with trio.fail_after(timeout):
            if blob_size is None:
                assert fetch_tail is not None
                tail, blob_size = await _fetch_tail(fetch_tail, name)
            elif blob_size >= LEGACY_FOOTER_SIZE:
                tail = await _fetch(fetch_range, max(0, blob_size - TAIL_BYTES), blob_size, name)
            if blob_size < LEGACY_FOOTER_SIZE:
                raise InvalidFooter(f"{name}: not an eStargz layer: blob of {blob_size} bytes")
            toc_offset, footer_size = parse_footer(tail[-FOOTER_SIZE:], blob_size=blob_size)
            member_end = blob_size - footer_size
            limit = max_toc_size + max_toc_size // 100 + _MEMBER_SLACK
            if member_end - toc_offset > limit:
                raise TocTooLarge(
                    f"{name}: toc member is {member_end - toc_offset} bytes, "
                    f"over the limit for a toc of {max_toc_size} bytes"
                )
            tail_start = blob_size - len(tail)
            member = tail[max(0, toc_offset - tail_start) : member_end - tail_start]
            del tail
            if toc_offset < tail_start:
                member = await _fetch(fetch_range, toc_offset, tail_start, name) + member
    except trio.TooSlowError:
        raise TocFetchTimeout(f"{name}: toc not fetched within {timeout}s") from None

    held = [member]  # only here, so that the store can let go of it
    del member
    what = f"{name}: toc"
    if toc_store is not None and toc_digest is not None:
        # Without a running worker, a TocParser parses in a thread (`TocParser()`: never run).
        return await (parser or TocParser()).add(
            toc_store, toc_digest, held.pop(), toc_offset, blob_size=blob_size,
            max_size=max_toc_size, max_entries=max_entries, what=what, build=build,
        )  # fmt: skip

    def decode() -> Any:
        # Here the daemon pays the parse's peak (the JSON and the decoded entries, ~1.3 KB
        # an entry, for a moment): what the TOC worker spares it.
        toc = parse_toc_member(
            held.pop(), toc_digest=toc_digest, blob_size=blob_size, toc_offset=toc_offset,
            max_size=max_toc_size, max_entries=max_entries, what=what,
        )  # fmt: skip
        return toc if build is None else build(toc)

    # Inflating, hashing and parsing a large TOC takes long enough to stall FUSE.
    return await trio.to_thread.run_sync(decode)


async def open_layer(
    fetch_range: FetchRange,
    cache: ChunkCache,
    *,
    blob_size: int,
    toc_digest: Digest | None,
    max_toc_size: int,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    allow_unverified: bool = False,
    fetch_timeout: float = 30.0,
    name: str = "layer",
    demand: DemandGauge | None = None,
) -> RemoteLayer:
    """`load_toc`, then a `RemoteBlob` over the same source and the shared cache."""
    toc = await load_toc(
        fetch_range,
        blob_size=blob_size,
        toc_digest=toc_digest,
        max_toc_size=max_toc_size,
        max_entries=max_entries,
        allow_unverified=allow_unverified,
        timeout=fetch_timeout,
        name=name,
    )
    blob = RemoteBlob(
        fetch_range,
        cache,
        blob_size=blob_size,
        fetch_timeout=fetch_timeout,
        name=name,
        demand=demand,
    )
    return RemoteLayer(toc=toc, blob=blob, verified=toc_digest is not None)


async def _fetch(fetch_range: FetchRange, start: int, end: int, name: str) -> bytes:
    token = FETCH_PURPOSE.set("toc")
    try:
        data = await fetch_range(start, end)
    finally:
        FETCH_PURPOSE.reset(token)
    if len(data) != end - start:
        raise ShortRead(f"{name}: range [{start}, {end}) answered with {len(data)} bytes")
    return data


async def _fetch_tail(fetch_tail: FetchTail, name: str) -> tuple[bytes, int]:
    token = FETCH_PURPOSE.set("toc")
    try:
        data, size = await fetch_tail(TAIL_BYTES)
    finally:
        FETCH_PURPOSE.reset(token)
    if len(data) != min(TAIL_BYTES, size):
        raise ShortRead(f"{name}: last {TAIL_BYTES} bytes of {size} answered with {len(data)}")
    return data, size
