"""The node's chunk cache: verified, content-addressed chunk bytes on local disk.

One `ChunkCache` serves every layer, image and containerd namespace; it knows digests and
bytes, never blobs or registries. Fetching is the caller's business (`remote/blob.py`), but
the in-flight table lives here so that readers of one chunk share one fetch even when they
reach it through different layers.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from snapshotter.digest import Digest
from snapshotter.errors import ClosedError, FailedPrecondition, Unavailable, category

__all__ = ["CacheInUse", "CacheStatistics", "ChunkCache"]

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]+$")
_ALGORITHMS = ("sha256", "sha512")
# A hit bumps the chunk file's times at most once per this many seconds: a syscall and
# an inode write per read would cost more than the read itself on the cached path.
_TOUCH_INTERVAL = 600.0


class CacheInUse(FailedPrecondition):
    """Another ChunkCache (in this or another process) holds the cache directory."""


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    corrupt: int  # files that failed verification on read and were removed
    in_flight: int  # chunks being fetched right now


@dataclass(slots=True)
class _Flight:
    """One fetch of one chunk, awaited by every other reader of that digest."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class ChunkCache:
    """Size-bounded LRU store of chunks, keyed by the digest of their (uncompressed) bytes.

    Layout: `<root>/<algorithm>/<hex[:2]>/<hex>`, one file per chunk, plus `<root>/tmp/`
    for writes in progress and `<root>/lock`. Nothing enters the store unverified: `put`
    hashes the bytes first and raises DataLoss on mismatch. Writes go to a temp file and
    are renamed into place, so a reader sees a whole file or none.

    Verification is once per chunk per process, not once per read: a chunk stored by this
    process, or read whole and found to match, is "verified", and later reads of it
    (`read_range`, `get`) only check its size and `pread` what they need. This keeps
    hashing off the cached read path (a 4 KiB read of a 4 MiB chunk costs one pread, not
    4 MiB of hashing) while still catching what the disk may have done between runs:
    after a restart every chunk is verified again on its first read, and one that fails
    is removed, counted as `corrupt`, and reported as a miss (the caller refetches). For
    the same reason writes are not fsynced: a file torn by a power loss is caught by that
    first read instead of costing an fsync per fetched chunk.

    LRU order is kept in memory and rebuilt at start from file times (newest use last);
    a hit bumps the file's times so the order survives restarts. After each store, the
    least recently used chunks are deleted until the total is within `max_bytes`.

    The sync methods are thread-safe and do disk I/O; from trio, use the async ones,
    which run the I/O in worker threads so a slow disk cannot stall the FUSE loop.
    `get_or_fetch` is single-flight per digest within one trio run. One process owns a
    cache directory at a time (an flock on `<root>/lock`); `close()` releases it.

        cache = ChunkCache(root / "cache", max_bytes=10 << 30)
        data = await cache.get_or_fetch(digest, fetch, what="chunk sha256:ab.. of layer x")
        part = await cache.aread_range(digest, 4096, 8192)  # None on a miss
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"chunk cache {root}: max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[Digest, int] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._corrupt = 0
        self._index_misses = 0  # misses seen by get_or_fetch in the index (trio thread only)
        self._flights: dict[Digest, _Flight] = {}
        self._verified: set[Digest] = set()  # checked whole by this process (see above)
        self._touched: set[Digest] = set()  # file times bumped since _touch_epoch
        self._touch_epoch = time.monotonic()
        self._closed = False
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise CacheInUse(f"chunk cache {self.root}: directory is in use") from None
        self._rebuild()

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._lock_fd)

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rebuild(self) -> None:
        """Index the chunks left by a previous run; drop unfinished writes."""
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        found: list[tuple[int, Digest, int]] = []
        for algorithm in _ALGORITHMS:
            base = self.root / algorithm
            if not base.is_dir():
                continue
            for path in base.glob("*/*"):
                digest = _digest_of_path(algorithm, path)
                if digest is None:
                    continue  # not ours; leave it alone rather than guess
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                found.append((max(st.st_atime_ns, st.st_mtime_ns), digest, st.st_size))
        found.sort(key=lambda item: item[0])
        for _, digest, size in found:
            self._lru[digest] = size
            self._bytes += size
        with self._lock:
            self._unlink(self._evict_locked())

    # -- sync API (thread-safe, blocking) -----------------------------------------------

    def path(self, digest: Digest) -> Path:
        return self.root / digest.algorithm / digest.hex[:2] / digest.hex

    def __contains__(self, digest: Digest) -> bool:
        # No lock: called on the trio thread, which must not wait for a writer's disk
        # I/O. A dict lookup is atomic under the GIL; the answer is a hint either way.
        return digest in self._lru

    def has_or_fetching(self, digest: Digest) -> bool:
        """Stored, or being fetched by a `get_or_fetch` now (trio thread; a hint)."""
        return digest in self._lru or digest in self._flights

    def verified(self, digest: Digest) -> bool:
        """Whether `read_range(digest, ...)` is one pread (no hashing); lock-free hint."""
        return digest in self._verified

    def get(self, digest: Digest) -> bytes | None:
        """The verified bytes of `digest`, or None (absent, vanished, or corrupt)."""
        self._check_open()
        size = self._hit(digest)
        if size is None:
            return None
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            return self._lost(digest)
        if digest in self._verified:
            if len(data) != size:
                return self._reject(digest, f"has {len(data)} bytes, expected {size}")
        elif not _matches(digest, data):
            return self._reject(digest, "failed verification")
        else:
            self._verified.add(digest)
        return self._count_hit(digest, data)

    def read_range(self, digest: Digest, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the chunk `digest`, or None (absent, vanished, corrupt).

        A chunk not yet verified by this process is read whole and verified first; after
        that, a read is one `pread` of the range. `end` past the chunk's size is clipped.
        """
        self._check_open()
        if digest not in self._verified:
            data = self.get(digest)
            return None if data is None else data[start:end]
        size = self._hit(digest)
        if size is None:
            return None
        end = min(end, size)
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return self._lost(digest)
        try:
            if os.fstat(fd).st_size != size:
                return self._reject(digest, f"changed size on disk (expected {size} bytes)")
            data = os.pread(fd, max(0, end - start), start) if end > start else b""
        finally:
            os.close(fd)
        return self._count_hit(digest, data)

    def _hit(self, digest: Digest) -> int | None:
        """The chunk's size if it is indexed (bumped to most recently used), else None."""
        with self._lock:
            size = self._lru.get(digest)
            if size is None:
                self._misses += 1
                return None
            self._lru.move_to_end(digest)
            return size

    def _count_hit(self, digest: Digest, data: bytes) -> bytes:
        with self._lock:
            self._hits += 1
            now = time.monotonic()
            if now - self._touch_epoch > _TOUCH_INTERVAL:
                self._touched.clear()
                self._touch_epoch = now
            touch = digest not in self._touched
            self._touched.add(digest)
        if touch:  # so the LRU order survives a restart, to within _TOUCH_INTERVAL
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path(digest))
        return data

    def _lost(self, digest: Digest) -> None:
        """The file vanished under the index (removed by hand): forget it, count a miss."""
        with self._lock:
            self._forget_locked(digest)
            self._misses += 1
        return None

    def _reject(self, digest: Digest, why: str) -> None:
        log.warning("chunk cache %s: %s %s; removed", self.root, digest, why)
        with self._lock:
            self._corrupt += 1
            self._misses += 1
            self._forget_locked(digest)
            self._unlink([digest])
        return None

    def put(self, digest: Digest, data: bytes, *, what: str = "chunk") -> None:
        """Verify `data` against `digest` (DataLoss on mismatch), then store it."""
        self._check_open()
        digest.check(data, what)
        self._store(digest, data)

    def discard(self, digest: Digest) -> None:
        with self._lock:
            self._forget_locked(digest)
            self._unlink([digest])

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(
                entries=len(self._lru),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                hits=self._hits,
                misses=self._misses + self._index_misses,
                evictions=self._evictions,
                corrupt=self._corrupt,
                in_flight=len(self._flights),
            )

    # -- async API (trio) ---------------------------------------------------------------

    async def aget(self, digest: Digest) -> bytes | None:
        # Abandoning a read is harmless: the thread finishes and its result is dropped.
        return await trio.to_thread.run_sync(self.get, digest, abandon_on_cancel=True)

    async def aread_range(self, digest: Digest, start: int, end: int) -> bytes | None:
        return await trio.to_thread.run_sync(
            self.read_range, digest, start, end, abandon_on_cancel=True
        )

    async def aput(self, digest: Digest, data: bytes, *, what: str = "chunk") -> None:
        await trio.to_thread.run_sync(lambda: self.put(digest, data, what=what))

    async def get_or_fetch(
        self,
        digest: Digest,
        fetch: Callable[[], Awaitable[bytes]],
        *,
        what: str = "chunk",
        prepare: Callable[[bytes], bytes] | None = None,
    ) -> bytes:
        """The chunk from the cache, or from `fetch()` (verified, then stored).

        Concurrent callers for one digest share a single `fetch()`: the first becomes the
        leader, the others wait for its result. If the leader fails, waiters get an error of
        the same category and nothing is remembered, so the next call fetches again; if the
        leader was cancelled (its own deadline), a waiter takes over. Bound the call with a
        trio deadline; this method adds none.

        `prepare` turns what `fetch()` returned into the chunk's bytes (inflating a
        compressed member) in the same worker thread that verifies and stores them: one
        thread hop per fetched chunk instead of two, which is most of the daemon's CPU
        per chunk when a prefetch streams thousands of small ones.
        """
        while True:
            flight = self._flights.get(digest)
            if flight is None:
                # Not indexed: no file to read, so no worker thread to wake for it.
                if digest in self._lru:
                    data = await self.aget(digest)
                    if data is not None:
                        return data
                else:
                    self._index_misses += 1
                flight = self._flights.get(digest)
            if flight is None:
                if digest in self:
                    continue  # stored by a flight that ended while we were reading
                return await self._lead(digest, fetch, what, prepare)
            await flight.done.wait()
            if flight.data is not None:
                return flight.data
            err = flight.error
            if isinstance(err, trio.Cancelled) or err is None:
                continue
            cat = category(err) or Unavailable
            raise cat(f"{what}: {err}") from err

    async def _lead(
        self,
        digest: Digest,
        fetch: Callable[[], Awaitable[bytes]],
        what: str,
        prepare: Callable[[bytes], bytes] | None,
    ) -> bytes:
        flight = self._flights[digest] = _Flight()
        try:
            raw = await fetch()
            data = await trio.to_thread.run_sync(self._verify_and_keep, digest, raw, what, prepare)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.data = data
            return data
        finally:
            del self._flights[digest]
            flight.done.set()

    # -- internals ----------------------------------------------------------------------

    def _verify_and_keep(
        self, digest: Digest, raw: bytes, what: str, prepare: Callable[[bytes], bytes] | None
    ) -> bytes:
        """Prepare and verify (DataLoss), then store if the disk lets us: verified bytes
        are worth serving even when the cache cannot keep them (disk full, directory
        damaged)."""
        self._check_open()
        data = prepare(raw) if prepare is not None else raw
        digest.check(data, what)
        try:
            self._store(digest, data)
        except OSError as exc:
            log.warning("chunk cache %s: cannot store %s: %s", self.root, digest, exc)
        return data

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"chunk cache {self.root}: closed")

    def _store(self, digest: Digest, data: bytes) -> None:
        with self._lock:
            if digest in self._lru:
                self._lru.move_to_end(digest)
                return
        final = self.path(digest)
        fd, tmp = _mkstemp(self._tmp, digest.hex)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)  # no fsync: see the class docstring
            # Rename and unlink under the lock so the index and the directory agree;
            # trio never waits for this lock (see __contains__).
            with self._lock:
                if digest in self._lru:  # another thread stored it meanwhile
                    self._lru.move_to_end(digest)
                    return
                try:
                    os.replace(tmp, final)
                except FileNotFoundError:  # the first chunk under this prefix
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, final)
                tmp = None
                self._lru[digest] = len(data)
                self._verified.add(digest)
                self._bytes += len(data)
                self._unlink(self._evict_locked())
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _forget_locked(self, digest: Digest) -> None:
        self._verified.discard(digest)
        size = self._lru.pop(digest, None)
        if size is not None:
            self._bytes -= size

    def _evict_locked(self) -> list[Digest]:
        """Drop LRU entries until within budget; the caller unlinks them."""
        victims = []
        while self._bytes > self.max_bytes and self._lru:
            digest, size = self._lru.popitem(last=False)
            self._verified.discard(digest)
            self._bytes -= size
            self._evictions += 1
            victims.append(digest)
        return victims

    def _unlink(self, digests: list[Digest]) -> None:
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                self.path(digest).unlink()


def _matches(digest: Digest, data: bytes) -> bool:
    v = digest.verifier()
    v.update(data)
    return v.verified()


def _digest_of_path(algorithm: str, path: Path) -> Digest | None:
    name = path.name
    if path.parent.name != name[:2] or not _HEX.match(name):
        return None
    try:
        return Digest.parse(f"{algorithm}:{name}")
    except Exception:
        return None


def _mkstemp(directory: Path, stem: str) -> tuple[int, str]:
    # Unique per writer so concurrent puts of one digest never share a temp file.
    for attempt in range(100):
        path = directory / f"{stem}.{os.getpid()}.{threading.get_ident()}.{attempt}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        return fd, str(path)
    raise FileExistsError(f"chunk cache: no free temp name for {stem} in {directory}")
