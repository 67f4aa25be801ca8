"""The eStargz TOC JSON validated into `format.toc.Toc`; re-exported by `format/estargz.py`.

Kept apart only for size: this is the code a hostile TOC talks to, so every rule is here.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime
import itertools
import json
import re
import sys
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec

from snapshotter.errors import InvalidArgument
from snapshotter.format._tocbuild import TocBuilder, raw_sha256
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
_ENTRY_AT = re.compile(r"`\$\.entries\[(\d+)\]")

_Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT)]
_Id = Annotated[int, msgspec.Meta(ge=0, le=_MAX_ID)]


class _Entry(msgspec.Struct, gc=False):
    """One item of "entries", keys as the TOC spells them, with the JSON types and ranges
    checked by msgspec's decoder (in C: the Python checks it replaces were a third of a
    large TOC's parse, which is on the pull's critical path). Unknown keys are ignored,
    as other readers ignore them."""

    name: str
    type: str = ""
    size: _Count = 0
    modtime: str | None = None
    linkName: str = ""
    mode: _Count = 0
    uid: _Id = 0
    gid: _Id = 0
    devMajor: _Id = 0
    devMinor: _Id = 0
    xattrs: dict[str, str] | None = None
    digest: str = ""
    offset: _Count = 0
    chunkOffset: _Count = 0
    chunkSize: _Count = 0
    chunkDigest: str = ""
    innerOffset: _Count = 0


class _Document(msgspec.Struct):
    entries: list[_Entry]
    version: Any = 1


_DECODER = msgspec.json.Decoder(_Document)


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
    the entry.
    """
    if not 0 <= toc_offset < blob_size:
        raise InvalidTOC(f"eStargz toc: offset {toc_offset} outside blob of {blob_size} bytes")
    data = toc_json if isinstance(toc_json, bytes) else b"".join(toc_json)
    return _TocParser(blob_size, toc_offset).parse(_decode(data, max_entries))


def _decode(data: bytes, max_entries: int) -> list[_Entry]:
    """The document's entries, typed and range-checked.

    The entries are decoded at once (~0.7 KB each until the parse has read them: the
    worker's memory, or the daemon's when it parses itself). Each is a JSON object, so the count
    of "{" bytes bounds how many there can be before anything is decoded: a hostile
    document of tiny entries is refused, not allocated.
    """
    if data.count(b"{") > max_entries + 1:  # the document's own braces, and entries'
        raise InvalidTOC(f"eStargz toc: over the limit {max_entries} entries "
                         f"(counting its JSON objects)")  # fmt: skip
    try:
        doc = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        at = _ENTRY_AT.search(str(exc))
        if at is not None:
            raise InvalidTOC(f"eStargz toc entry #{at[1]}: {exc}") from None
        raise InvalidTOC(f"eStargz toc: not an object with an 'entries' list: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidTOC(f"eStargz toc: not UTF-8 JSON: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidTOC(f"eStargz toc: not JSON: {exc}") from None
    if len(doc.entries) > max_entries:
        raise InvalidTOC(f"eStargz toc: over the limit {max_entries} entries")
    if doc.version != 1 or type(doc.version) not in (int, bool):
        raise InvalidTOC(f"eStargz toc: unsupported version {doc.version!r}")
    if data.count(b'"entries"') > 1 and _entries_keys(data) > 1:
        # The decoder keeps the last of repeated keys, as Go's does (stargz-snapshotter
        # reads the same entries); no writer repeats it, so it is refused when spelled
        # out, as it always was. An escaped spelling resolves like Go's reader.
        raise InvalidTOC("eStargz toc: two 'entries' lists")
    return doc.entries


def _entries_keys(data: bytes) -> int:
    """How many "entries" keys the top-level object has (only for the rare document in
    which the word appears more than once, e.g. as a file name)."""
    last: list[list[str]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        last[:] = [[k for k, _ in items]]
        return dict(items)

    json.loads(data, object_pairs_hook=pairs)  # valid: msgspec decoded it
    return last[0].count("entries") if last else 0


def _fail(i: int, name: object, why: str) -> InvalidTOC:
    return InvalidTOC(f"eStargz toc entry #{i} {name!r}: {why}")


def _norm(name: str, i: int) -> str:
    """The name without empty or "." components; the decoder already refused names that
    are not strings or hold lone surrogates."""
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


def _mtime_ns(text: str | None, i: int, name: str) -> int:
    if not text:
        return 0
    m = _RFC3339.fullmatch(text)
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


def _is_digest(text: str) -> bool:
    return raw_sha256(text) is not None or _DIGEST.fullmatch(text) is not None


def _bad_digest(key: str, value: str, i: int, name: str) -> InvalidTOC:
    return _fail(i, name, f"{key} {value!r} is missing or not a digest")


def _xattrs(raw: dict[str, str], i: int, name: str) -> tuple[tuple[str, bytes], ...]:
    out = []
    for k, v in raw.items():
        if not k or "\0" in k:
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
        self.last_dir = ""  # the last parent found to be a directory
        self.mtimes: dict[str, int] = {}  # modtime text -> ns: images repeat a few
        self.offset = -1  # the largest payload offset so far
        # chunks starting at `self.offset`, waiting for the next offset to end them:
        # (chunk row, inner_offset, size, file name)
        self.waiting: list[tuple[int, int, int, str]] = []

    def parse(self, entries: list[_Entry]) -> Toc:
        """The Toc of `entries`, which it empties: each decoded entry is freed once read,
        so the columns and the path index grow into the memory the entries leave."""
        for i, raw in enumerate(entries):
            entries[i] = None  # type: ignore[call-overload]
            self._entry(i, raw)
        self._close_reg()
        self._advance(self.toc_offset)
        return self.toc.build(
            toc_offset=self.toc_offset,
            blob_size=self.blob_size,
            prefetch_landmark=self.landmark,
            no_prefetch=self.no_prefetch,
        )

    def _entry(self, i: int, raw: _Entry) -> None:
        # The hot loop of a pull (tens of thousands of entries): types and ranges were
        # checked by the decoder, the format's rules are checked here.
        name = _norm(raw.name, i)
        typ = raw.type
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
        text = raw.modtime
        mtime = self.mtimes.get(text)
        if mtime is None:
            mtime = self.mtimes[text] = _mtime_ns(text, i, name)
        mode, uid, gid = raw.mode & 0o7777, raw.uid, raw.gid
        xattrs = _xattrs(raw.xattrs, i, name) if raw.xattrs else ()
        toc = self.toc
        pos = toc.find(name)
        if pos is not None:
            if typ == "dir" and toc.type(pos) == "dir":
                toc.set_attrs(pos, mode=mode, uid=uid, gid=gid, mtime_ns=mtime, xattrs=xattrs)
                return None
            raise _fail(i, name, f"duplicate entry ({toc.type(pos)}, then {typ})")
        size, major, minor, link, digest = 0, 0, 0, "", ""
        if typ == "reg":
            size, digest = raw.size, raw.digest
            # A one-chunk file's digest is its chunk's, which `_chunk` checks.
            if digest and (digest != raw.chunkDigest or not size) and not _is_digest(digest):
                raise _bad_digest("digest", digest, i, name)
        elif typ == "symlink":
            link = raw.linkName
            if not link or "\0" in link:
                raise _fail(i, name, f"bad symlink target {link!r}")
        elif typ == "hardlink":
            link = self._link_target(i, raw, name)
        elif typ in ("char", "block"):
            major, minor = raw.devMajor, raw.devMinor
        toc.add(
            name, typ, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=mtime,
            link_name=link, dev_major=major, dev_minor=minor, xattrs=xattrs, digest=digest,
            new=True,
        )  # fmt: skip
        if size:
            self.open_reg = _File(name, size, digest)
            if raw.chunkOffset != 0:
                raise _fail(i, name, "the reg entry must hold the chunk at file offset 0")
            self._chunk(i, raw, name)
        return None

    def _parents(self, i: int, name: str) -> None:
        cut = name.rfind("/")
        if cut < 0:
            return
        parent = name[:cut]
        if parent == self.last_dir:  # entries come directory by directory
            return
        pos = self.toc.find(parent)
        if pos is None:
            self._parents(i, parent)
            self.toc.add(parent, "dir", mode=0o755)
        elif (typ := self.toc.type(pos)) != "dir":
            raise _fail(i, name, f"parent {parent!r} is a {typ}")
        self.last_dir = parent  # a directory stays one: it may only be declared again as one

    def _chunk(self, i: int, raw: _Entry, name: str) -> None:
        f = self.open_reg
        if f is None or f.name != name:
            raise _fail(i, name, "chunk entry does not follow a non-empty reg entry of that name")
        chunk_offset, offset, inner = raw.chunkOffset, raw.offset, raw.innerOffset
        size = raw.chunkSize or f.size - chunk_offset  # 0: to the end
        if chunk_offset != f.at or size <= 0 or f.at + size > f.size:
            raise _fail(
                i, name, f"chunk at file offset {chunk_offset} (size {size}) does not continue "
                f"at {f.at} within a file of {f.size} bytes",
            )  # fmt: skip
        f.at += size
        digest = raw.chunkDigest
        sha256 = raw_sha256(digest)
        if sha256 is None and _DIGEST.fullmatch(digest) is None:
            # Legacy (CRFS) TOCs have no chunkDigest; a one-chunk file's digest says the same.
            if digest or not (size == f.size and f.digest):
                raise _bad_digest("chunkDigest", digest, i, name)
            digest = f.digest
        if offset != self.offset:
            self._advance(offset, i, name)
        row = self.toc.add_chunk(chunk_offset, size, offset, inner, digest, sha256=sha256)
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

    def _landmark(self, i: int, raw: _Entry, name: str, typ: str) -> None:
        if typ != "reg":
            raise _fail(i, name, f"landmark is a {typ}, not a reg")
        offset = 0
        if raw.size > 0:
            offset = raw.offset
            self._advance(offset, i, name)  # its member ends the chunk before it
        if name == PREFETCH_LANDMARK:
            self.landmark = offset
        else:
            self.no_prefetch = True

    def _link_target(self, i: int, raw: _Entry, name: str) -> str:
        target = _norm(raw.linkName, i)
        pos = self.toc.find(target)
        if pos is None or not target:
            raise _fail(i, name, f"hardlink target {target!r} is not an earlier entry")
        typ = self.toc.type(pos)
        if typ == "dir":
            raise _fail(i, name, f"hardlink target {target!r} is a directory")
        return self.toc.link_name(pos) if typ == "hardlink" else target
