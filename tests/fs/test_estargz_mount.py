"""The whole lazy read path under a real mount: tar -> eStargz (format/build.py) ->
verified TOC and RemoteBlob (remote/) -> Repository -> kernel, with a byte-counting,
corruptible in-memory blob source standing in for the registry."""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from snapshotter.cache.chunks import ChunkCache
from snapshotter.errors import Unavailable
from snapshotter.format.build import build_estargz
from snapshotter.fs.mount import mounted, run_repository
from snapshotter.fs.repository import Repository
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.layer import open_layer

pytestmark = pytest.mark.fuse

CHUNK = 64 << 10
BIG = random.Random(3).randbytes(5 * CHUNK + 123)
MTIME = 1_600_000_000


def _tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, type: bytes, data: bytes = b"", **kw: object) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = type, len(data), MTIME
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("bin", tarfile.DIRTYPE, mode=0o755)
        add("bin/tool", tarfile.REGTYPE, b"#!/bin/sh\necho hi\n", mode=0o755, uid=7, gid=8)
        add("bin/tool-again", tarfile.LNKTYPE, linkname="bin/tool")
        add("bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox")
        add("big", tarfile.REGTYPE, BIG, mode=0o644)
        add("empty", tarfile.REGTYPE, mode=0o600)
        add("null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        add(".wh.deleted", tarfile.REGTYPE)
        add("opaque", tarfile.DIRTYPE, mode=0o700)
        add("opaque/.wh..wh..opq", tarfile.REGTYPE)
        add("opaque/inside", tarfile.REGTYPE, b"inside", pax_headers={"SCHILY.xattr.user.k": "v"})
    return buf.getvalue()


class BlobSource:
    """The registry's part: Range reads of one blob, counted, and breakable."""

    def __init__(self, blob: bytes) -> None:
        self.blob = bytearray(blob)
        self.served = 0
        self.down = False

    async def __call__(self, start: int, end: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise Unavailable("blob source: connection refused")
        self.served += end - start
        return bytes(self.blob[start:end])


@dataclass
class Served:
    path: Path
    source: BlobSource
    blob_size: int
    blob: RemoteBlob


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(_tar()), out, chunk_size=CHUNK)
    source = BlobSource(out.getvalue())
    with ChunkCache(tmp_path / "cache", max_bytes=1 << 30) as cache:
        layer = await open_layer(
            source,
            cache,
            blob_size=result.size,
            toc_digest=result.toc_digest,
            max_toc_size=1 << 20,
            fetch_timeout=2,
        )
        source.served = 0  # count content only, not the footer and TOC
        repo = Repository(memo_bytes=0)  # every read reaches the blob and its cache
        repo.attach("5", layer.toc, layer.blob)
        mp = tmp_path / "repo"
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_repository, mp, repo, read_timeout=5))
            try:
                yield Served(mp / "5", source, result.size, layer.blob)
            finally:
                nursery.cancel_scope.cancel()
    assert mounted(mp) == []


async def test_layer_reads_back_as_written(served: Served) -> None:
    top = served.path

    def look() -> dict[str, object]:
        return {
            "names": sorted(os.listdir(top)),
            "tool": (top / "bin/tool").read_bytes(),
            "tool_st": os.lstat(top / "bin/tool"),
            "again_ino": os.lstat(top / "bin/tool-again").st_ino,
            "sh": os.readlink(top / "bin/sh"),
            "big": (top / "big").read_bytes(),
            "empty": (top / "empty").read_bytes(),
            "null": os.lstat(top / "null").st_rdev,
            "deleted": os.lstat(top / "deleted"),
            "opaque": os.getxattr(top / "opaque", "trusted.overlay.opaque"),
            "inside": os.listdir(top / "opaque"),
            "xattr": os.getxattr(top / "opaque/inside", "user.k"),
        }

    seen = await trio.to_thread.run_sync(look)
    assert seen["names"] == ["big", "bin", "deleted", "empty", "null", "opaque"]
    assert seen["tool"] == b"#!/bin/sh\necho hi\n"
    tool = seen["tool_st"]
    assert isinstance(tool, os.stat_result)
    assert (tool.st_mode, tool.st_uid, tool.st_gid, tool.st_nlink) == (0o100755, 7, 8, 2)
    assert tool.st_mtime == MTIME and seen["again_ino"] == tool.st_ino
    assert seen["sh"] == "/bin/busybox"
    assert seen["big"] == BIG and seen["empty"] == b""
    assert seen["null"] == os.makedev(1, 3)
    deleted = seen["deleted"]
    assert isinstance(deleted, os.stat_result)
    assert (stat.S_IFMT(deleted.st_mode), deleted.st_rdev) == (stat.S_IFCHR, 0)
    assert seen["opaque"] == b"y" and seen["inside"] == ["inside"]
    assert seen["xattr"] == b"v"


async def test_a_small_read_fetches_a_small_part(served: Served) -> None:
    assert await trio.to_thread.run_sync((served.path / "bin/tool").read_bytes)
    assert 0 < served.source.served < served.blob_size // 4


async def test_concurrent_readers_fetch_each_chunk_once(served: Served) -> None:
    got: list[bytes] = []

    def read(off: int) -> None:
        with open(served.path / "big", "rb", buffering=0) as f:
            got.append(os.pread(f.fileno(), len(BIG), off))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(trio.to_thread.run_sync, read, (i % 4) * CHUNK)
    assert sorted(got) == sorted(BIG[(i % 4) * CHUNK :] for i in range(8))
    assert served.blob.statistics().chunks_fetched == len(BIG) // CHUNK + 1


@pytest.mark.allow_log_errors
async def test_corrupt_bytes_give_eio_never_wrong_data(served: Served) -> None:
    blob = served.source.blob
    for i in range(len(blob) // 3, 2 * len(blob) // 3):  # inside big's members
        blob[i] ^= 0xFF
    with pytest.raises(OSError) as info:
        await trio.to_thread.run_sync((served.path / "big").read_bytes)
    assert info.value.errno == errno.EIO


@pytest.mark.allow_log_errors
async def test_source_down_gives_eio_then_recovers(served: Served) -> None:
    served.source.down = True
    with pytest.raises(OSError) as info:
        await trio.to_thread.run_sync((served.path / "big").read_bytes)
    assert info.value.errno == errno.EIO
    served.source.down = False
    assert await trio.to_thread.run_sync((served.path / "big").read_bytes) == BIG
