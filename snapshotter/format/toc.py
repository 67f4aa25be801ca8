"""The table of contents of a seekable layer, as a compact validated model.

This module owns the model only: `Toc`, `Entry`, `Chunk`. Parsing and validating the
eStargz JSON into it lives in `format/estargz.py`; building layers in `format/build.py`.
Nothing here does I/O.

Paths are normalised: no leading "./" or "/", no trailing "/", the root directory is "".
Entries appear parents-first; every directory on the way to an entry exists (implicit
parents are synthesised by the parser with mode 0o755). Hardlinks are resolved: a
`hardlink` entry's `link_name` names an existing `reg` (or other non-dir) entry.
Whiteouts stay as OCI names here (`.wh.x`, `.wh..wh..opq`); `format/whiteout.py`
says what they mean and `fs/tree.py` presents them to overlayfs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ENTRY_TYPES", "Chunk", "Entry", "Toc"]

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One verified unit of a regular file's content.

    To read it: fetch compressed bytes [offset, end) of the blob, gunzip, skip
    `inner_offset` bytes, take `size` bytes, check them against `digest`.
    """

    chunk_offset: int  # where this chunk starts within the file
    size: int  # uncompressed bytes
    offset: int  # compressed offset of the gzip member holding the chunk
    end: int  # compressed end of that member (exclusive)
    inner_offset: int  # uncompressed offset of the chunk inside the member
    digest: str  # "sha256:<hex>" of the uncompressed chunk bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of the layer. Zero values are the TOC's omitted fields."""

    name: str
    type: str  # one of ENTRY_TYPES
    mode: int = 0  # permission bits only (& 0o7777)
    uid: int = 0
    gid: int = 0
    size: int = 0  # regular files: uncompressed size
    mtime_ns: int = 0
    link_name: str = ""  # symlink target (verbatim) or hardlink target (normalised path)
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    digest: str = ""  # "sha256:<hex>" of the whole file, when the TOC has it
    chunks: tuple[Chunk, ...] = ()  # regular files with size > 0, ordered by chunk_offset


@dataclass(frozen=True, slots=True)
class Toc:
    """A validated layer index; `entries` parents-first, names unique."""

    entries: tuple[Entry, ...]
    toc_offset: int = 0  # compressed offset of the TOC member (= end of payloads)
    blob_size: int = 0
    prefetch_landmark: int | None = None  # offset of `.prefetch.landmark`, if any
    no_prefetch: bool = False  # `.no.prefetch.landmark` present

    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}
