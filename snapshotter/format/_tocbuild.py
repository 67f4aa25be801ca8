"""`TocBuilder`: fills a `format.toc.Toc` column by column, for the TOC parser and for
`Toc(entries=...)`. Kept apart from the model only for size."""

from __future__ import annotations

import io
from array import array
from bisect import bisect_left
from typing import Any

from snapshotter.format.toc import (
    DIGEST_IS_CHUNK,
    DIGEST_IS_EMPTY,
    EMPTY_DIGEST,
    ENTRY_TYPES,
    NO_PARENT,
    OTHER_TYPE,
    TYPE_CODE,
    TYPE_MASK,
    Toc,
    TocColumns,
)

__all__ = ["TocBuilder", "raw_sha256"]

_SHA256 = "sha256:"
_U32 = 0xFFFF_FFFF
_CHUNK_COLUMNS = ("_c_pos", "_c_size", "_c_offset", "_c_end", "_c_inner")


class TocBuilder:
    """Fills a `Toc` one entry at a time, for the TOC parser and `Toc(entries=...)`.

    `add` appends an entry; `add_chunk` appends a chunk to the entry added last (so
    a file's chunks must come right after it). `find` maps a path to its first row while
    building; the path index is dropped by `build`. The builder checks no format rule:
    the parser does that, and `fs/tree.py` refuses what cannot be a tree.
    """

    def __init__(self) -> None:
        # BytesIO, not bytearray: `getvalue()` hands the buffer to the Toc where bytes()
        # would copy it, and the copies were the parse's peak (~40 B/entry).
        self._names = io.BytesIO()
        self._name_at = array("I", [0])
        self._parent = array("I")
        self._kind = array("B")
        self._mode = array("H")
        self._uid = array("I")
        self._gid = array("I")
        self._mtime = array("q")
        self._size = array("Q")
        self._chunk_at = array("I")
        # 32-bit until a value needs more (a file or blob over 4 GiB): 20 bytes a chunk.
        self._c_pos, self._c_size = array("I"), array("I")
        self._c_offset, self._c_end, self._c_inner = array("I"), array("I"), array("I")
        self._c_digest = io.BytesIO()
        self._c_last = ""  # digest of the last chunk added, as given
        self._c_odd: dict[int, str] = {}
        self._links = _SparseText()
        self._digests = _SparseText()  # file digests that are not implied by kind flags
        self._odd: dict[int, dict[str, Any]] = {}
        # Full path -> first row. Its keys are mostly the very str objects the parser was
        # handed (it frees each decoded entry as it goes), so the index costs the table
        # alone and the parse's peak (the decoded entries) is unchanged; a table of hashes
        # that rebuilt paths from the columns to confirm a hit took 40 % of the parse.
        self._paths: dict[str, int] = {}
        self._orphans: dict[int, str] = {}  # row -> its directory, not seen (yet)
        self._digest = ""  # file digest of the last entry, until its chunks are known

    def __len__(self) -> int:
        return len(self._kind)

    def find(self, name: str) -> int | None:
        return self._paths.get(name)

    def type(self, i: int) -> str:
        code = self._kind[i] & TYPE_MASK
        return ENTRY_TYPES[code] if code != OTHER_TYPE else self._odd[i]["type"]

    def link_name(self, i: int) -> str:
        return self._links.get(i)

    def add(
        self, name: str, type: str, *, mode: int = 0, uid: int = 0, gid: int = 0,
        size: int = 0, mtime_ns: int = 0, link_name: str = "", dev_major: int = 0,
        dev_minor: int = 0, xattrs: tuple[tuple[str, bytes], ...] = (), digest: str = "",
        new: bool = False,
    ) -> int:  # fmt: skip
        """Append an entry; returns its row. `new`: the caller found `name` absent."""
        if self._digest:
            self._end_file()
        i = len(self._kind)
        dirname, _, base = name.rpartition("/")
        parent = 0
        if dirname:
            found = self._paths.get(dirname)
            if found is None:
                self._orphans[i] = dirname
            else:
                parent = found + 1
        if new:
            self._paths[name] = i
        else:
            self._paths.setdefault(name, i)
        self._name_at.append(self._name_at[-1] + self._names.write(base.encode()))
        self._parent.append(parent)
        self._chunk_at.append(len(self._c_pos))
        code = TYPE_CODE.get(type, OTHER_TYPE)
        self._kind.append(code)
        odd: dict[str, Any] | None = None if code != OTHER_TYPE else {"type": type}
        try:
            self._mode.append(mode)
            self._uid.append(uid)
            self._gid.append(gid)
            self._mtime.append(mtime_ns)
            self._size.append(size)
        except OverflowError:
            odd = odd or {}
            self._spill(i, odd, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, size=size)
        if xattrs or dev_major or dev_minor:
            odd = odd or {}
            if xattrs:
                odd["xattrs"] = xattrs
            if dev_major or dev_minor:
                odd["dev"] = (dev_major, dev_minor)
        if odd:
            self._odd[i] = odd
        if link_name:
            self._links.add(i, link_name)
        self._digest = digest
        return i

    def _spill(self, i: int, odd: dict[str, Any], **values: int) -> None:
        """Store values that do not fit their column as 0 there and in full in `odd`."""
        for key, col in (
            ("mode", self._mode), ("uid", self._uid), ("gid", self._gid),
            ("mtime_ns", self._mtime), ("size", self._size),
        ):  # fmt: skip
            del col[i:]
            try:
                col.append(values[key])
            except OverflowError:
                col.append(0)
                odd[key] = values[key]

    def set_attrs(
        self, i: int, *, mode: int, uid: int, gid: int, mtime_ns: int,
        xattrs: tuple[tuple[str, bytes], ...] = (),
    ) -> None:  # fmt: skip
        """New attributes for a directory declared again (the later declaration wins)."""
        self._mode[i], self._uid[i], self._gid[i], self._mtime[i] = mode, uid, gid, mtime_ns
        odd = self._odd.pop(i, {})
        odd.pop("xattrs", None)
        if xattrs:
            odd["xattrs"] = xattrs
        if odd:
            self._odd[i] = odd

    def add_chunk(
        self, chunk_offset: int, size: int, offset: int, inner_offset: int, digest: str,
        end: int = 0, sha256: bytes | None = None,
    ) -> int:  # fmt: skip
        """Append a chunk of the last entry; returns its row (for `set_chunk_end`).
        `sha256`: `raw_sha256(digest)`, when the caller has it already."""
        j = len(self._c_pos)
        try:
            self._c_pos.append(chunk_offset)
            self._c_size.append(size)
            self._c_offset.append(offset)
            self._c_end.append(end)
            self._c_inner.append(inner_offset)
        except OverflowError:
            for attr, value in zip(
                _CHUNK_COLUMNS, (chunk_offset, size, offset, end, inner_offset), strict=True
            ):
                col = getattr(self, attr)
                del col[j:]  # the columns appended to before the one that overflowed
                self._wide(attr, value).append(value)
        raw = sha256 or raw_sha256(digest)
        if raw is None:
            self._c_odd[j] = digest
            raw = bytes(32)
        self._c_digest.write(raw)
        self._c_last = digest
        return j

    def set_chunk_end(self, j: int, end: int) -> None:
        try:
            self._c_end[j] = end
        except OverflowError:
            self._wide("_c_end", end)[j] = end

    def _wide(self, attr: str, value: int) -> array[int]:
        """Chunk column `attr`, widened to 64 bits first if `value` needs it."""
        col: array[int] = getattr(self, attr)
        if value > _U32 and col.typecode == "I":
            col = array("Q", col)
            setattr(self, attr, col)
        return col

    def _end_file(self) -> None:
        """Record the last entry's file digest now that its chunks are all known."""
        digest, self._digest = self._digest, ""
        if not digest:
            return
        i = len(self._kind) - 1
        first = self._chunk_at[i]
        # One chunk: the last added. Its digest as given equals what the columns give
        # back (only canonical lowercase sha256 is stored raw).
        if len(self._c_pos) - first == 1 and digest == self._c_last:
            self._kind[i] |= DIGEST_IS_CHUNK
        elif digest == EMPTY_DIGEST and first == len(self._c_pos):
            self._kind[i] |= DIGEST_IS_EMPTY
        else:
            self._digests.add(i, digest)

    def build(
        self, *, toc_offset: int = 0, blob_size: int = 0,
        prefetch_landmark: int | None = None, no_prefetch: bool = False,
    ) -> Toc:  # fmt: skip
        toc = Toc.__new__(Toc)  # the columns are handed over, not copied
        self._finish(toc, toc_offset, blob_size, prefetch_landmark, no_prefetch)
        return toc

    def _finish(
        self, toc: Toc, toc_offset: int, blob_size: int, prefetch_landmark: int | None,
        no_prefetch: bool,
    ) -> None:  # fmt: skip
        """Hand the columns to `toc` (its slots are this module's to fill)."""
        self._end_file()
        for i, dirname in self._orphans.items():  # a parent declared after its child
            found = self._paths.get(dirname)
            if found is not None and found != i:
                self._parent[i] = found + 1
            else:
                self._parent[i] = NO_PARENT
                self._odd.setdefault(i, {})["dir"] = dirname
        self._paths, self._orphans = {}, {}
        self._chunk_at.append(len(self._c_pos))
        toc.columns = TocColumns(
            names=self._names.getvalue(), name_at=self._name_at, parent=self._parent,
            kind=self._kind, mode=self._mode, uid=self._uid, gid=self._gid,
            mtime_ns=self._mtime, size=self._size, chunk_at=self._chunk_at,
        )  # fmt: skip
        toc._c_pos, toc._c_size, toc._c_offset = self._c_pos, self._c_size, self._c_offset
        toc._c_end, toc._c_inner = self._c_end, self._c_inner
        toc._c_digest, toc._c_odd = self._c_digest.getvalue(), self._c_odd
        toc._links, toc._digests = self._links.frozen(), self._digests.frozen()
        toc._odd = self._odd
        toc.toc_offset, toc.blob_size = toc_offset, blob_size
        toc.prefetch_landmark, toc.no_prefetch = prefetch_landmark, no_prefetch
        self.__init__()  # type: ignore[misc]  # the Toc owns the columns now


class _SparseText:
    """Strings for some rows (link targets), in one buffer: a dict of str would leave a
    small object per link scattered over the heap, pinning the pages freed around it."""

    __slots__ = ("_at", "_rows", "_text")

    def __init__(self) -> None:
        self._rows = array("I")  # ascending
        self._at = array("I", [0])
        self._text: bytes | bytearray = bytearray()

    def add(self, row: int, value: str) -> None:
        if self._rows and row <= self._rows[-1]:
            raise ValueError(f"row {row} added out of order")
        self._rows.append(row)
        self._text += value.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates
        self._at.append(len(self._text))

    def get(self, row: int) -> str:
        k = bisect_left(self._rows, row)
        if k == len(self._rows) or self._rows[k] != row:
            return ""
        return self._text[self._at[k] : self._at[k + 1]].decode("utf-8", "surrogatepass")

    def frozen(self) -> _SparseText:
        self._text = bytes(self._text)
        return self


def raw_sha256(digest: str) -> bytes | None:
    """The 32 bytes of a lowercase "sha256:<hex>" digest, or None for anything else."""
    if len(digest) != 71 or not digest.startswith(_SHA256):
        return None
    hex_ = digest[7:]
    try:
        raw = bytes.fromhex(hex_)
    except ValueError:
        return None
    # 32 bytes from 64 characters: no blanks (fromhex skips them); then only case is left.
    return raw if len(raw) == 32 and (hex_.islower() or hex_.isdigit()) else None
