"""Tar stream -> eStargz blob, written as it is read; used by tests and `lazysnap convert`.

Only metadata (tar headers and the TOC) is held in memory. Payloads stream through in
1 MiB pieces; when prioritized files must move to the front, the input is first spooled
to an anonymous temporary file so it can be read in a different order.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import math
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument
from snapshotter.format.estargz import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_NAME,
    footer_bytes,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "BuildResult", "InvalidLayerTar", "build_estargz"]

DEFAULT_CHUNK_SIZE = 4 << 20
LANDMARK_CONTENT = b"\x0f"
_PIECE = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_XATTR_PREFIX = "SCHILY.xattr."
_TYPES = {
    tarfile.DIRTYPE: "dir",
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


class InvalidLayerTar(InvalidArgument):
    """The input is not a tar we can turn into an eStargz layer."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What a manifest needs for the new layer, and the TOC location for readers."""

    toc_digest: Digest  # sha256 of the TOC JSON: the `containerd.io/snapshot/stargz/toc.digest`
    diff_id: Digest  # sha256 of the uncompressed tar, TOC entry included
    blob_digest: Digest  # sha256 of the blob as written
    size: int  # blob bytes written
    uncompressed_size: int  # bytes of the uncompressed tar
    toc_offset: int  # where the TOC member starts


def build_estargz(
    src: IO[bytes],
    out: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] | None = None,
    compression_level: int = 9,
) -> BuildResult:
    """Write `src` (a tar, optionally gzip/bzip2/xz-compressed) to `out` as eStargz.

    Each non-empty regular file's payload starts a new gzip member, and so does every
    `chunk_size` bytes of it. With `prioritized` (tar paths, in access order) those
    files and their parent directories come first, followed by `.prefetch.landmark`;
    if none of them is in the tar, `.no.prefetch.landmark` leads the layer instead.
    With `prioritized=None` the order is kept and no landmark is written. An existing
    TOC or landmark in the input is dropped, so converting twice is harmless.
    """
    if chunk_size <= 0:
        raise InvalidArgument(f"chunk size {chunk_size} must be positive")
    w = _Writer(out, chunk_size, compression_level)
    try:
        if prioritized is None:
            with tarfile.open(fileobj=src, mode="r|*") as tin:
                for info in tin:
                    if not _skip(info):
                        w.add(info, tin.extractfile(info) if info.isreg() else None)
        else:
            with tempfile.TemporaryFile() as spool:
                _spool(src, spool)
                with tarfile.open(fileobj=spool, mode="r:") as tin:
                    for info in _reordered(tin.getmembers(), prioritized):
                        if _skip(info):  # the spool holds no landmarks: this one is ours
                            w.add(info, io.BytesIO(LANDMARK_CONTENT))
                        else:
                            w.add(info, tin.extractfile(info) if info.isreg() else None)
    except tarfile.TarError as exc:
        raise InvalidLayerTar(f"layer tar: {exc}") from None
    return w.finish()


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p and p != ".")


def _skip(info: tarfile.TarInfo) -> bool:
    return _norm(info.name) in (TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)


def _spool(src: IO[bytes], spool: IO[bytes]) -> None:
    """Copy the (maybe compressed) input into `spool` as a plain, seekable tar."""
    with (
        tarfile.open(fileobj=src, mode="r|*") as tin,
        tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tout,
    ):
        for info in tin:
            if not _skip(info):
                tout.addfile(_plain(info), tin.extractfile(info) if info.isreg() else None)
    spool.seek(0)


def _landmark(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(LANDMARK_CONTENT)
    info.mode = 0o644
    return info


def _reordered(members: list[tarfile.TarInfo], prioritized: Sequence[str]) -> Iterator[Any]:
    """Prioritized files (with their parents and hardlink targets), a landmark, the rest."""
    by_name: dict[str, list[int]] = {}
    for i, info in enumerate(members):
        by_name.setdefault(_norm(info.name), []).append(i)
    moved: dict[int, None] = {}  # ordered set of member indices

    def move(name: str) -> None:
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            for i in by_name.get("/".join(parts[:depth]), ()):
                if i not in moved:
                    if members[i].islnk():
                        move(_norm(members[i].linkname))
                    moved[i] = None

    for name in prioritized:
        if _norm(name):
            move(_norm(name))
    if moved:
        yield from (members[i] for i in moved)
        yield _landmark(PREFETCH_LANDMARK)
    else:
        yield _landmark(NO_PREFETCH_LANDMARK)
    yield from (m for i, m in enumerate(members) if i not in moved)


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A GNU sparse file becomes a plain regular file holding its expanded content."""
    if info.sparse is None:
        return info
    info = copy.copy(info)
    info.type = tarfile.REGTYPE
    info.sparse = None
    info.pax_headers = {k: v for k, v in info.pax_headers.items() if not k.startswith("GNU.sparse")}
    return info


def _modtime(mtime: float) -> str:
    """RFC 3339 in whole seconds, rounded; "" (omitted) for the epoch, as Go writers do."""
    secs = math.floor(mtime + 0.5)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs)) if secs else ""


def _if_changed(last: dict[int, str], id_: int, name: str) -> str:
    if not name or last.get(id_) == name:
        return ""
    last[id_] = name
    return name


class _Writer:
    """Writes tar bytes into gzip members, counting and hashing both sides."""

    def __init__(self, out: BinaryIO, chunk_size: int, level: int) -> None:
        self.out = out
        self.chunk_size = chunk_size
        self.level = level
        self.gz: Any = None  # the open member's compressobj
        self.pos = 0  # compressed bytes written
        self.blob = hashlib.sha256()
        self.diff = hashlib.sha256()
        self.usize = 0
        self.toc: list[dict[str, Any]] = []
        self.unames: dict[int, str] = {}
        self.gnames: dict[int, str] = {}

    def _emit(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.blob.update(data)
            self.pos += len(data)

    def _close_member(self) -> None:
        if self.gz is not None:
            self._emit(self.gz.flush())
            self.gz = None

    def _new_member(self) -> int:
        self._close_member()
        self.gz = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        return self.pos

    def _put(self, data: bytes) -> None:
        if self.gz is None:
            self.gz = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.diff.update(data)
        self.usize += len(data)
        self._emit(self.gz.compress(data))

    def _header(self, info: tarfile.TarInfo) -> None:
        self._put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add(self, info: tarfile.TarInfo, payload: IO[bytes] | None) -> None:
        info = _plain(info)
        typ = _TYPES.get(info.type)
        try:  # the TOC is JSON: a name that is not UTF-8 could not be looked up again
            info.name.encode(), info.linkname.encode()
        except UnicodeEncodeError:
            raise InvalidLayerTar(f"layer tar: {info.name!r}: name is not UTF-8") from None
        if typ is None:
            raise InvalidLayerTar(f"layer tar: {info.name!r} has unsupported type {info.type!r}")
        entry: dict[str, Any] = {
            "name": info.name + "/" if typ == "dir" else info.name,
            "type": typ,
            "modtime": _modtime(info.mtime),
            "mode": info.mode,
            "uid": info.uid,
            "gid": info.gid,
            # As Go writers do: a name only where it changes for its id (readers ignore them).
            "userName": _if_changed(self.unames, info.uid, info.uname),
            "groupName": _if_changed(self.gnames, info.gid, info.gname),
        }
        if typ in ("symlink", "hardlink"):
            entry["linkName"] = info.linkname
        if typ in ("char", "block"):
            entry["devMajor"], entry["devMinor"] = info.devmajor, info.devminor
        xattrs = {
            k[len(_XATTR_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape"))
            for k, v in info.pax_headers.items()
            if k.startswith(_XATTR_PREFIX)
        }
        if xattrs:
            entry["xattrs"] = {k: v.decode() for k, v in xattrs.items()}
        self._header(info)
        if typ != "reg":
            self.toc.append({k: v for k, v in entry.items() if v not in (0, "")})
            return
        entry["size"] = info.size
        self._payload(info, payload, entry)

    def _payload(self, info: tarfile.TarInfo, payload: IO[bytes] | None, entry: dict) -> None:
        whole = hashlib.sha256()
        chunks: list[dict[str, Any]] = []
        done = 0
        while done < info.size:
            size = min(self.chunk_size, info.size - done)
            chunk = entry if done == 0 else {"name": entry["name"], "type": "chunk"}
            chunk["offset"] = self._new_member()
            if done:
                chunk["chunkOffset"] = done
            if done + size < info.size:  # spec: the last chunk says 0, "to the end"
                chunk["chunkSize"] = size
            digest = hashlib.sha256()
            left = size
            while left:
                piece = payload.read(min(left, _PIECE)) if payload is not None else b""
                if not piece:
                    raise InvalidLayerTar(f"layer tar: {info.name!r} is truncated")
                left -= len(piece)
                digest.update(piece)
                whole.update(piece)
                self._put(piece)
            chunk["chunkDigest"] = f"sha256:{digest.hexdigest()}"
            chunks.append(chunk)
            done += size
        if info.size:
            entry["digest"] = f"sha256:{whole.hexdigest()}"
            self._put(bytes(-info.size % _BLOCK))
        else:
            chunks.append(entry)
        chunks[0] = {k: v for k, v in chunks[0].items() if v not in (0, "")}
        self.toc.extend(chunks)

    def finish(self) -> BuildResult:
        toc_json = json.dumps({"version": 1, "entries": self.toc}, separators=(",", ":")).encode()
        toc_offset = self._new_member()
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(toc_json)
        info.mode = 0o644
        self._header(info)
        self._put(toc_json)
        # The end-of-archive blocks live in the TOC member, so the diff ID covers them.
        self._put(bytes(-len(toc_json) % _BLOCK + 2 * _BLOCK))
        self._close_member()
        self._emit(footer_bytes(toc_offset))
        self.out.flush()
        return BuildResult(
            toc_digest=Digest.of(toc_json),
            diff_id=Digest("sha256", self.diff.hexdigest()),
            blob_digest=Digest("sha256", self.blob.hexdigest()),
            size=self.pos,
            uncompressed_size=self.usize,
            toc_offset=toc_offset,
        )
