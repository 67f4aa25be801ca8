"""eStargz layers as bytes: footer, TOC member, TOC JSON -> `Toc`, chunk extraction.

No I/O of its own: callers fetch the byte ranges (tail, TOC member, chunk members) and
hand them in. Everything a hostile blob can say is validated here before `fs/` sees it.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

# zlib's interface on Intel's ISA-L: inflates about twice as fast as zlib, and every
# chunk a container reads and every TOC is inflated here, on the pull's critical path.
from isal import isal_zlib

from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, InvalidArgument
from snapshotter.format._tocjson import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    InvalidTOC,
    parse_toc,
)
from snapshotter.format.toc import Chunk, Toc

__all__ = [
    "FOOTER_SIZE",
    "LEGACY_FOOTER_SIZE",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_NAME",
    "InvalidFooter",
    "InvalidTOC",
    "TocSource",
    "extract_chunk",
    "footer_bytes",
    "parse_footer",
    "parse_toc",
    "parse_toc_member",
    "read_toc_json",
    "toc_json_pieces",
    "verify_chunk",
]

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"

_GZIP_MAGIC = b"\x1f\x8b\x08"
_FEXTRA = 0x04
# The body every footer carries: an empty final stored block, then CRC32 0 and ISIZE 0.
_EMPTY_BODY = b"\x01\x00\x00\xff\xff" + bytes(8)
# Tar headers (a PAX one, then the entry) and end-of-archive that may surround the JSON.
_TOC_SLACK = 64 * 1024
# Streaming a TOC: compressed bytes handed to zlib at a time, inflated bytes per piece.
# Small enough that no piece is a large allocation (those fragment the heap, or raise
# glibc's mmap threshold): with 1 MiB, the daemon's peak was ~50 B/entry higher.
_IN_STEP = 64 * 1024
_OUT_STEP = 64 * 1024


# A TOC member in memory, or a binary file positioned at its start.
TocSource = bytes | bytearray | memoryview | BinaryIO


class InvalidFooter(InvalidArgument):
    """The blob does not end with an eStargz footer: not an eStargz layer."""


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte footer pointing at `toc_offset`: an empty gzip member whose extra field
    (subfield "SG") holds the offset as 16 hex digits followed by "STARGZ"."""
    payload = f"{toc_offset:016x}STARGZ".encode()
    extra = b"SG" + len(payload).to_bytes(2, "little") + payload
    header = _GZIP_MAGIC + bytes([_FEXTRA]) + bytes(4) + b"\x00\xff"
    footer = header + len(extra).to_bytes(2, "little") + extra + _EMPTY_BODY
    assert len(footer) == FOOTER_SIZE
    return footer


def _footer_offset(footer: bytes) -> int | None:
    """The TOC offset a 51- or 47-byte footer carries, or None if it is not one."""
    if footer[:3] != _GZIP_MAGIC or footer[3] != _FEXTRA or footer[-13:] != _EMPTY_BODY:
        return None
    xlen = int.from_bytes(footer[10:12], "little")
    extra = footer[12:-13]
    if xlen != len(extra):
        return None
    if len(footer) == FOOTER_SIZE:
        if extra[:2] != b"SG" or int.from_bytes(extra[2:4], "little") != 22:
            return None
        payload = extra[4:]
    else:  # legacy (CRFS stargz): the extra field is the bare payload
        payload = extra
    text = payload[:16]
    if payload[16:] != b"STARGZ" or not all(c in b"0123456789abcdefABCDEF" for c in text):
        return None
    return int(text, 16)


def parse_footer(tail: bytes, *, blob_size: int | None = None) -> tuple[int, int]:
    """`(toc_offset, footer_size)` from the last min(51, blob_size) bytes of a blob.

    The 51-byte footer is tried first, then the legacy 47-byte one. With `blob_size`, the
    offset must also leave room for a TOC member before the footer.
    """
    for size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE):
        if len(tail) < size:
            continue
        offset = _footer_offset(tail[-size:])
        if offset is None:
            continue
        if blob_size is not None and not 0 <= offset < blob_size - size:
            raise InvalidFooter(
                f"eStargz footer: toc offset {offset} outside blob of {blob_size} bytes"
            )
        return offset, size
    raise InvalidFooter("not an eStargz layer: no eStargz footer at the end of the blob")


def _inflate(data: bytes, skip: int, want: int, what: str, *, upto: bool = False) -> bytes:
    """Bytes [skip, skip+want) of the concatenated gzip members in `data` (with `upto`,
    fewer if the data ends cleanly first).

    Inflation stops once `want` bytes are out and skipped bytes are dropped as they come,
    so memory stays bounded by `want` plus 1 MiB: the bound that makes gzip bombs harmless.
    """
    # BytesIO grows in place and getvalue() hands its buffer over: a bytearray would
    # need a copy into bytes at the end, twice the memory for a TOC of tens of MB.
    out = io.BytesIO()
    n = 0
    rest = data
    while n < want:
        if rest[:2] != b"\x1f\x8b":
            if not rest and upto:
                break
            if not rest:
                raise DataLoss(f"{what}: gzip data ends {want - n} bytes early")
            raise DataLoss(f"{what}: no gzip member at compressed byte {len(data) - len(rest)}")
        d = isal_zlib.decompressobj(wbits=31)
        pending = rest
        try:
            while n < want and not d.eof:
                # At most 1 MiB per call: a piece as large as the TOC would double it.
                piece = d.decompress(pending, min(skip, 1 << 20) + min(want - n, 1 << 20))
                pending = d.unconsumed_tail
                if not piece and not pending and not d.eof:
                    raise DataLoss(f"{what}: truncated gzip member")
                if skip:
                    dropped = min(skip, len(piece))
                    skip -= dropped
                    piece = piece[dropped:]
                n += out.write(piece[: want - n])
        except isal_zlib.error as exc:
            raise DataLoss(f"{what}: corrupt gzip data: {exc}") from None
        rest = d.unused_data
    return out.getvalue()


def _blocks(member: TocSource, origin: int) -> Iterator[bytes | memoryview]:
    """The compressed bytes of `member` in 64 KiB blocks, from the start each time: an
    in-memory member is sliced, a file is read from `origin` on."""
    if isinstance(member, bytes | bytearray | memoryview):
        view = memoryview(member)
        for k in range(0, len(view), _IN_STEP):
            yield view[k : k + _IN_STEP]
        return
    member.seek(origin)
    while block := member.read(_IN_STEP):
        yield block


def _inflate_pieces(
    blocks: Iterator[bytes | memoryview], skip: int, want: int, what: str
) -> Iterator[bytes]:
    """Bytes [skip, skip+want) of the concatenated gzip members in `blocks`, in pieces
    of at most 64 KiB, ending early only if the data ends cleanly first.

    For a TOC of tens of MB: zlib gets one block at a time, so its copies of unconsumed
    input stay small, and nothing holds more than one piece of output.
    """
    pending: bytes | memoryview = b""
    taken = n = 0  # compressed bytes taken from blocks; bytes out
    while n < want:
        while len(pending) < 2 and (block := next(blocks, None)) is not None:
            pending = bytes(pending) + bytes(block) if pending else block
            taken += len(block)
        if not pending:
            return
        if pending[:2] != b"\x1f\x8b":
            raise DataLoss(f"{what}: no gzip member at compressed byte {taken - len(pending)}")
        d = isal_zlib.decompressobj(wbits=31)
        try:
            while n < want and not d.eof:
                if not pending:
                    if (block := next(blocks, None)) is None:
                        raise DataLoss(f"{what}: truncated gzip member")
                    pending = block
                    taken += len(block)
                piece = d.decompress(pending, _OUT_STEP)
                pending = d.unconsumed_tail
                if skip:
                    dropped = min(skip, len(piece))
                    skip -= dropped
                    piece = piece[dropped:]
                if piece:
                    piece = piece[: want - n]
                    n += len(piece)
                    yield piece
        except isal_zlib.error as exc:
            raise DataLoss(f"{what}: corrupt gzip data: {exc}") from None
        pending = d.unused_data  # the next member's start (the tail is empty at eof)


def toc_json_pieces(member: TocSource, *, max_size: int) -> Iterator[bytes]:
    """The TOC JSON from the TOC member (blob bytes [toc_offset, blob_size - footer_size),
    in memory or in a file positioned at its start), in pieces of at most 64 KiB; raises
    DataLoss at the end if the JSON is cut short.

    Inflates at most `max_size` plus a little room for tar headers, so a gzip bomb costs
    no more than an honest TOC of the allowed size, and never holds the JSON whole.
    """
    return _toc_json_pieces(member, _origin(member), max_size)


def _origin(member: TocSource) -> int:
    """Where a file's member starts, taken before any pass: the pieces are made lazily,
    and each pass over a file moves its position."""
    return 0 if isinstance(member, bytes | bytearray | memoryview) else member.tell()


def _toc_json_pieces(member: TocSource, origin: int, max_size: int) -> Iterator[bytes]:
    what = "eStargz toc member"
    head = b"".join(_inflate_pieces(_blocks(member, origin), 0, _TOC_SLACK, what))
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tf:
            info = tf.next()
            if info is None:
                raise InvalidTOC(f"{what}: no tar entry")
            if info.name != TOC_NAME or not info.isreg():
                raise InvalidTOC(f"{what}: first entry is {info.name!r}, expected {TOC_NAME!r}")
            if info.size > max_size:
                raise InvalidTOC(
                    f"{what}: {TOC_NAME} is {info.size} bytes, over the limit of {max_size}"
                )
            start = info.offset_data
    except tarfile.TarError as exc:
        if len(head) >= _TOC_SLACK:
            raise InvalidTOC(f"{what}: tar headers larger than {_TOC_SLACK} bytes") from None
        raise InvalidTOC(f"{what}: not a tar stream: {exc}") from None
    del head
    n = 0
    for piece in _inflate_pieces(_blocks(member, origin), start, info.size, what):
        n += len(piece)
        yield piece
    if n != info.size:
        raise DataLoss(f"{what}: {TOC_NAME} truncated at {n} of {info.size} bytes")


def read_toc_json(member: TocSource, *, max_size: int) -> bytes:
    """The TOC JSON of `toc_json_pieces` in one piece."""
    # BytesIO hands its buffer over: no second copy of a JSON of tens of MB.
    out = io.BytesIO()
    for piece in toc_json_pieces(member, max_size=max_size):
        out.write(piece)
    return out.getvalue()


def parse_toc_member(
    member: TocSource,
    *,
    toc_digest: Digest | None,
    blob_size: int,
    toc_offset: int,
    max_size: int,
    max_entries: int,
    what: str = "toc",
) -> Toc:
    """The `Toc` of a TOC member (see `toc_json_pieces`), its JSON verified against
    `toc_digest` before it is parsed: unverified JSON is never decoded, and a wrong digest
    is DataLoss (the bytes are not the TOC the layer names) whatever they hold.

    The JSON is gathered whole (`read_toc_json`), then hashed and decoded: a large TOC's
    JSON (a few times the member's size) is held during the parse.
    """
    data = read_toc_json(member, max_size=max_size)
    if toc_digest is not None:
        toc_digest.check(data, what)
    return parse_toc(data, blob_size=blob_size, toc_offset=toc_offset, max_entries=max_entries)


def extract_chunk(compressed: bytes, chunk: Chunk) -> bytes:
    """The `chunk.size` uncompressed bytes of `chunk` from blob bytes [offset, end).

    The range may hold several concatenated gzip members; inflation stops as soon as the
    chunk is complete. Raises DataLoss if the bytes are corrupt or end too early. The
    digest is not checked here: call `verify_chunk`.
    """
    what = f"chunk at blob offset {chunk.offset} (+{chunk.inner_offset}, {chunk.size} bytes)"
    return _inflate(compressed, chunk.inner_offset, chunk.size, what)


def verify_chunk(data: bytes, chunk: Chunk) -> None:
    """Raise DataLoss unless `data` is exactly the chunk the TOC describes."""
    what = f"chunk at blob offset {chunk.offset} (+{chunk.inner_offset})"
    if len(data) != chunk.size:
        raise DataLoss(f"{what}: {len(data)} bytes, expected {chunk.size}")
    try:
        digest = Digest.parse(chunk.digest)
    except InvalidArgument:
        raise DataLoss(f"{what}: unusable digest {chunk.digest!r}") from None
    digest.check(data, what)
