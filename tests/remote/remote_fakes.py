"""Fakes shared by tests/remote: a blob source with scripted faults, gzip-member blobs."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from typing import Any

import trio

from snapshotter.digest import Digest
from snapshotter.format.toc import Chunk

CHUNK = 4096
FILES = {
    "etc/hello.txt": b"hello, lazy world\n",
    "usr/lib/big.bin": b"".join(i.to_bytes(4, "big") for i in range(4481)),  # 5 chunks
    "usr/lib/zeros": bytes(3 * CHUNK + 10),  # chunks that share one digest
    "usr/lib/empty": b"",
}


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A small layer tar: three directories, `files`, and a symlink etc/link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirname in ("etc", "usr", "usr/lib"):
            info = tarfile.TarInfo(dirname)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("etc/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "hello.txt"
        tf.addfile(link)
    return buf.getvalue()


HEADER = gzip.compress(b"\0" * 512, mtime=0)  # stands in for a tar header member


def estargz_parts(files: dict[str, bytes] = FILES) -> tuple[bytes, int, bytes, Digest]:
    """(blob, toc_offset, TOC member, TOC digest) of an eStargz layer of `files`."""
    from snapshotter.format.build import build_estargz
    from snapshotter.format.estargz import parse_footer

    out = io.BytesIO()
    result = build_estargz(io.BytesIO(layer_tar(files)), out, chunk_size=CHUNK)
    blob = out.getvalue()
    toc_offset, footer = parse_footer(blob[-51:], blob_size=len(blob))
    return blob, toc_offset, blob[toc_offset : len(blob) - footer], result.toc_digest


def layout(groups: list[list[bytes]], level: int = 9) -> tuple[bytes, list[Chunk]]:
    """A blob laid out like eStargz payloads: one gzip member per group, each piece of a
    group one chunk (several pieces share a member, as with innerOffset)."""
    out = bytearray(HEADER)
    chunks: list[Chunk] = []
    file_offset = 0
    for group in groups:
        start = len(out)
        out += gzip.compress(b"".join(group), compresslevel=level, mtime=0)
        inner = 0
        for piece in group:
            chunks.append(
                Chunk(
                    chunk_offset=file_offset,
                    size=len(piece),
                    offset=start,
                    end=len(out),
                    inner_offset=inner,
                    digest=str(Digest.of(piece)),
                )
            )
            inner += len(piece)
            file_offset += len(piece)
    return bytes(out), chunks


def pieces(n: int, size: int = 5000, tag: str = "p") -> list[bytes]:
    return [(f"{tag}{i}:".encode() * size)[:size] for i in range(n)]


class FakeSource:
    """`fetch_range` over in-memory blob bytes, counting calls, with faults as data.

    `script` lists what each next call does: "ok", "hang" (never answers), "corrupt"
    (one byte flipped in the middle), "short" (one byte missing), or an exception to
    raise; once it runs out, calls answer "ok". While `gate` is set to an unset Event,
    calls wait for it first.
    """

    def __init__(self, blob: bytes, script: list[object] | None = None) -> None:
        self.blob = blob
        self.script = list(script or [])
        self.calls: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None

    @property
    def bytes_served(self) -> int:
        return sum(end - start for start, end in self.calls)

    async def __call__(self, start: int, end: int) -> bytes:
        assert 0 <= start <= end <= len(self.blob), (start, end)
        self.calls.append((start, end))
        action = self.script.pop(0) if self.script else "ok"
        if self.gate is not None:
            await self.gate.wait()
        data = self.blob[start:end]
        if action == "ok":
            return data
        if action == "hang":
            await trio.sleep_forever()
        if action == "corrupt":
            mid = len(data) // 2
            return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        if action == "short":
            return data[:-1]
        assert isinstance(action, BaseException), action
        raise action


def signed_profile(body: dict[str, Any]) -> bytes:
    """A profile document whose digest matches `body`, whatever `body` says: anyone can
    make one, so the checks that matter are the ones after the digest."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps({"digest": str(Digest.of(canonical)), "profile": body}).encode()
