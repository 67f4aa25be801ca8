"""The set of layers the repository mount shows, and the read path into their chunks.

Knows trees, inode numbering and `ChunkReader`s; knows nothing of pyfuse3 (`fs/ops.py`
adapts it) nor of where chunks come from (`remote/` implements `ChunkReader`).
"""

from __future__ import annotations

import itertools
import logging
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from snapshotter.errors import AlreadyExists, DataLoss, InvalidArgument, LazysnapError, NotFound
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.fs.tree import LayerTree

__all__ = [
    "REPOSITORY_ROOT",
    "AttachedLayer",
    "BatchChunkReader",
    "CachedChunkReader",
    "ChunkReader",
    "LayerExists",
    "LayerNotFound",
    "LayerStatistics",
    "ReadObserver",
    "Repository",
    "ShortChunk",
]

log = logging.getLogger(__name__)

REPOSITORY_ROOT = 1  # == pyfuse3.ROOT_INODE; the directory listing layer ids
_SLOT_SHIFT = 32  # global inode = slot << 32 | local inode
_LOCAL_MASK = (1 << _SLOT_SHIFT) - 1
_NAMED_SLOTS = 1 << 31  # slots below are decimal layer ids; counted slots start here
READAHEAD_TASKS = 8  # read-ahead requests in flight at once, all layers together
_SEQUENTIAL_FILES = 64  # files per layer whose last read end is remembered
_READAHEAD_TIMEOUT = 120.0  # the reader's own timeout normally ends it first


class ChunkReader(Protocol):
    """Where one layer's file contents come from.

    `await read_chunk(chunk)` returns the uncompressed bytes of `chunk`, exactly
    `chunk.size` of them, already checked against `chunk.digest`. It raises error
    categories from `snapshotter.errors` (DataLoss for bad bytes, Unavailable when the
    source is unreachable, ...). Concurrent calls for one chunk should share one fetch;
    the repository relies on that rather than serialising calls itself. The call may be
    cancelled (read timeout) and must stay usable afterwards.
    `remote.blob.RemoteBlob` is the production implementation.
    """

    async def read_chunk(self, chunk: Chunk) -> bytes: ...


class BatchChunkReader(ChunkReader, Protocol):
    """A ChunkReader that also reads several chunks at once, adjacent ones in one request.

    `await read_chunks(chunks, purpose=...)` returns each chunk's verified bytes, in order;
    `purpose` is "demand" for reads a reader waits on. The repository uses it when a read
    spans chunks and for read-ahead; plain ChunkReaders are asked chunk by chunk.
    """

    async def read_chunks(self, chunks: Sequence[Chunk], *, purpose: str = ...) -> list[bytes]:
        ...


class CachedChunkReader(ChunkReader, Protocol):
    """A ChunkReader with a local cache it can read part of a chunk from.

    `await read_cached(chunk, start, end)` returns bytes [start, end) of the chunk's
    verified content if it is at hand locally, else None (the repository then asks
    `read_chunk`). It must be cheap: the cached read path of a FUSE read is one call.
    """

    async def read_cached(self, chunk: Chunk, start: int, end: int) -> bytes | None: ...


ReadObserver = Callable[[Entry, Chunk], None]
"""`observer(entry, chunk)`: a reader asked for `chunk` of `entry`; must not block or raise."""


class LayerExists(AlreadyExists):
    """A layer with this id is attached already."""


class LayerNotFound(NotFound):
    """No layer with this id is attached."""


class ShortChunk(DataLoss):
    """A ChunkReader returned the wrong number of bytes for a chunk."""


@dataclass(frozen=True, slots=True)
class LayerStatistics:
    layer_id: str
    inodes: int
    size: int  # bytes of regular file content in the layer
    bytes_read: int  # bytes returned to the kernel by read requests
    chunks_read: int  # chunks asked of the layer's ChunkReader
    memo_hits: int  # chunks served from the repository's in-memory memo instead
    cache_hits: int  # chunk pieces read straight from the reader's local cache
    read_errors: int  # read requests that failed (error or timeout)
    open_files: int
    readahead_chunks: int = 0  # chunks asked for ahead of sequential readers


class AttachedLayer:
    """One attached layer: its tree, reader, inode slot and counters (for fs/ops.py)."""

    __slots__ = (
        "bytes_read",
        "cache_hits",
        "chunks_read",
        "generation",
        "layer_id",
        "memo_hits",
        "observer",
        "open_files",
        "read_errors",
        "readahead_chunks",
        "reader",
        "sequential",
        "slot",
        "tree",
    )

    def __init__(
        self, layer_id: str, slot: int, tree: LayerTree, reader: ChunkReader, generation: int = 0
    ) -> None:
        self.layer_id = layer_id
        self.slot = slot
        self.generation = generation
        self.tree = tree
        self.reader = reader
        self.bytes_read = self.chunks_read = self.memo_hits = self.cache_hits = 0
        self.read_errors = self.open_files = self.readahead_chunks = 0
        # Told of every chunk a reader asks for (not read-ahead), e.g. to learn a profile.
        self.observer: ReadObserver | None = None
        # Where the last reads of recently read files ended, to spot sequential readers.
        self.sequential: OrderedDict[str, int] = OrderedDict()

    def ino(self, local: int) -> int:
        return self.slot << _SLOT_SHIFT | local

    def statistics(self) -> LayerStatistics:
        return LayerStatistics(
            layer_id=self.layer_id,
            inodes=len(self.tree),
            size=self.tree.total_size,
            bytes_read=self.bytes_read,
            chunks_read=self.chunks_read,
            memo_hits=self.memo_hits,
            cache_hits=self.cache_hits,
            read_errors=self.read_errors,
            open_files=self.open_files,
            readahead_chunks=self.readahead_chunks,
        )


class Repository:
    """The layers shown under the repository mount, `<mount>/<layer_id>/`.

    Lifecycle: create it, hand it to `fs.mount.run_repository`, then `attach` and
    `detach` layers at any time, mounted or not. A layer id is a short string that is a
    valid file name (the daemon uses snapshot ids such as "12").

    Threading: every method must run in the trio thread that serves the mount (all state
    is plain dicts that the FUSE handlers read without locks). From another thread:
    `trio.from_thread.run_sync(repo.attach, "12", tree, reader, trio_token=token)`.
    Build the `LayerTree` in that other thread first (`LayerTree.from_toc` takes a
    while for big layers); passing a `Toc` builds it in the trio thread.

    Inodes: the mount root is 1; a layer's inode is `slot << 32 | local inode`. A layer id
    that is a decimal number below 2**31 is its own slot, so a daemon that takes over a
    mount from its predecessor (`fs.mount.run_repository` with a holder) answers the
    kernel's old inode numbers after attaching the same layers under the same ids; other
    ids get slots from 2**31 up. Within a process slots are not reused. Across processes
    an id may come back with other contents: `generation` (a 32-bit number the caller
    derives from the contents, e.g. the layer digest) then differs, and the kernel
    drops what it cached for the old inodes instead of mixing the two layers.

    Reads: `read(layer, entry, off, size)` maps a byte range onto the entry's chunks and
    serves each chunk's part from, in order: a memo of recently fetched whole chunks
    shared by all layers (keyed by digest, `memo_bytes` in total), the reader's local
    cache when it is a CachedChunkReader (just the part, no decompression, no hashing),
    else the reader itself (all missing chunks in one `read_chunks` call when it is a
    BatchChunkReader, so adjacent chunks cost one request; else concurrently, chunk by
    chunk). Fetched chunks enter the memo because the kernel reads a freshly fetched
    chunk in 128 KiB requests right after.

    Read-ahead: when a read starts where the previous read of the same file ended, the
    next `readahead_bytes` of that file's chunks are fetched in a background task (one
    coalesced request for a BatchChunkReader) into the memo, so a streaming reader finds
    the next chunk there. The read itself never waits for read-ahead; at most
    READAHEAD_TASKS run at once, and a failed one is only logged (the read that needs
    the chunk then asks again and gets the error).

        repo = Repository()
        repo.attach("12", LayerTree.from_toc(toc), blob)
        repo.layer_ids()          # ["12"]
        repo.statistics("12")     # LayerStatistics(...)
        repo.detach("12")
    """

    def __init__(
        self, *, memo_bytes: int = 32 << 20, readahead_bytes: int = 0, fetch_window: int = 0
    ) -> None:
        self._layers: dict[str, AttachedLayer] = {}
        self._by_slot: dict[int, AttachedLayer] = {}
        self._retired: set[int] = set()  # detached named slots: never given out again
        self._slots = itertools.count(_NAMED_SLOTS)
        self._memo: OrderedDict[str, bytes] = OrderedDict()
        self._memo_size = 0
        self._memo_max = memo_bytes
        self.readahead_bytes = readahead_bytes
        self.fetch_window = fetch_window
        # Digests a read-ahead task is fetching -> set when it ends: a reader that catches
        # up waits for it instead of asking for the same chunk again.
        self._ahead: dict[str, trio.Event] = {}
        self._ahead_tasks = 0
        self.changed_ns = time.time_ns()  # the root directory's mtime: last attach/detach

    # -- attach/detach ---------------------------------------------------------------

    def attach(
        self, layer_id: str, tree: LayerTree | Toc, reader: ChunkReader, *, generation: int = 0
    ) -> None:
        """Show `tree` as `<mount>/<layer_id>/`; raises LayerExists or InvalidArgument."""
        if not layer_id or "/" in layer_id or layer_id in (".", "..") or "\0" in layer_id:
            raise InvalidArgument(f"layer id {layer_id!r} is not a valid file name")
        if layer_id in self._layers:
            raise LayerExists(f"layer {layer_id!r} is attached already")
        if not 0 <= generation < 1 << 32:  # the kernel keeps 32 bits and compares all 64
            raise InvalidArgument(f"layer {layer_id!r}: generation {generation} is not 32-bit")
        if isinstance(tree, Toc):
            tree = LayerTree.from_toc(tree)
        slot = int(layer_id) if layer_id.isdecimal() and int(layer_id) < _NAMED_SLOTS else 0
        if slot in self._by_slot or slot in self._retired:
            slot = 0  # re-attached in this process: the kernel may cache the old inodes
        if not slot:
            slot = next(self._slots)
        layer = AttachedLayer(layer_id, slot, tree, reader, generation)
        self._layers[layer_id] = layer
        self._by_slot[layer.slot] = layer
        self.changed_ns = time.time_ns()
        log.debug("attached layer %s (slot %d, %d inodes)", layer_id, layer.slot, len(tree))

    def detach(self, layer_id: str) -> None:
        """Stop showing the layer; open files keep reading until released."""
        layer = self._layers.pop(layer_id, None)
        if layer is None:
            raise LayerNotFound(f"layer {layer_id!r} is not attached")
        del self._by_slot[layer.slot]
        self._retired.add(layer.slot)
        self.changed_ns = time.time_ns()
        log.debug("detached layer %s (slot %d)", layer_id, layer.slot)

    def layer_ids(self) -> list[str]:
        """Attached ids, oldest first."""
        return list(self._layers)

    def statistics(self, layer_id: str) -> LayerStatistics:
        layer = self._layers.get(layer_id)
        if layer is None:
            raise LayerNotFound(f"layer {layer_id!r} is not attached")
        return layer.statistics()

    # -- for fs/ops.py ----------------------------------------------------------------

    def layers(self) -> Sequence[AttachedLayer]:
        """Attached layers in slot order (a stable readdir order for the root)."""
        return [self._by_slot[slot] for slot in sorted(self._by_slot)]

    def layer(self, layer_id: str) -> AttachedLayer | None:
        return self._layers.get(layer_id)

    def resolve(self, ino: int) -> tuple[AttachedLayer, int] | None:
        """The attached layer and local inode behind a global inode, or None."""
        layer = self._by_slot.get(ino >> _SLOT_SHIFT)
        if layer is None:
            return None
        local = ino & _LOCAL_MASK
        if not 1 <= local <= len(layer.tree):
            return None
        return layer, local

    async def read(self, layer: AttachedLayer, entry: Entry, off: int, size: int) -> bytes:
        """Bytes [off, off+size) of a regular file, short only at end of file."""
        end = min(off + size, entry.size)
        if off >= end:
            return b""
        chunks = entry.chunks
        first = bisect_right(chunks, off, key=_chunk_offset) - 1
        last = bisect_right(chunks, end - 1, key=_chunk_offset) - 1
        if first < 0 or chunks[last].chunk_offset + chunks[last].size < end:
            raise ShortChunk(f"file {entry.name!r}: no chunk covers bytes [{off}, {end})")
        if self.readahead_bytes and self._is_sequential(layer, entry.name, off, end):
            self._read_ahead(layer, entry, last + 1)
        wanted = chunks[first : last + 1]
        if layer.observer is not None:
            for chunk in wanted:
                layer.observer(entry, chunk)
        await self._caught_up(wanted)
        cached = getattr(layer.reader, "read_cached", None)
        pieces: list[bytes | None] = []
        missing: list[Chunk] = []
        # The part of each chunk this read covers, in the chunk's own offsets.
        spans = [(max(off - c.chunk_offset, 0), min(end - c.chunk_offset, c.size))
                 for c in wanted]
        for chunk, (lo, hi) in zip(wanted, spans, strict=True):
            data = self._memo.get(chunk.digest)
            if data is not None:
                self._memo.move_to_end(chunk.digest)
                layer.memo_hits += 1
                pieces.append(data[lo:hi])
                continue
            if cached is not None:
                part = await cached(chunk, lo, hi)
                if part is not None:
                    if len(part) != hi - lo:
                        raise ShortChunk(f"file {entry.name!r}: chunk {chunk.digest} gave "
                                         f"{len(part)} bytes of [{lo}, {hi})")
                    layer.cache_hits += 1
                    pieces.append(part)
                    continue
            pieces.append(None)
            missing.append(chunk)
        if missing:
            layer.chunks_read += len(missing)
            fetched = await self._fetch(layer, missing, demand=True)
            got: dict[str, bytes] = {}
            for chunk, data in zip(missing, fetched, strict=True):
                self._check_size(entry, chunk, data)
                self._remember(chunk.digest, data)
                got[chunk.digest] = data
            for i, chunk in enumerate(wanted):
                if pieces[i] is None:
                    lo, hi = spans[i]
                    pieces[i] = got[chunk.digest][lo:hi]
        out = b"".join(p for p in pieces if p is not None)
        layer.bytes_read += len(out)
        return out

    def _is_sequential(self, layer: AttachedLayer, name: str, off: int, end: int) -> bool:
        seen = layer.sequential
        previous = seen.pop(name, None)
        seen[name] = end
        if len(seen) > _SEQUENTIAL_FILES:
            seen.popitem(last=False)
        return previous is not None and previous == off

    def _read_ahead(self, layer: AttachedLayer, entry: Entry, index: int) -> None:
        """Start fetching the chunks after `index`'s predecessor, if not yet at hand."""
        if self._ahead_tasks >= READAHEAD_TASKS:
            return
        ahead: list[Chunk] = []
        total = 0
        for chunk in entry.chunks[index:]:
            if total >= self.readahead_bytes:
                break
            total += chunk.size
            if chunk.digest not in self._memo and chunk.digest not in self._ahead:
                ahead.append(chunk)
        if not ahead:
            return
        done = trio.Event()
        self._ahead.update((c.digest, done) for c in ahead)
        self._ahead_tasks += 1
        layer.readahead_chunks += len(ahead)
        trio.lowlevel.spawn_system_task(
            self._fetch_ahead, layer, entry, ahead, done, name=f"read-ahead {layer.layer_id}"
        )

    async def _fetch_ahead(
        self, layer: AttachedLayer, entry: Entry, ahead: list[Chunk], done: trio.Event
    ) -> None:
        # A system task: it must not raise, and it ends with the run (cancelled then).
        try:
            with trio.move_on_after(_READAHEAD_TIMEOUT):
                parts = await self._fetch(layer, ahead)
                for chunk, data in zip(ahead, parts, strict=True):
                    if len(data) == chunk.size:
                        self._remember(chunk.digest, data)
        except LazysnapError as exc:
            log.debug("layer %s: read-ahead in %r failed: %s", layer.layer_id, entry.name, exc)
        except Exception:
            log.exception("layer %s: read-ahead in %r failed", layer.layer_id, entry.name)
        finally:
            for chunk in ahead:
                if self._ahead.get(chunk.digest) is done:
                    del self._ahead[chunk.digest]
            self._ahead_tasks -= 1
            done.set()

    async def _fetch(
        self, layer: AttachedLayer, chunks: Sequence[Chunk], *, demand: bool = False
    ) -> list[bytes]:
        """Chunks from the layer's reader: one batch call if it can, else concurrently.

        For a reader waiting (`demand`), the batch call also offers the chunks that
        follow in the blob, up to `fetch_window` bytes from the first one, to be
        fetched in the same request (see `RemoteBlob.read_chunks`).
        """
        batch = getattr(layer.reader, "read_chunks", None)
        if batch is not None:
            if demand and self.fetch_window:
                first = min(chunks, key=_blob_offset)
                last_end = max(c.end for c in chunks)
                along = layer.tree.toc.chunks_within(last_end, first.offset + self.fetch_window)
                if along:
                    return list(await batch(chunks, purpose="demand", along=along))
            return list(await batch(chunks, purpose="demand"))
        parts: list[bytes] = [b""] * len(chunks)
        failures: list[LazysnapError] = []

        async def fetch(i: int) -> None:
            try:
                parts[i] = await layer.reader.read_chunk(chunks[i])
            except LazysnapError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(chunks)):
                nursery.start_soon(fetch, i)
        if failures:
            raise failures[0]
        return parts

    async def _caught_up(self, chunks: Sequence[Chunk]) -> None:
        """Wait for read-ahead tasks fetching any of `chunks` (bounded by their timeout)."""
        for chunk in chunks:
            pending = self._ahead.get(chunk.digest)
            if pending is not None:
                await pending.wait()

    @staticmethod
    def _check_size(entry: Entry, chunk: Chunk, data: bytes) -> None:
        if len(data) != chunk.size:
            raise ShortChunk(
                f"file {entry.name!r}: chunk {chunk.digest} at {chunk.chunk_offset} has "
                f"{len(data)} bytes, expected {chunk.size}"
            )

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) > self._memo_max or digest in self._memo:
            return
        self._memo[digest] = data
        self._memo_size += len(data)
        while self._memo_size > self._memo_max:
            _, old = self._memo.popitem(last=False)
            self._memo_size -= len(old)


def _chunk_offset(chunk: Chunk) -> int:
    return chunk.chunk_offset


def _blob_offset(chunk: Chunk) -> int:
    return chunk.offset
