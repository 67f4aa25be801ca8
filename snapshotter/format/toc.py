"""The table of contents of a seekable layer, as a compact validated model.

This module owns the model only: `Toc`, `Entry`, `Chunk` (`format/_tocbuild.py` fills a
`Toc` column by column). Parsing and validating the eStargz JSON lives in
`format/estargz.py`; building layers in `format/build.py`. Nothing here does I/O.

Paths are normalised: no leading "./" or "/", no trailing "/", the root directory is "".
Entries appear parents-first; every directory on the way to an entry exists (implicit
parents are synthesised by the parser with mode 0o755). Hardlinks are resolved: a
`hardlink` entry's `link_name` names an existing `reg` (or other non-dir) entry.
Whiteouts stay as OCI names here (`.wh.x`, `.wh..wh..opq`); `format/whiteout.py`
says what they mean and `fs/tree.py` presents them to overlayfs.

Memory: a daemon holds the TOCs of every attached layer, 100k entries for a large one,
so a `Toc` stores columns (base names in one bytes object, numbers in `array`s, chunk
digests as 32 raw bytes) at ~150 bytes per entry, where `Entry`/`Chunk` objects cost
~600. `Entry` and `Chunk` are value objects made on access.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

__all__ = [
    "EMPTY_DIGEST",
    "ENTRY_TYPES",
    "NO_PARENT",
    "OTHER_TYPE",
    "TYPE_MASK",
    "Chunk",
    "Entry",
    "Toc",
    "TocColumns",
]

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

NO_PARENT = 0xFFFF_FFFF  # `TocColumns.parent` of an entry whose directory is not in the TOC
OTHER_TYPE = 7  # `TocColumns.kind & TYPE_MASK` of a type outside ENTRY_TYPES
TYPE_MASK = 0x07
DIGEST_IS_CHUNK = 0x10  # the file's digest is its single chunk's digest
DIGEST_IS_EMPTY = 0x20  # the file's digest is EMPTY_DIGEST
TYPE_CODE = {t: i for i, t in enumerate(ENTRY_TYPES)}
_SHA256 = "sha256:"
_COLUMN_FIELDS = {"type", "mode", "uid", "gid", "mtime_ns", "size"}


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
class TocColumns:
    """A `Toc`'s per-entry storage, for readers that must not make an `Entry` per access
    (`fs/tree.py`). Row i is `toc.entries[i]`; treat every column as read-only.

    A value that does not fit its column (an mtime before 1678, a mode over 16 bits, a
    type outside ENTRY_TYPES) is stored as 0 there and is right only in `toc.entry(i)`;
    such rows have `i in toc.odd_rows`.
    """

    names: bytes  # UTF-8 base names back to back
    name_at: array[int]  # entry i's base name is names[name_at[i]:name_at[i + 1]]
    parent: array[int]  # 1 + row of the parent directory; 0: the layer root; or NO_PARENT
    kind: array[int]  # ENTRY_TYPES index (& TYPE_MASK), plus flags
    mode: array[int]
    uid: array[int]
    gid: array[int]
    mtime_ns: array[int]
    size: array[int]
    chunk_at: array[int]  # entry i's chunks are rows [chunk_at[i], chunk_at[i + 1])


class Toc:
    """A validated layer index; `entries` parents-first, names unique.

    `entries` is a read-only `Sequence[Entry]` whose items are made on access, so
    `toc.entries[i]` costs a few microseconds (it rebuilds the full path from the parent
    chain) and two reads of one index give equal, not identical, objects. Iterate
    `chunks()` rather than every entry's chunks when the names do not matter.

        toc = Toc(entries=[Entry("", "dir", mode=0o755), Entry("a", "reg", size=1, ...)])
        toc.entries[1].name            # "a"
        len(toc.entries), toc.name(1)  # 2, "a"
    """

    __slots__ = (
        "_c_digest", "_c_end", "_c_inner", "_c_odd", "_c_offset", "_c_pos", "_c_size",
        "_digests", "_links", "_odd", "_ordered", "blob_size", "columns", "no_prefetch",
        "prefetch_landmark", "toc_offset",
    )  # fmt: skip

    def __init__(
        self,
        entries: Iterable[Entry] = (),
        toc_offset: int = 0,  # compressed offset of the TOC member (= end of payloads)
        blob_size: int = 0,
        prefetch_landmark: int | None = None,  # offset of `.prefetch.landmark`, if any
        no_prefetch: bool = False,  # `.no.prefetch.landmark` present
    ) -> None:
        from snapshotter.format._tocbuild import TocBuilder  # it imports this module

        b = TocBuilder()
        for e in entries:
            b.add(
                e.name, e.type, mode=e.mode, uid=e.uid, gid=e.gid, size=e.size,
                mtime_ns=e.mtime_ns, link_name=e.link_name, dev_major=e.dev_major,
                dev_minor=e.dev_minor, xattrs=e.xattrs, digest=e.digest,
            )  # fmt: skip
            for c in e.chunks:
                b.add_chunk(c.chunk_offset, c.size, c.offset, c.inner_offset, c.digest, c.end)
        b._finish(self, toc_offset, blob_size, prefetch_landmark, no_prefetch)

    def __repr__(self) -> str:
        return f"<Toc {len(self)} entries, toc_offset={self.toc_offset}>"

    # -- whole-TOC views ----------------------------------------------------------------

    @property
    def entries(self) -> Sequence[Entry]:
        return _Entries(self)

    def __len__(self) -> int:
        return len(self.columns.kind)

    @property
    def odd_rows(self) -> frozenset[int]:
        """Rows with a value their column cannot hold (see `TocColumns`)."""
        return frozenset(i for i, odd in self._odd.items() if odd.keys() & _COLUMN_FIELDS)

    def chunks(self) -> Iterator[Chunk]:
        """Every file's chunks, in entry order (no names are built)."""
        for j in range(len(self._c_pos)):
            yield self.chunk(j)

    def chunks_within(self, start: int, end: int) -> list[Chunk]:
        """Chunks whose compressed extents lie inside [start, end), in blob order.

        These are the neighbours a read may fetch in the same request as a chunk it
        needs. eStargz writes the TOC in archive order, so the chunk columns are sorted
        by offset and this is a bisection; for a TOC that is not (no writer we know of
        makes one) there are no neighbours and the answer is empty.
        """
        offsets = self._c_offset
        ordered = getattr(self, "_ordered", None)
        if ordered is None:
            ordered = self._ordered = all(offsets[j] <= offsets[j + 1]
                                          for j in range(len(offsets) - 1))
        if not ordered or start >= end:
            return []
        found = []
        j = bisect_left(offsets, start)
        while j < len(offsets) and offsets[j] < end:
            if self._c_end[j] <= end:
                found.append(self.chunk(j))
            j += 1
        return found

    def by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}

    # -- one row -------------------------------------------------------------------------

    def name(self, i: int) -> str:
        """Entry i's full path, rebuilt from its base name and parents."""
        c = self.columns
        names, at, parent = c.names, c.name_at, c.parent
        parts = [names[at[i] : at[i + 1]]]
        p = parent[i]
        while p and p != NO_PARENT:
            i = p - 1
            parts.append(names[at[i] : at[i + 1]])
            p = parent[i]
        if p == NO_PARENT:
            parts.append(self._odd[i]["dir"].encode())
        parts.reverse()
        return b"/".join(parts).decode()

    def base_name(self, i: int) -> bytes:
        at = self.columns.name_at
        return self.columns.names[at[i] : at[i + 1]]

    def type(self, i: int) -> str:
        code = self.columns.kind[i] & TYPE_MASK
        return ENTRY_TYPES[code] if code != OTHER_TYPE else self._odd[i]["type"]

    def link_name(self, i: int) -> str:
        return self._links.get(i)

    def xattrs(self, i: int) -> tuple[tuple[str, bytes], ...]:
        odd = self._odd.get(i)
        return odd.get("xattrs", ()) if odd is not None else ()

    def device(self, i: int) -> tuple[int, int]:
        odd = self._odd.get(i)
        return odd.get("dev", (0, 0)) if odd is not None else (0, 0)

    def chunk_range(self, i: int) -> range:
        at = self.columns.chunk_at
        return range(at[i], at[i + 1])

    def chunk(self, j: int) -> Chunk:
        return Chunk(
            self._c_pos[j], self._c_size[j], self._c_offset[j], self._c_end[j],
            self._c_inner[j], self.chunk_digest(j),
        )  # fmt: skip

    def chunk_digest(self, j: int) -> str:
        odd = self._c_odd.get(j)
        if odd is not None:
            return odd
        return _SHA256 + self._c_digest[32 * j : 32 * j + 32].hex()

    def entry(self, i: int) -> Entry:
        """Entry i, made now; raises IndexError outside [0, len)."""
        c = self.columns
        if not 0 <= i < len(c.kind):
            raise IndexError(i)
        kind = c.kind[i]
        chunks = tuple(self.chunk(j) for j in self.chunk_range(i))
        if kind & DIGEST_IS_CHUNK:
            digest = chunks[0].digest
        elif kind & DIGEST_IS_EMPTY:
            digest = EMPTY_DIGEST
        else:
            digest = self._digests.get(i)
        fields: dict[str, Any] = {
            "mode": c.mode[i], "uid": c.uid[i], "gid": c.gid[i], "size": c.size[i],
            "mtime_ns": c.mtime_ns[i], "link_name": self._links.get(i), "digest": digest,
        }  # fmt: skip
        odd = self._odd.get(i)
        if odd is not None:
            fields.update(odd)
            fields.pop("dir", None)
            dev_major, dev_minor = fields.pop("dev", (0, 0))
            fields.update(dev_major=dev_major, dev_minor=dev_minor)
        type_ = fields.pop("type", None) or ENTRY_TYPES[kind & TYPE_MASK]
        return Entry(self.name(i), type_, chunks=chunks, **fields)


class _Entries(Sequence[Entry]):
    __slots__ = ("_toc",)

    def __init__(self, toc: Toc) -> None:
        self._toc = toc

    def __len__(self) -> int:
        return len(self._toc)

    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Entry]: ...
    def __getitem__(self, i: int | slice) -> Entry | Sequence[Entry]:
        if isinstance(i, slice):
            return [self._toc.entry(k) for k in range(*i.indices(len(self)))]
        return self._toc.entry(i + len(self) if i < 0 else i)

    def __iter__(self) -> Iterator[Entry]:
        for i in range(len(self)):
            yield self._toc.entry(i)
