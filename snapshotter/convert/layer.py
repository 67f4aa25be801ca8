"""One layer blob (gzip, zstd or plain tar, on disk) -> one eStargz blob on disk, checked.

Runs in a worker thread: everything here is blocking I/O and CPU. Bytes stream through
in 1 MiB pieces; only tar headers and the TOC are held in memory. The output is read
back through the same TOC parser the snapshotter uses, so a layer we would refuse to
serve (hostile names, dangling hardlinks) is refused here, before anything is pushed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from snapshotter.convert.errors import CorruptLayer, UnsafeLayer
from snapshotter.digest import Digest
from snapshotter.errors import ClosedError, DataLoss, Unavailable
from snapshotter.format.build import DEFAULT_CHUNK_SIZE, BuildResult, build_estargz
from snapshotter.format.estargz import FOOTER_SIZE, InvalidTOC, parse_toc, read_toc_json

__all__ = ["ConversionStopped", "LayerOutput", "convert_layer"]

_PIECE = 1 << 20
# Larger than the daemon's default limit (64 MiB) on purpose: the daemon's limit is a
# setting, and the converter should not be the one to refuse a big but honest layer.
MAX_TOC_BYTES = 512 << 20


class ConversionStopped(ClosedError):
    """Another layer failed (or the user interrupted): this one gives up at its next read."""


@dataclass(frozen=True, slots=True)
class LayerOutput:
    """The eStargz blob at `path` and what the manifest and config need to know about it."""

    path: Path
    build: BuildResult
    source_diff_id: Digest  # sha256 of the source layer's uncompressed tar


def convert_layer(
    src: Path,
    compression: str,
    out: Path,
    *,
    what: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] | None = None,
    compression_level: int = 9,
    expected_diff_id: Digest | None = None,
    stop: threading.Event | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> LayerOutput:
    """Convert the layer blob `src` (compression "gzip", "zstd" or "") into `out`.

    `what` names the layer in every error. `expected_diff_id` (from the image config) is
    checked against the decompressed source; a mismatch is CorruptLayer. `on_bytes` is
    told how many compressed source bytes were consumed, as they are; setting `stop`
    makes the conversion raise ConversionStopped at its next read.
    """
    with open(src, "rb") as raw:
        counted = _Counted(raw, stop, on_bytes)
        tar = _decompressed(counted, compression, what)
        try:
            with open(out, "wb") as sink:
                build = build_estargz(
                    tar,  # type: ignore[arg-type]
                    sink,
                    chunk_size=chunk_size,
                    prioritized=prioritized,
                    compression_level=compression_level,
                )
            # tarfile stops at the end-of-archive blocks; the diff ID covers what follows.
            while tar.read(_PIECE):
                pass
        except (DataLoss, ClosedError):
            raise
        except OSError as exc:
            raise Unavailable(f"{what}: local file error: {exc}") from exc
        except Exception as exc:
            if getattr(exc, "__module__", "").startswith("snapshotter."):
                raise type(exc)(f"{what}: {exc}") from None
            raise CorruptLayer(f"{what}: cannot read the layer tar: {exc!r}") from None
    diff_id = Digest("sha256", tar.sha256.hexdigest())
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise CorruptLayer(
            f"{what}: uncompressed content is {diff_id}, but the image config says "
            f"{expected_diff_id}"
        )
    _check_output(out, build, what)
    return LayerOutput(out, build, diff_id)


def _check_output(path: Path, build: BuildResult, what: str) -> None:
    """Parse our own TOC as the snapshotter will; its refusals are the tar's problems."""
    with open(path, "rb") as f:
        f.seek(build.toc_offset)
        member = f.read(build.size - build.toc_offset - FOOTER_SIZE)
    toc_json = read_toc_json(member, max_size=MAX_TOC_BYTES)
    build.toc_digest.check(toc_json, f"{what}: written TOC")
    try:
        parse_toc(toc_json, blob_size=build.size, toc_offset=build.toc_offset)
    except InvalidTOC as exc:
        raise UnsafeLayer(f"{what}: layer tar refused: {exc}") from None


class _Counted:
    """The compressed source file: counts bytes for progress and honours `stop`."""

    def __init__(
        self, f: IO[bytes], stop: threading.Event | None, on_bytes: Callable[[int], None] | None
    ) -> None:
        self._f, self._stop, self._on_bytes = f, stop, on_bytes

    def read(self, n: int = -1) -> bytes:
        if self._stop is not None and self._stop.is_set():
            raise ConversionStopped("conversion stopped")
        data = self._f.read(n)
        if data and self._on_bytes is not None:
            self._on_bytes(len(data))
        return data


class _Tar:
    """Decompressed tar bytes, hashed on the way through (the source diff ID)."""

    def __init__(self, src: _Counted, what: str) -> None:
        self._src = src
        self.what = what
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._read(_PIECE if n is None or n < 0 else n)
        self.sha256.update(data)
        return data

    def _read(self, n: int) -> bytes:
        return self._src.read(n)


class _Gunzip(_Tar):
    """Concatenated gzip members (as every eStargz blob is), each CRC-checked by zlib."""

    def __init__(self, src: _Counted, what: str) -> None:
        super().__init__(src, what)
        self._d: Any = None
        self._pending = b""

    def _read(self, n: int) -> bytes:
        import zlib

        while True:
            if not self._pending:
                self._pending = self._src.read(_PIECE)
                if not self._pending:
                    if self._d is not None:
                        raise CorruptLayer(f"{self.what}: gzip stream is truncated")
                    return b""
            if self._d is None:
                self._d = zlib.decompressobj(wbits=31)
            try:
                out = self._d.decompress(self._pending, n)
            except zlib.error as exc:
                raise CorruptLayer(f"{self.what}: corrupt gzip stream: {exc}") from None
            if self._d.eof:
                self._pending = self._d.unused_data
                self._d = None
            else:
                self._pending = self._d.unconsumed_tail
            if out:
                return out


class _Unzstd(_Tar):
    def __init__(self, src: _Counted, what: str) -> None:
        super().__init__(src, what)
        import zstandard  # only zstd layers need it

        self._error = zstandard.ZstdError
        self._r = zstandard.ZstdDecompressor().stream_reader(
            src, read_across_frames=True, closefd=False
        )

    def _read(self, n: int) -> bytes:
        try:
            return self._r.read(n)
        except self._error as exc:
            raise CorruptLayer(f"{self.what}: corrupt zstd stream: {exc}") from None


def _decompressed(src: _Counted, compression: str, what: str) -> _Tar:
    if compression == "gzip":
        return _Gunzip(src, what)
    if compression == "zstd":
        return _Unzstd(src, what)
    return _Tar(src, what)
