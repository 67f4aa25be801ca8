"""The eStargz TOC JSON validated into `format.toc.Toc`; re-exported by `format/estargz.py`.

Kept apart only for size: this is the code a hostile TOC talks to, so every rule is here.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import calendar
import itertools
import json
import re
import sys
from typing import Any

from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument
from snapshotter.format.toc import ENTRY_TYPES, Chunk, Entry, Toc

__all__ = ["NO_PREFETCH_LANDMARK", "PREFETCH_LANDMARK", "InvalidTOC", "parse_toc"]

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"


class InvalidTOC(InvalidArgument):
    """The TOC member or its JSON is malformed or hostile; the layer must not be served."""


_MAX_ID = 0xFFFF_FFFF
_MAX_INT = (1 << 63) - 1
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?([Zz]|[+-]\d\d:\d\d)"
)
# Fields of a `reg` or `chunk` entry that describe one chunk, as parsed: (chunk_offset,
# chunk_size, offset, inner_offset, digest).
_RawChunk = tuple[int, int, int, int, str]


def parse_toc(
    toc_json: bytes, *, blob_size: int, toc_offset: int, max_entries: int = 1_000_000
) -> Toc:
    """Validate the eStargz TOC JSON and build the compact `Toc`.

    Names are normalised ("./a/b/" -> "a/b"); names with ".." or NUL are refused, so no
    entry escapes the layer. A name may appear once, except that a directory may be
    declared again as a directory: the later attributes win, as when containerd applies a
    tar. Hardlinks must name an earlier non-directory entry; `chunk` entries must follow
    the `reg` entry of their file and tile it exactly; chunks lie inside [0, toc_offset)
    and never share uncompressed bytes. Missing parents become 0o755 directories. The
    landmark files are recorded in `Toc.prefetch_landmark` / `Toc.no_prefetch` and left
    out of `entries`. Anything else raises InvalidTOC naming the entry.
    """
    if not 0 <= toc_offset < blob_size:
        raise InvalidTOC(f"eStargz toc: offset {toc_offset} outside blob of {blob_size} bytes")
    try:
        doc = json.loads(toc_json)
    except (ValueError, RecursionError) as exc:
        raise InvalidTOC(f"eStargz toc: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise InvalidTOC("eStargz toc: not an object with an 'entries' list")
    if doc.get("version", 1) != 1:
        raise InvalidTOC(f"eStargz toc: unsupported version {doc.get('version')!r}")
    raw_entries = doc["entries"]
    if len(raw_entries) > max_entries:
        raise InvalidTOC(f"eStargz toc: {len(raw_entries)} entries, over the limit {max_entries}")
    return _TocParser(blob_size, toc_offset).parse(raw_entries)


def _fail(i: int, name: object, why: str) -> InvalidTOC:
    return InvalidTOC(f"eStargz toc entry #{i} {name!r}: {why}")


def _int(raw: dict[str, Any], key: str, i: int, limit: int = _MAX_INT) -> int:
    v = raw.get(key, 0)
    if type(v) is not int or not 0 <= v <= limit:
        raise _fail(i, raw.get("name"), f"{key} {v!r} is not an integer in [0, {limit}]")
    return v


def _norm(name: object, i: int) -> str:
    if not isinstance(name, str):
        raise _fail(i, name, "name is not a string")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise _fail(i, name, "'..' in name")
    if "\0" in name or any(len(p) > 255 for p in parts):
        raise _fail(i, name, "NUL or an over-long component in name")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise _fail(i, name, "name is not valid unicode") from None
    return "/".join(parts)


def _mtime_ns(text: object, i: int, name: str) -> int:
    if text in (None, ""):
        return 0
    m = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise _fail(i, name, f"modtime {text!r} is not RFC 3339")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s), 0, 0, 0))
    except (ValueError, OverflowError):
        raise _fail(i, name, f"modtime {text!r} is out of range") from None
    if tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return secs * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def _digest(raw: dict[str, Any], key: str, i: int, name: str, *, required: bool) -> str:
    v = raw.get(key, "")
    if v == "" and not required:
        return ""
    if not isinstance(v, str):
        raise _fail(i, name, f"{key} {v!r} is not a string")
    try:
        Digest.parse(v)
    except InvalidArgument:
        raise _fail(i, name, f"{key} {v!r} is missing or not a digest") from None
    return v


def _xattrs(raw: object, i: int, name: str) -> tuple[tuple[str, bytes], ...]:
    if raw is None or raw == {}:
        return ()
    if not isinstance(raw, dict):
        raise _fail(i, name, "xattrs is not an object")
    out = []
    for k, v in raw.items():
        if not k or "\0" in k or not isinstance(v, str):
            raise _fail(i, name, f"bad xattr {k!r}")
        try:
            out.append((sys.intern(k), base64.b64decode(v, validate=True)))
        except binascii.Error:
            raise _fail(i, name, f"xattr {k!r} value is not base64") from None
    return tuple(out)


class _TocParser:
    """One pass over the entries, then a pass that turns raw chunks into `Chunk`s once
    every compressed offset (and so every chunk's end) is known."""

    def __init__(self, blob_size: int, toc_offset: int) -> None:
        self.blob_size = blob_size
        self.toc_offset = toc_offset
        self.entries: list[Entry] = [Entry("", "dir", mode=0o755)]
        self.index: dict[str, int] = {"": 0}
        self.chunks: dict[int, list[_RawChunk]] = {}  # reg entry position -> its chunks
        self.open_reg: int | None = None  # the reg entry `chunk` entries may extend
        self.landmark: int | None = None
        self.no_prefetch = False
        self.extra_offsets: list[int] = []  # landmarks' members count for chunk ends
        self.ints: dict[int, int] = {}  # one int object per distinct mtime and offset

    def parse(self, raw_entries: list[Any]) -> Toc:
        for i, raw in enumerate(raw_entries):
            if not isinstance(raw, dict):
                raise _fail(i, None, "not an object")
            self._entry(i, raw)
        self._finish_chunks()
        return Toc(
            entries=tuple(self.entries),
            toc_offset=self.toc_offset,
            blob_size=self.blob_size,
            prefetch_landmark=self.landmark,
            no_prefetch=self.no_prefetch,
        )

    def _entry(self, i: int, raw: dict[str, Any]) -> None:
        name = _norm(raw.get("name"), i)
        typ = raw.get("type")
        if typ == "chunk":
            return self._chunk(i, raw, name)
        self.open_reg = None
        if typ not in ENTRY_TYPES:
            raise _fail(i, name, f"unknown type {typ!r}")
        if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            return self._landmark(i, raw, name, typ)
        if name == "" and typ != "dir":
            raise _fail(i, name, f"the root must be a directory, not {typ}")
        self._parents(i, name)
        mtime = _mtime_ns(raw.get("modtime"), i, name)
        common: dict[str, Any] = {
            "mode": _int(raw, "mode", i) & 0o7777,
            "uid": _int(raw, "uid", i, _MAX_ID),
            "gid": _int(raw, "gid", i, _MAX_ID),
            "mtime_ns": self.ints.setdefault(mtime, mtime),
            "xattrs": _xattrs(raw.get("xattrs"), i, name),
        }
        pos = self.index.get(name)
        if pos is not None:
            if typ == "dir" and self.entries[pos].type == "dir":
                self.entries[pos] = Entry(name, "dir", **common)
                return None
            raise _fail(i, name, f"duplicate entry ({self.entries[pos].type}, then {typ})")
        if typ == "reg":
            return self._reg(i, raw, name, common)
        if typ == "symlink":
            target = raw.get("linkName")
            if not isinstance(target, str) or not target or "\0" in target:
                raise _fail(i, name, f"bad symlink target {target!r}")
            entry = Entry(name, typ, link_name=target, **common)
        elif typ == "hardlink":
            entry = Entry(name, typ, link_name=self._link_target(i, raw, name), **common)
        elif typ in ("char", "block"):
            major = _int(raw, "devMajor", i, _MAX_ID)
            minor = _int(raw, "devMinor", i, _MAX_ID)
            entry = Entry(name, typ, dev_major=major, dev_minor=minor, **common)
        else:  # dir, fifo
            entry = Entry(name, typ, **common)
        self._add(entry)
        return None

    def _add(self, entry: Entry) -> int:
        self.index[entry.name] = pos = len(self.entries)
        self.entries.append(entry)
        return pos

    def _parents(self, i: int, name: str) -> None:
        cut = name.rfind("/")
        if cut < 0:
            return
        parent = name[:cut]
        pos = self.index.get(parent)
        if pos is None:
            self._parents(i, parent)
            self._add(Entry(parent, "dir", mode=0o755))
        elif self.entries[pos].type != "dir":
            raise _fail(i, name, f"parent {parent!r} is a {self.entries[pos].type}")

    def _reg(self, i: int, raw: dict[str, Any], name: str, common: dict[str, Any]) -> None:
        size = _int(raw, "size", i)
        digest = _digest(raw, "digest", i, name, required=False)
        if size == 0:
            self._add(Entry(name, "reg", digest=digest, **common))
            return
        if raw.get("chunkOffset", 0) != 0:
            raise _fail(i, name, "the reg entry must hold the chunk at file offset 0")
        first = self._raw_chunk(i, raw, name)
        if first[4] == digest:
            first = (*first[:4], digest)  # share one string object for single-chunk files
        # The Entry is rebuilt with its chunks in _finish_chunks; hold them aside until then.
        pos = self._add(Entry(name, "reg", size=size, digest=digest, **common))
        self.chunks[pos] = [first]
        self.open_reg = pos

    def _raw_chunk(self, i: int, raw: dict[str, Any], name: str) -> _RawChunk:
        offset = _int(raw, "offset", i)
        if offset >= self.toc_offset:
            raise _fail(i, name, f"chunk offset {offset} is not before the toc ({self.toc_offset})")
        return (
            _int(raw, "chunkOffset", i),
            _int(raw, "chunkSize", i),
            self.ints.setdefault(offset, offset),
            _int(raw, "innerOffset", i),
            _digest(raw, "chunkDigest", i, name, required=True),
        )

    def _chunk(self, i: int, raw: dict[str, Any], name: str) -> None:
        if self.open_reg is None or self.entries[self.open_reg].name != name:
            raise _fail(i, name, "chunk entry does not follow a reg entry of the same name")
        self.chunks[self.open_reg].append(self._raw_chunk(i, raw, name))

    def _landmark(self, i: int, raw: dict[str, Any], name: str, typ: str) -> None:
        if typ != "reg":
            raise _fail(i, name, f"landmark is a {typ}, not a reg")
        if _int(raw, "size", i) > 0:
            offset = _int(raw, "offset", i)
            if offset >= self.toc_offset:
                raise _fail(i, name, f"offset {offset} is not before the toc")
            self.extra_offsets.append(offset)
        else:
            offset = 0
        if name == PREFETCH_LANDMARK:
            self.landmark = offset
        else:
            self.no_prefetch = True

    def _link_target(self, i: int, raw: dict[str, Any], name: str) -> str:
        target = _norm(raw.get("linkName"), i)
        pos = self.index.get(target)
        if pos is None or not target:
            raise _fail(i, name, f"hardlink target {target!r} is not an earlier entry")
        entry = self.entries[pos]
        if entry.type == "dir":
            raise _fail(i, name, f"hardlink target {target!r} is a directory")
        return entry.link_name if entry.type == "hardlink" else target

    def _finish_chunks(self) -> None:
        offsets = sorted({c[2] for cs in self.chunks.values() for c in cs} | {*self.extra_offsets})
        spans: list[tuple[int, int, int, int]] = []  # (offset, inner, size, entry position)
        for pos, raws in self.chunks.items():
            entry = self.entries[pos]
            chunks = []
            at = 0
            for chunk_offset, chunk_size, offset, inner, digest in raws:
                size = chunk_size or entry.size - chunk_offset
                if chunk_offset != at or size <= 0 or at + size > entry.size:
                    raise InvalidTOC(
                        f"eStargz toc entry {entry.name!r}: chunk at file offset "
                        f"{chunk_offset} (size {chunk_size}) does not continue at {at} "
                        f"within a file of {entry.size} bytes"
                    )
                at += size
                k = bisect.bisect_right(offsets, offset)
                end = offsets[k] if k < len(offsets) else self.toc_offset
                chunks.append(Chunk(chunk_offset, size, offset, end, inner, digest))
                spans.append((offset, inner, size, pos))
            if at != entry.size:
                raise InvalidTOC(
                    f"eStargz toc entry {entry.name!r}: chunks cover {at} of {entry.size} bytes"
                )
            self.entries[pos] = Entry(
                entry.name, "reg", entry.mode, entry.uid, entry.gid, entry.size,
                entry.mtime_ns, xattrs=entry.xattrs, digest=entry.digest, chunks=tuple(chunks),
            )  # fmt: skip
        spans.sort()
        for a, b in itertools.pairwise(spans):
            if a[0] == b[0] and a[1] + a[2] > b[1]:
                raise InvalidTOC(
                    f"eStargz toc entries {self.entries[a[3]].name!r} and "
                    f"{self.entries[b[3]].name!r}: chunks overlap at blob offset {a[0]}"
                )
