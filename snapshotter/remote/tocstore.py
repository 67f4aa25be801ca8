"""Verified TOCs kept on disk, so a restarted daemon can serve its layers again without
the registry: file contents still come lazily, but the tree does not need the network.

A stored TOC is trusted only after its JSON hashes to the digest it is filed under.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, BinaryIO

from snapshotter.digest import Digest
from snapshotter.errors import LazysnapError
from snapshotter.format.estargz import parse_toc, parse_toc_member
from snapshotter.format.toc import Toc

__all__ = ["MAX_STORED_TOC_SIZE", "TocStore", "parse_staged"]

log = logging.getLogger(__name__)

# Bounds the inflated JSON of a stored member: it was verified (and within the configured
# limit) when stored, so this only stops a damaged file from inflating without end.
MAX_STORED_TOC_SIZE = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"
_STALE_TMP = 3600.0  # seconds: no add takes that long


def parse_staged(
    path: Path, *, build: Callable[[Toc], Any] | None = None, **kwargs: Any
) -> Any:
    """`parse_toc_member` of a member staged by `TocStore.stage` (after its offset line);
    `build(toc)` instead of the `Toc` when `build` is given (`TocParser.add`'s)."""
    with open(path, "rb") as f:
        f.readline()
        toc = parse_toc_member(f, **kwargs)
    return toc if build is None else build(toc)


class TocStore:
    """`<dir>/<hex>`: first line the TOC's compressed offset, then the TOC member as the
    blob holds it (gzip, a seventh of the JSON), read back in pieces on load.

    Files from before members were stored hold the TOC JSON instead; they still load.
    A member is staged before its parse (`TocParser.add`, remote/tocparse.py: in its
    worker process or a thread), so that the caller can let go of it, and kept only if
    the parse verified it:

        staged = store.stage(member, toc_offset); toc = parse_staged(staged, ...)
        store.keep(staged, digest)  # or store.discard(staged)
        toc = store.load(digest, blob_size=n, max_entries=m)  # after a restart; or None
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._sweep()

    def _sweep(self) -> None:
        """Remove temp files a dead daemon left mid-`add` (old ones only: another store
        on this directory may be writing a fresh one). Best effort."""
        cutoff = time.time() - _STALE_TMP
        try:
            for tmp in self.dir.glob(".tmp-*"):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("toc store %s: temp files not swept: %s", self.dir, exc)

    def trim(self, keep: Collection[str], max_bytes: int) -> tuple[int, int]:
        """Remove stored TOCs whose digest hex is not in `keep`, oldest first, until the
        store holds at most `max_bytes`; `(files, bytes)` removed. Those in `keep` (the
        layers snapshots use, which a restart restores from here) always stay."""
        stored = []
        try:
            for path in self.dir.iterdir():
                if not path.name.startswith("."):  # temp files: `_sweep`'s
                    with contextlib.suppress(FileNotFoundError):
                        stored.append((path.stat(), path))
        except FileNotFoundError:
            return 0, 0
        total = sum(st.st_size for st, _ in stored)
        removed = freed = 0
        for st, path in sorted(stored, key=lambda f: f[0].st_mtime):
            if total <= max_bytes:
                break
            if path.name in keep:
                continue
            path.unlink(missing_ok=True)
            total -= st.st_size
            removed, freed = removed + 1, freed + st.st_size
        return removed, freed

    def _path(self, digest: Digest) -> Path:
        return self.dir / digest.hex

    def stage(self, member: bytes, toc_offset: int) -> Path:
        """A temp file in the store holding the offset line and `member`, to be parsed
        (`parse_staged`), then kept or discarded.

        Not fsynced (it is on the Prepare's path, and took up to 15 ms under a cold
        start's writes): every load checks the TOC against its digest, so a file a power
        loss tore is removed and the TOC fetched again, as the chunk cache does."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"%d\n" % toc_offset)
                f.write(member)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def keep(self, staged: Path, digest: Digest) -> None:
        """File a staged member whose parse verified it against `digest`."""
        os.replace(staged, self._path(digest))

    @staticmethod
    def discard(staged: Path) -> None:
        staged.unlink(missing_ok=True)

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
        what = f"stored toc {path}"
        try:
            with path.open("rb") as f:
                return self._read(f, digest, blob_size, max_entries, max_toc_size, what)
        except FileNotFoundError:
            return None
        except (LazysnapError, ValueError) as exc:
            log.warning("stored toc %s is damaged (%s); removing it", path, exc)
            path.unlink(missing_ok=True)
            return None

    @staticmethod
    def _read(
        f: BinaryIO, digest: Digest, blob_size: int, max_entries: int, max_size: int, what: str
    ) -> Toc:
        head = f.readline(32)
        if not head.endswith(b"\n"):
            raise ValueError("no toc offset line")
        toc_offset = int(head)
        start = f.tell()
        if f.read(2) != _GZIP_MAGIC:  # the JSON itself, as older stores kept it
            f.seek(start)
            raw = f.read()
            digest.check(raw, what)
            return parse_toc(raw, blob_size=blob_size, toc_offset=toc_offset,
                             max_entries=max_entries)  # fmt: skip
        f.seek(start)
        return parse_toc_member(
            f, toc_digest=digest, blob_size=blob_size, toc_offset=toc_offset,
            max_size=max_size, max_entries=max_entries, what=what,
        )  # fmt: skip
