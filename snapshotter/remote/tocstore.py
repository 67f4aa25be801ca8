"""Verified TOCs kept on disk, so a restarted daemon can serve its layers again without
the registry: file contents still come lazily, but the tree does not need the network.

A stored TOC is trusted only after it hashes to the digest it is filed under.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from snapshotter.digest import Digest
from snapshotter.errors import LazysnapError
from snapshotter.format.estargz import parse_toc
from snapshotter.format.toc import Toc

__all__ = ["TocStore"]

log = logging.getLogger(__name__)


class TocStore:
    """`<dir>/<hex>`: first line the TOC's compressed offset, then the TOC JSON bytes."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def _path(self, digest: Digest) -> Path:
        return self.dir / digest.hex

    def save(self, digest: Digest, raw: bytes, toc_offset: int) -> None:
        digest.check(raw, "toc")
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"%d\n" % toc_offset)
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(digest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, digest: Digest, *, blob_size: int, max_entries: int) -> Toc | None:
        """The stored TOC, or None when absent or damaged (damaged files are removed)."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        head, _, raw = data.partition(b"\n")
        try:
            digest.check(raw, f"stored toc {path}")
            return parse_toc(raw, blob_size=blob_size, toc_offset=int(head),
                             max_entries=max_entries)
        except (LazysnapError, ValueError) as exc:
            log.warning("stored toc %s is damaged (%s); removing it", path, exc)
            path.unlink(missing_ok=True)
            return None
