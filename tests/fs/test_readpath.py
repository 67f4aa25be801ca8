"""The repository's read path: multi-chunk reads in one batch call, sequential read-ahead."""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio
import trio.testing
from fslayers import LayerBuilder, digest

from snapshotter.errors import Unavailable
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.fs.repository import READAHEAD_TASKS, Repository

CHUNK = 64 << 10
DATA = random.Random(11).randbytes(16 * CHUNK)
OTHER = random.Random(12).randbytes(4 * CHUNK)


class CountingBatchReader:
    """A BatchChunkReader over a dict that records each call's digests; `gate` holds calls
    for the digests in `held` until it is set."""

    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.chunks = chunks
        self.calls: list[tuple[str, ...]] = []
        self.held: set[str] = set()
        self.gate = trio.Event()
        self.fail = False

    async def read_chunk(self, chunk: Chunk) -> bytes:
        return (await self.read_chunks([chunk]))[0]

    async def read_chunks(self, chunks: Sequence[Chunk], *, purpose: str = "demand") -> list[bytes]:
        self.calls.append(tuple(c.digest for c in chunks))
        if self.held & {c.digest for c in chunks}:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise Unavailable("registry unreachable")
        return [self.chunks[c.digest] for c in chunks]


def _setup(readahead: int = 0) -> tuple[Repository, CountingBatchReader]:
    b = LayerBuilder().dir("", mode=0o755)
    b.file("big", DATA, chunk_size=CHUNK).file("other", OTHER, chunk_size=CHUNK)
    reader = CountingBatchReader(b.chunks)
    repo = Repository(readahead_bytes=readahead)
    repo.attach("1", b.toc(), reader)
    return repo, reader


def _entry(repo: Repository, name: str):  # type: ignore[no-untyped-def]
    layer = repo.layer("1")
    assert layer is not None
    for ino in range(1, len(layer.tree) + 1):
        entry = layer.tree.entry(ino)
        if entry.name == name:
            return layer, entry
    raise AssertionError(name)


async def test_a_read_over_several_chunks_is_one_batch_call() -> None:
    repo, reader = _setup()
    layer, entry = _entry(repo, "big")
    data = await repo.read(layer, entry, CHUNK // 2, 3 * CHUNK)
    assert data == DATA[CHUNK // 2 : CHUNK // 2 + 3 * CHUNK]
    assert len(reader.calls) == 1 and len(reader.calls[0]) == 4
    # Chunks in the memo are not asked again; only the missing tail is.
    data = await repo.read(layer, entry, 3 * CHUNK, 2 * CHUNK)
    assert data == DATA[3 * CHUNK : 5 * CHUNK]
    assert reader.calls[1] == (entry.chunks[4].digest,)
    assert repo.statistics("1").memo_hits == 1


async def test_no_readahead_for_random_reads() -> None:
    repo, reader = _setup(readahead=4 * CHUNK)
    layer, entry = _entry(repo, "big")
    for off in (5 * CHUNK, 1 * CHUNK, 9 * CHUNK):
        assert await repo.read(layer, entry, off, 4096) == DATA[off : off + 4096]
    await trio.testing.wait_all_tasks_blocked()
    assert [len(c) for c in reader.calls] == [1, 1, 1]
    assert repo.statistics("1").readahead_chunks == 0


async def test_sequential_reads_fetch_the_next_chunks_ahead_in_one_call() -> None:
    repo, reader = _setup(readahead=4 * CHUNK)
    layer, entry = _entry(repo, "big")
    step = CHUNK // 4
    assert await repo.read(layer, entry, 0, step) == DATA[:step]
    assert await repo.read(layer, entry, step, step) == DATA[step : 2 * step]
    await trio.testing.wait_all_tasks_blocked()
    digests = [c.digest for c in entry.chunks]
    # The first read fetched chunk 0; the second (sequential) started chunks 1-4 ahead.
    assert reader.calls == [(digests[0],), tuple(digests[1:5])]
    # Reading on through those chunks asks the reader for nothing new until the
    # read-ahead window moves past what was fetched.
    off = 2 * step
    while off < 4 * CHUNK:
        assert await repo.read(layer, entry, off, step) == DATA[off : off + step]
        off += step
    await trio.testing.wait_all_tasks_blocked()
    assert all(d not in digests[:5] for call in reader.calls[2:] for d in call)
    assert repo.statistics("1").readahead_chunks >= 4


async def test_a_read_does_not_wait_for_its_readahead() -> None:
    repo, reader = _setup(readahead=2 * CHUNK)
    layer, entry = _entry(repo, "big")
    reader.held = {entry.chunks[1].digest, entry.chunks[2].digest}
    await repo.read(layer, entry, 0, 4096)
    with trio.fail_after(5):
        assert await repo.read(layer, entry, 4096, 4096) == DATA[4096:8192]
        # Another file reads while the read-ahead hangs.
        _, other = _entry(repo, "other")
        assert await repo.read(layer, other, 0, 10) == OTHER[:10]
    reader.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert entry.chunks[1].digest in repo._memo


async def test_failed_readahead_leaves_reads_to_ask_again() -> None:
    repo, reader = _setup(readahead=2 * CHUNK)
    layer, entry = _entry(repo, "big")
    await repo.read(layer, entry, 0, 4096)
    reader.fail = True
    await repo.read(layer, entry, 4096, 4096)  # chunk 0 is in the memo
    await trio.testing.wait_all_tasks_blocked()
    reader.fail = False
    assert await repo.read(layer, entry, CHUNK, 10) == DATA[CHUNK : CHUNK + 10]
    assert repo._ahead_tasks == 0 and not repo._ahead


async def test_readahead_tasks_are_bounded() -> None:
    repo, reader = _setup(readahead=CHUNK)
    layer, entry = _entry(repo, "big")
    reader.held = {c.digest for c in entry.chunks}
    for index in range(len(entry.chunks)):
        repo._read_ahead(layer, entry, index)
    await trio.testing.wait_all_tasks_blocked()
    assert repo._ahead_tasks == READAHEAD_TASKS == len(reader.calls)
    reader.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert repo._ahead_tasks == 0


# -- over a real RemoteBlob: ranges as the registry sees them ------------------------------


async def test_over_a_remote_blob_a_multi_chunk_read_is_one_range_request(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io
    import tarfile

    from snapshotter.cache.chunks import ChunkCache
    from snapshotter.format.build import build_estargz
    from snapshotter.remote.layer import open_layer

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("big")
        info.size = len(DATA)
        tf.addfile(info, io.BytesIO(DATA))
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(buf.getvalue()), out, chunk_size=CHUNK)
    blob_bytes = out.getvalue()
    ranges: list[tuple[int, int]] = []

    async def fetch_range(start: int, end: int) -> bytes:
        ranges.append((start, end))
        return blob_bytes[start:end]

    with ChunkCache(tmp_path / "cache", 64 << 20) as cache:
        layer = await open_layer(fetch_range, cache, blob_size=len(blob_bytes),
                                 toc_digest=result.toc_digest, max_toc_size=1 << 20)
        repo = Repository(readahead_bytes=0)
        repo.attach("1", layer.toc, layer.blob)
        attached, entry = _entry(repo, "big")
        ranges.clear()
        assert await repo.read(attached, entry, 100, 5 * CHUNK) == DATA[100 : 100 + 5 * CHUNK]
        assert len(ranges) == 1  # six chunks, one Range GET
        # Sequential reads with read-ahead: the next chunks come in one more request,
        # before the reader asks for them.
        repo.readahead_bytes = 4 * CHUNK
        off = 100 + 5 * CHUNK
        await repo.read(attached, entry, off, 4096)  # remembered as the stream's end
        await repo.read(attached, entry, off + 4096, 4096)
        for k in range(4):  # they join the read-ahead's request rather than make their own
            start = (6 + k) * CHUNK
            assert await repo.read(attached, entry, start, 10) == DATA[start : start + 10]
        assert len(ranges) == 2


class AlongReader(CountingBatchReader):
    def __init__(self, chunks: dict[str, bytes]) -> None:
        super().__init__(chunks)
        self.along: list[tuple[int, ...]] = []

    async def read_chunks(self, chunks: Sequence[Chunk], *, purpose: str = "demand",
                          along: Sequence[Chunk] = ()) -> list[bytes]:
        self.along.append(tuple(c.offset for c in along))
        return await super().read_chunks(chunks, purpose=purpose)


async def test_a_waiting_read_offers_the_following_chunks_within_the_window() -> None:
    files = {name: bytes([i]) * 100 for i, name in enumerate("abc")}
    entries = [Entry("", "dir", mode=0o755)]
    for i, (name, data) in enumerate(files.items()):  # laid out back to back in the blob
        d = digest(data)
        entries.append(Entry(name, "reg", size=100, digest=d,
                             chunks=(Chunk(0, 100, 100 * i, 100 * i + 100, 0, d),)))
    reader = AlongReader({digest(d): d for d in files.values()})
    repo = Repository(fetch_window=250)
    repo.attach("1", Toc(entries=entries), reader)
    layer, entry = _entry(repo, "a")
    assert await repo.read(layer, entry, 0, 4096) == files["a"]
    assert reader.along == [(100,)]  # b; c would end at 300, past 0 + 250
    off = Repository()  # fetch_window 0: only what was asked
    off.attach("1", Toc(entries=entries), reader)
    layer, entry = _entry(off, "c")
    assert await off.read(layer, entry, 0, 10) == files["c"][:10]
    assert reader.along == [(100,), ()]
