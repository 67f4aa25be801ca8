"""Verified TOCs kept on disk, so a restarted daemon can serve its layers again without
the registry: file contents still come lazily, but the tree does not need the network.

A stored TOC is trusted only after its JSON hashes to the digest it is filed under.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from snapshotter.digest import Digest
from snapshotter.errors import LazysnapError
from snapshotter.format.estargz import parse_toc, parse_toc_member
from snapshotter.format.toc import Toc

__all__ = ["MAX_STORED_TOC_SIZE", "TocStore"]

log = logging.getLogger(__name__)

# Bounds the inflated JSON of a stored member: it was verified (and within the configured
# limit) when saved, so this only stops a damaged file from inflating without end.
MAX_STORED_TOC_SIZE = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"


class TocStore:
    """`<dir>/<hex>`: first line the TOC's compressed offset, then the TOC member as the
    blob holds it (gzip: a fifth of the JSON on disk, and inflated in pieces on load).

    Files from before members were stored hold the TOC JSON instead; they still load.

        store.save(digest, member, toc_offset)   # member: verified by load_toc
        store.load(digest, blob_size=n, max_entries=m)  # Toc, or None
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def _path(self, digest: Digest) -> Path:
        return self.dir / digest.hex

    def save(self, digest: Digest, member: bytes, toc_offset: int) -> None:
        """Store a TOC member whose JSON the caller has verified against `digest`
        (checking again would inflate it once more; `load` checks before use)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"%d\n" % toc_offset)
                f.write(member)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(digest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(
        self,
        digest: Digest,
        *,
        blob_size: int,
        max_entries: int,
        max_toc_size: int = MAX_STORED_TOC_SIZE,
    ) -> Toc | None:
        """The stored TOC, or None when absent or damaged (damaged files are removed)."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        cut = data.find(b"\n")
        what = f"stored toc {path}"
        try:
            toc_offset = int(data[:cut]) if cut >= 0 else -1
            if toc_offset < 0:
                raise ValueError("no toc offset line")
            body = memoryview(data)[cut + 1 :]
            if body[:2] == _GZIP_MAGIC:
                return parse_toc_member(
                    body, toc_digest=digest, blob_size=blob_size, toc_offset=toc_offset,
                    max_size=max_toc_size, max_entries=max_entries, what=what,
                )  # fmt: skip
            raw = bytes(body)  # the JSON, as older stores kept it
            digest.check(raw, what)
            return parse_toc(raw, blob_size=blob_size, toc_offset=toc_offset,
                             max_entries=max_entries)  # fmt: skip
        except (LazysnapError, ValueError) as exc:
            log.warning("stored toc %s is damaged (%s); removing it", path, exc)
            path.unlink(missing_ok=True)
            return None
