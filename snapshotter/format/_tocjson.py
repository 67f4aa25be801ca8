"""The eStargz TOC JSON validated into `format.toc.Toc`; re-exported by `format/estargz.py`.

Kept apart only for size: this is the code a hostile TOC talks to, so every rule is here.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime
import itertools
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from snapshotter.errors import InvalidArgument
from snapshotter.format._jsonstream import JsonStream
from snapshotter.format._tocbuild import TocBuilder
from snapshotter.format.toc import ENTRY_TYPES, Toc

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
# What `Digest.parse` accepts, without building a Digest per chunk.
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def parse_toc(
    toc_json: bytes | Iterable[bytes],
    *,
    blob_size: int,
    toc_offset: int,
    max_entries: int = 1_000_000,
) -> Toc:
    """Validate the eStargz TOC JSON (bytes, or byte pieces in order) and build the
    compact `Toc`.

    Names are normalised ("./a/b/" -> "a/b"); names with ".." or NUL are refused, so no
    entry escapes the layer. A name may appear once, except that a directory may be
    declared again as a directory: the later attributes win, as when containerd applies a
    tar. Hardlinks must name an earlier non-directory entry (chains resolve to the
    first). `chunk` entries must follow the `reg` entry of their file and tile it exactly
    (chunkSize 0: to the end of the file). Payload offsets lie in [0, toc_offset) and do
    not decrease in TOC order, as writers emit them; a chunk's member ends at the next
    larger offset (or the TOC), and chunks sharing a member (innerOffset) never share
    bytes. Every non-empty chunk needs a chunkDigest (or, for a file stored as a single
    chunk, its `digest`, which is all legacy CRFS TOCs have). Missing parents become 0o755
    directories. The landmark files are recorded in `Toc.prefetch_landmark` /
    `Toc.no_prefetch` and left out of `entries`. Anything else raises InvalidTOC naming
    the entry; the document is decoded one entry at a time to bound peak memory.
    """
    if not 0 <= toc_offset < blob_size:
        raise InvalidTOC(f"eStargz toc: offset {toc_offset} outside blob of {blob_size} bytes")
    return _TocParser(blob_size, toc_offset).parse(_entries(toc_json, max_entries))


def _entries(toc_json: bytes | Iterable[bytes], max_entries: int) -> Iterator[Any]:
    """The items of the top-level "entries" array, decoded one at a time.

    `json.loads` of a 100k-entry TOC holds ~1.2 KB of dicts per entry at once, which
    would set the daemon's peak RSS; here only one entry's dict is alive at a time, and
    only a window of the text is decoded (`_jsonstream.py`).
    """
    s = JsonStream(toc_json)
    seen_entries = False
    try:
        s.expect("{")
        c = s.expect("}") if s.peek() == "}" else ","
        while c == ",":
            key = s.value()
            if not isinstance(key, str):
                raise InvalidTOC(f"eStargz toc: not JSON: bad key at char {s.offset}")
            s.expect(":")
            if key != "entries":
                value = s.value()
                if key == "version" and value != 1:
                    raise InvalidTOC(f"eStargz toc: unsupported version {value!r}")
            elif seen_entries:
                raise InvalidTOC("eStargz toc: two 'entries' lists")
            else:
                seen_entries = True
                s.expect("[")
                item = s.expect("]") if s.peek() == "]" else ","
                n = 0
                while item == ",":
                    n += 1
                    if n > max_entries:
                        raise InvalidTOC(f"eStargz toc: over the limit {max_entries} entries")
                    yield s.value()
                    item = s.expect(",]")
            c = s.expect(",}")
        if s.peek():
            raise InvalidTOC(f"eStargz toc: trailing data at char {s.offset}")
    except UnicodeDecodeError as exc:
        raise InvalidTOC(f"eStargz toc: not UTF-8 JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidTOC(f"eStargz toc: not JSON: {exc}") from None
    if not seen_entries:
        raise InvalidTOC("eStargz toc: not an object with an 'entries' list")


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
    if not name.isascii():
        try:
            name.encode()
        except UnicodeEncodeError:
            raise _fail(i, name, "name is not valid unicode") from None
    if "\0" in name:
        raise _fail(i, name, "NUL in name")
    if (
        len(name) <= 255
        and ".." not in name
        and "//" not in name
        and "/./" not in name
        and not name.startswith("./")
        and not name.endswith("/.")
        and name != "."
    ):
        return name.strip("/")  # the common case: no empty, "." or ".." component
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise _fail(i, name, "'..' in name")
    if any(len(p) > 255 for p in parts):
        raise _fail(i, name, "over-long component in name")
    return "/".join(parts)


def _mtime_ns(text: object, i: int, name: str) -> int:
    if text in (None, ""):
        return 0
    m = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise _fail(i, name, f"modtime {text!r} is not RFC 3339")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        datetime.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s))  # range check
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
    if not isinstance(v, str) or _DIGEST.fullmatch(v) is None:
        raise _fail(i, name, f"{key} {v!r} is missing or not a digest")
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


class _File:
    """The non-empty reg entry that `chunk` entries may still extend."""

    __slots__ = ("at", "digest", "name", "size")

    def __init__(self, name: str, size: int, digest: str) -> None:
        self.name = name
        self.size = size
        self.digest = digest
        self.at = 0  # file offset the next chunk must start at


class _TocParser:
    """One pass. A chunk's member ends at the next larger offset, so payload offsets
    must not decrease in TOC order (writers emit entries in blob order); a chunk's row
    is written when it appears and its member end filled in when the next offset does."""

    def __init__(self, blob_size: int, toc_offset: int) -> None:
        self.blob_size = blob_size
        self.toc_offset = toc_offset
        self.toc = TocBuilder()
        self.toc.add("", "dir", mode=0o755)
        self.open_reg: _File | None = None  # the file `chunk` entries may extend
        self.landmark: int | None = None
        self.no_prefetch = False
        self.mtimes: dict[str, int] = {}  # modtime text -> ns: images repeat a few
        self.offset = -1  # the largest payload offset so far
        # chunks starting at `self.offset`, waiting for the next offset to end them:
        # (chunk row, inner_offset, size, file name)
        self.waiting: list[tuple[int, int, int, str]] = []

    def parse(self, raw_entries: Iterator[Any]) -> Toc:
        for i, raw in enumerate(raw_entries):
            if not isinstance(raw, dict):
                raise _fail(i, None, "not an object")
            self._entry(i, raw)
        self._close_reg()
        self._advance(self.toc_offset)
        return self.toc.build(
            toc_offset=self.toc_offset,
            blob_size=self.blob_size,
            prefetch_landmark=self.landmark,
            no_prefetch=self.no_prefetch,
        )

    def _entry(self, i: int, raw: dict[str, Any]) -> None:
        # The hot loop of a pull (tens of thousands of entries): the checks of `_int` are
        # inlined, and `_int` is called only to raise with its message.
        get = raw.get
        name = _norm(get("name"), i)
        typ = get("type")
        if typ == "chunk":
            return self._chunk(i, raw, name)
        if self.open_reg is not None:
            self._close_reg()
        if typ not in ENTRY_TYPES:
            raise _fail(i, name, f"unknown type {typ!r}")
        if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            return self._landmark(i, raw, name, typ)
        if name == "" and typ != "dir":
            raise _fail(i, name, f"the root must be a directory, not {typ}")
        self._parents(i, name)
        text = get("modtime")
        mtime = self.mtimes.get(text) if type(text) is str else None
        if mtime is None:
            mtime = _mtime_ns(text, i, name)
            if isinstance(text, str):
                self.mtimes[text] = mtime
        mode, uid, gid = get("mode", 0), get("uid", 0), get("gid", 0)
        if type(mode) is not int or not 0 <= mode <= _MAX_INT:
            _int(raw, "mode", i)
        if type(uid) is not int or not 0 <= uid <= _MAX_ID:
            _int(raw, "uid", i, _MAX_ID)
        if type(gid) is not int or not 0 <= gid <= _MAX_ID:
            _int(raw, "gid", i, _MAX_ID)
        mode &= 0o7777
        xattrs = _xattrs(get("xattrs"), i, name) if "xattrs" in raw else ()
        toc = self.toc
        pos = toc.find(name)
        if pos is not None:
            if typ == "dir" and toc.type(pos) == "dir":
                toc.set_attrs(pos, mode=mode, uid=uid, gid=gid, mtime_ns=mtime, xattrs=xattrs)
                return None
            raise _fail(i, name, f"duplicate entry ({toc.type(pos)}, then {typ})")
        size, major, minor, link, digest = 0, 0, 0, "", ""
        if typ == "reg":
            size = get("size", 0)
            if type(size) is not int or not 0 <= size <= _MAX_INT:
                _int(raw, "size", i)
            digest = get("digest", "")
            if digest != "" and (type(digest) is not str or _DIGEST.fullmatch(digest) is None):
                _digest(raw, "digest", i, name, required=False)
        elif typ == "symlink":
            target = raw.get("linkName")
            if not isinstance(target, str) or not target or "\0" in target:
                raise _fail(i, name, f"bad symlink target {target!r}")
            link = target
        elif typ == "hardlink":
            link = self._link_target(i, raw, name)
        elif typ in ("char", "block"):
            major = _int(raw, "devMajor", i, _MAX_ID)
            minor = _int(raw, "devMinor", i, _MAX_ID)
        toc.add(
            name, typ, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=mtime,
            link_name=link, dev_major=major, dev_minor=minor, xattrs=xattrs, digest=digest,
            new=True,
        )  # fmt: skip
        if size:
            self.open_reg = _File(name, size, digest)
            if get("chunkOffset", 0) != 0:
                raise _fail(i, name, "the reg entry must hold the chunk at file offset 0")
            self._chunk(i, raw, name)
        return None

    def _parents(self, i: int, name: str) -> None:
        cut = name.rfind("/")
        if cut < 0:
            return
        parent = name[:cut]
        pos = self.toc.find(parent)
        if pos is None:
            self._parents(i, parent)
            self.toc.add(parent, "dir", mode=0o755)
        elif (typ := self.toc.type(pos)) != "dir":
            raise _fail(i, name, f"parent {parent!r} is a {typ}")

    def _chunk(self, i: int, raw: dict[str, Any], name: str) -> None:
        f = self.open_reg
        if f is None or f.name != name:
            raise _fail(i, name, "chunk entry does not follow a non-empty reg entry of that name")
        get = raw.get
        chunk_offset, size, inner, offset = (
            get("chunkOffset", 0), get("chunkSize", 0), get("innerOffset", 0), get("offset", 0)
        )
        for key, v in (("chunkOffset", chunk_offset), ("chunkSize", size),
                       ("innerOffset", inner), ("offset", offset)):  # fmt: skip
            if type(v) is not int or not 0 <= v <= _MAX_INT:
                _int(raw, key, i)
        size = size or f.size - chunk_offset  # 0: to the end
        if chunk_offset != f.at or size <= 0 or f.at + size > f.size:
            raise _fail(
                i, name, f"chunk at file offset {chunk_offset} (size {size}) does not continue "
                f"at {f.at} within a file of {f.size} bytes",
            )  # fmt: skip
        f.at += size
        whole = size == f.size and f.digest
        # Legacy (CRFS) TOCs have no chunkDigest; a one-chunk file's digest says the same.
        digest = get("chunkDigest", "")
        if type(digest) is not str or _DIGEST.fullmatch(digest) is None:
            digest = _digest(raw, "chunkDigest", i, name, required=not whole) or f.digest
        if offset != self.offset:
            self._advance(offset, i, name)
        row = self.toc.add_chunk(chunk_offset, size, offset, inner, digest)
        self.waiting.append((row, inner, size, name))

    def _close_reg(self) -> None:
        f, self.open_reg = self.open_reg, None
        if f is not None and f.at != f.size:
            raise InvalidTOC(f"eStargz toc entry {f.name!r}: chunks cover {f.at} of {f.size} bytes")

    def _advance(self, offset: int, i: int = -1, name: str = "") -> None:
        """A member starts at `offset`: it ends the members of the waiting chunks."""
        if offset == self.offset:
            return
        if offset < self.offset:
            raise _fail(i, name, f"offset {offset} is before an earlier entry's {self.offset}")
        if offset >= self.toc_offset and i >= 0:
            raise _fail(i, name, f"offset {offset} is not before the toc ({self.toc_offset})")
        waiting, self.waiting = self.waiting, []
        if len(waiting) > 1:
            waiting.sort(key=lambda w: w[1])
            for a, b in itertools.pairwise(waiting):
                if a[1] + a[2] > b[1]:
                    raise InvalidTOC(
                        f"eStargz toc entries {a[3]!r} and {b[3]!r}: chunks overlap in the "
                        f"member at blob offset {self.offset}"
                    )
        for row, _, _, _ in waiting:
            self.toc.set_chunk_end(row, offset)
        self.offset = offset

    def _landmark(self, i: int, raw: dict[str, Any], name: str, typ: str) -> None:
        if typ != "reg":
            raise _fail(i, name, f"landmark is a {typ}, not a reg")
        offset = 0
        if _int(raw, "size", i) > 0:
            offset = _int(raw, "offset", i)
            self._advance(offset, i, name)  # its member ends the chunk before it
        if name == PREFETCH_LANDMARK:
            self.landmark = offset
        else:
            self.no_prefetch = True

    def _link_target(self, i: int, raw: dict[str, Any], name: str) -> str:
        target = _norm(raw.get("linkName"), i)
        pos = self.toc.find(target)
        if pos is None or not target:
            raise _fail(i, name, f"hardlink target {target!r} is not an earlier entry")
        typ = self.toc.type(pos)
        if typ == "dir":
            raise _fail(i, name, f"hardlink target {target!r} is a directory")
        return self.toc.link_name(pos) if typ == "hardlink" else target
