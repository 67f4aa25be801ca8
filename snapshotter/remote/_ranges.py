"""A read's missing chunks planned as few range requests, each shared by its chunks.

Chunks whose compressed extents touch merge into one range (`plan`); small ranges that do
not touch go together in one multi-range request (`group`). Each request is made once, on
the first chunk's need, and every chunk (and every concurrent reader of it) takes its
slice of the answer. Kept apart from `remote/blob.py`, which counts and checks the
requests (`RangeSource`), for size.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import trio

from snapshotter.errors import Unavailable, category
from snapshotter.format.toc import Chunk

if TYPE_CHECKING:
    from snapshotter.remote.blob import Purpose

__all__ = [
    "COALESCE_LIMIT", "GROUP_BYTES", "GROUP_RANGES", "Once", "RangeGroup", "RangeSource",
    "SharedRange", "group", "plan",
]  # fmt: skip

T = TypeVar("T")

COALESCE_LIMIT = 16 << 20  # one Range GET never asks for more than this (unless one chunk does)
# Ranges that do not touch go in one multi-range request up to these bounds: the answer is
# read whole before any of its chunks is served, so a request stays small (one round trip
# on a 100 Mbit/s link with 20 ms is ~250 KB) and large ranges keep a request each.
GROUP_BYTES = 1 << 20
GROUP_RANGES = 64


class RangeSource(Protocol):
    """What the ranges are fetched from (`RemoteBlob`): one request per call."""

    name: str

    async def fetch(self, start: int, end: int, purpose: Purpose) -> bytes: ...

    async def fetch_many(
        self, ranges: list[tuple[int, int]], purpose: Purpose
    ) -> list[bytes]: ...


class Once(Generic[T]):
    """A fetch made on the first need and shared: later callers wait for its result, or
    get its failure as its error category (Unavailable when it has none)."""

    def __init__(self) -> None:
        self._done: trio.Event | None = None
        self._ok = False
        self._result: T | None = None
        self._error: BaseException | None = None

    async def get(self, fetch: Callable[[], Awaitable[T]], failed: str) -> T:
        if self._done is None:
            self._done = trio.Event()
            try:
                self._result = await fetch()
                self._ok = True
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._done.set()
        else:
            await self._done.wait()
        if not self._ok:
            cat = category(self._error) if self._error is not None else None
            raise (cat or Unavailable)(f"{failed}: {self._error}") from self._error
        return self._result  # type: ignore[return-value]


class SharedRange:
    """One range request whose bytes feed several chunks; fetched once, on first need."""

    def __init__(
        self, blob: RangeSource, start: int, end: int, chunks: list[Chunk], purpose: Purpose
    ) -> None:
        self.blob = blob
        self.purpose = purpose
        self.start = start
        self.end = end
        self.chunks = chunks
        self.group: RangeGroup | None = None  # fetched with other ranges in one request
        self._once: Once[bytes] = Once()

    async def _fetch(self) -> bytes:
        if self.group is not None:
            return await self.group.get(self)
        return await self.blob.fetch(self.start, self.end, self.purpose)

    async def member(self, chunk: Chunk) -> bytes:
        """The compressed bytes of `chunk`; the cache inflates them (`blob._extract`) in the
        worker thread that verifies them, off the trio thread that serves FUSE."""
        failed = f"{self.blob.name}: range [{self.start}, {self.end}) failed"
        data = await self._once.get(self._fetch, failed)
        return data[chunk.offset - self.start : chunk.end - self.start]


class RangeGroup:
    """Ranges of one read fetched with one multi-range request, on the first need of any."""

    def __init__(self, members: list[SharedRange]) -> None:
        self.members = members
        self._once: Once[list[bytes]] = Once()

    async def get(self, member: SharedRange) -> bytes:
        first = self.members[0]
        ranges = [(r.start, r.end) for r in self.members]
        failed = f"{member.blob.name}: ranges with [{member.start}, {member.end}) failed"
        parts = await self._once.get(
            functools.partial(first.blob.fetch_many, ranges, first.purpose), failed
        )
        return parts[self.members.index(member)]


def group(ranges: list[SharedRange]) -> None:
    """Put small ranges (in blob order) together, a group per request; a range of
    GROUP_BYTES or more goes alone and ends the group before it."""
    groups: list[list[SharedRange]] = [[]]
    size = 0
    for r in ranges:
        n = r.end - r.start
        if n >= GROUP_BYTES:
            groups.append([])
            size = 0
            continue
        if size + n > GROUP_BYTES or len(groups[-1]) >= GROUP_RANGES:
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += n
    for members in groups:
        if len(members) > 1:
            shared = RangeGroup(members)
            for member in members:
                member.group = shared


def plan(chunks: list[Chunk], blob: RangeSource, purpose: Purpose) -> list[SharedRange]:
    """Group chunks into as few ranges as possible: touching extents merge."""
    ranges: list[SharedRange] = []
    for chunk in sorted(chunks, key=lambda c: (c.offset, c.end)):
        last = ranges[-1] if ranges else None
        if (
            last is not None
            and chunk.offset <= last.end
            and max(last.end, chunk.end) - last.start <= COALESCE_LIMIT
        ):
            last.end = max(last.end, chunk.end)
            last.chunks.append(chunk)
        else:
            ranges.append(SharedRange(blob, chunk.offset, chunk.end, [chunk], purpose))
    return ranges
