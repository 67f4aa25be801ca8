"""Layers for fs/ tests: TOCs built in memory and a ChunkReader serving them from a dict."""

from __future__ import annotations

import hashlib
import random

import trio

from snapshotter.errors import DataLoss, Unavailable
from snapshotter.format.toc import Chunk, Entry, Toc

MTIME_NS = 1_700_000_000_123_456_789


class FakeChunkReader:
    """Serves chunk bytes by digest; `mode` scripts failures: "ok", "fail", "hang".

    "fail" raises DataLoss (as a reader does for bytes that do not verify);
    "unavailable" raises Unavailable; "hang" waits until `mode` changes back.
    """

    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.chunks = chunks
        self.mode = "ok"
        self.calls: list[str] = []  # digests asked for, in order
        self.hung: list[float] = []  # seconds each "hang" call waited until cancelled or released
        self._changed = trio.Event()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self._changed.set()
        self._changed = trio.Event()

    async def read_chunk(self, chunk: Chunk) -> bytes:
        self.calls.append(chunk.digest)
        if self.mode == "hang":
            start = trio.current_time()
            try:
                while self.mode == "hang":
                    await self._changed.wait()
            finally:
                self.hung.append(trio.current_time() - start)
        if self.mode == "fail":
            raise DataLoss(f"chunk {chunk.digest}: digest mismatch")
        if self.mode == "unavailable":
            raise Unavailable(f"chunk {chunk.digest}: registry unreachable")
        await trio.lowlevel.checkpoint()
        return self.chunks[chunk.digest]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayerBuilder:
    """Collects entries (parents first, as the parser emits them) and chunk bytes."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.chunks: dict[str, bytes] = {}

    def dir(self, name: str, mode: int = 0o755, **kw: object) -> LayerBuilder:
        self.entries.append(Entry(name=name, type="dir", mode=mode, mtime_ns=MTIME_NS, **kw))  # type: ignore[arg-type]
        return self

    def file(
        self, name: str, data: bytes, *, chunk_size: int = 1 << 20, mode: int = 0o644, **kw: object
    ) -> LayerBuilder:
        chunks = []
        for off in range(0, len(data), chunk_size):
            part = data[off : off + chunk_size]
            d = digest(part)
            self.chunks[d] = part
            # compressed offsets are irrelevant to fs/: the reader looks chunks up by digest
            chunks.append(Chunk(off, len(part), off, off + len(part), 0, d))
        self.entries.append(
            Entry(
                name=name,
                type="reg",
                mode=mode,
                size=len(data),
                mtime_ns=MTIME_NS,
                digest=digest(data),
                chunks=tuple(chunks),
                **kw,  # type: ignore[arg-type]
            )
        )
        return self

    def add(self, name: str, type: str, **kw: object) -> LayerBuilder:
        self.entries.append(Entry(name=name, type=type, mtime_ns=MTIME_NS, **kw))  # type: ignore[arg-type]
        return self

    def toc(self) -> Toc:
        return Toc(entries=tuple(self.entries))

    def reader(self) -> FakeChunkReader:
        return FakeChunkReader(self.chunks)


# 768000 bytes in three 256 KiB chunks, the last one short; random so no two chunks match
BIG = random.Random(7).randbytes(768000)
BIG_CHUNK = 256 << 10


def lower_layer() -> LayerBuilder:
    """The base layer of the two-layer fixture."""
    b = LayerBuilder()
    b.dir("", mode=0o755)
    b.dir("etc").file("etc/hostname", b"lower\n")
    b.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    b.dir("gone").file("gone/a", b"a")
    b.dir("opq").file("opq/old", b"old").file("opq/kept-by-upper", b"lower version")
    b.file("victim", b"to be whited out")
    b.dir("data").file("data/big", BIG, chunk_size=BIG_CHUNK)
    b.file("data/empty", b"")
    b.file("data/secret", b"s3cret", mode=0o600, uid=0, gid=0)
    return b


def upper_layer() -> LayerBuilder:
    """The top layer: whiteouts, an opaque dir, links, devices, xattrs."""
    b = LayerBuilder()
    b.dir("", mode=0o755)
    b.file(".wh.victim", b"")
    b.add(".wh.gone", "reg")
    b.dir("opq", mode=0o750, uid=1000, gid=1000).add("opq/.wh..wh..opq", "reg")
    b.file("opq/new", b"new\n")
    b.file("opq/kept-by-upper", b"upper version")
    b.dir("etc").file("etc/hostname", b"upper\n", mode=0o640, uid=1, gid=2)
    b.add("etc/motd-link", "symlink", link_name="../motd", mode=0o777)
    b.file("motd", b"hello\n", xattrs=(("user.origin", b"upper"), ("security.x", b"\x00\x01")))
    b.add("motd-hard", "hardlink", link_name="motd")
    b.add("bin", "dir", mode=0o755).add("bin/hard2", "hardlink", link_name="motd")
    b.dir("dev").add("dev/null", "char", mode=0o666, dev_major=1, dev_minor=3)
    b.add("dev/sda", "block", mode=0o660, dev_major=8, dev_minor=0)
    b.add("dev/pipe", "fifo", mode=0o644)
    return b
