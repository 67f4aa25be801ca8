"""Checks on response bodies: capped reads, exact Range answers, verified manifests."""

from __future__ import annotations

import re

import httpx

from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument
from snapshotter.registry.errors import (
    ManifestInvalid,
    RangeNotSupported,
    RegistryRejected,
    ShortRead,
)
from snapshotter.registry.manifest import Index, Manifest, parse_manifest_or_index

__all__ = [
    "SMALL_BLOB_TRIM",
    "range_body",
    "ranges_body",
    "read_capped",
    "tail_body",
    "verified_manifest",
]

# A server that ignores Range may still be used when the whole blob is this small.
SMALL_BLOB_TRIM = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_BOUNDARY = re.compile(r"""boundary=(?:"([^"]+)"|([^;\s]+))""")
_PART_OVERHEAD = 1024  # boundary and part headers, per part, at most


class _TooLarge(Exception):
    pass


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """The raw (undecoded) body; RegistryRejected when it exceeds `limit` bytes."""
    try:
        return await _read_at_most(response, limit)
    except _TooLarge:
        raise RegistryRejected(f"{what}: response larger than {limit} bytes") from None


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge
    try:
        content = response.content  # read already (mock transports, error bodies)
    except httpx.ResponseNotRead:
        pass
    else:
        if len(content) > limit:
            raise _TooLarge
        return content
    buf = bytearray()
    async for chunk in response.aiter_raw():
        buf += chunk
        if len(buf) > limit:
            raise _TooLarge
    return bytes(buf)


async def range_body(response: httpx.Response, start: int, end: int, what: str) -> bytes:
    """Exactly bytes [start, end) from a 206 (or a small or whole-blob 200), else raise."""
    want = end - start
    if response.status_code == 206:
        m = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if m is None or (int(m.group(1)), int(m.group(2))) != (start, end - 1):
            got = response.headers.get("content-range")
            raise ShortRead(f"{what}: answered Content-Range {got!r}")
        return await _exactly(response, want, what)
    if response.status_code != 200:
        raise RegistryRejected(f"{what}: unexpected HTTP {response.status_code}")
    # The server ignored Range. Fine if we asked for the whole blob, or it is small.
    length = response.headers.get("content-length")
    whole = start == 0 and length is not None and length.isdigit() and int(length) == end
    try:
        data = await _read_at_most(response, want if whole else SMALL_BLOB_TRIM)
    except _TooLarge:
        raise RangeNotSupported(f"{what}: server ignores Range for a large blob") from None
    if len(data) < end:
        raise ShortRead(f"{what}: whole blob has only {len(data)} bytes")
    return data[start:end]


async def _exactly(response: httpx.Response, want: int, what: str) -> bytes:
    """A 206's body, which must be `want` bytes long."""
    try:
        data = await _read_at_most(response, want)
    except _TooLarge:
        raise ShortRead(f"{what}: body longer than {want} bytes") from None
    if len(data) != want:
        raise ShortRead(f"{what}: got {len(data)} of {want} bytes")
    return data


async def tail_body(response: httpx.Response, n: int, what: str) -> tuple[bytes, int]:
    """The last min(n, size) bytes of a blob and its size, from the answer to a suffix
    range `bytes=-n`: a 206 ending at the blob's end, or a small whole-blob 200."""
    if response.status_code == 206:
        m = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if m is None or not m.group(3).isdigit():
            got = response.headers.get("content-range")
            raise ShortRead(f"{what}: answered Content-Range {got!r}")
        first, last, size = int(m.group(1)), int(m.group(2)), int(m.group(3))
        want = min(n, size)
        if (first, last) != (size - want, size - 1):
            raise ShortRead(f"{what}: answered bytes {first}-{last} of {size}, not the last {want}")
        return await _exactly(response, want, what), size
    if response.status_code != 200:
        raise RegistryRejected(f"{what}: unexpected HTTP {response.status_code}")
    try:
        data = await _read_at_most(response, max(n, SMALL_BLOB_TRIM))
    except _TooLarge:
        raise RangeNotSupported(f"{what}: server ignores Range for a large blob") from None
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) != len(data):
        raise ShortRead(f"{what}: got {len(data)} of {length} bytes")
    return data[-n:], len(data)


async def ranges_body(
    response: httpx.Response, ranges: list[tuple[int, int]], what: str
) -> list[bytes | None]:
    """The bytes of each of `ranges` ([start, end), ascending, disjoint) that the answer to
    one multi-range request holds: a multipart/byteranges 206, or a 206 of one range (a
    server that serves only the first, or merged them all). None for a range the answer
    does not hold; all None, without reading the body, for a 200 (the server ignored
    Range: the body may be the whole blob). Parts must match what was asked: a part
    outside every requested range, or with a body of the wrong length, is ShortRead."""
    if response.status_code == 200:
        return [None] * len(ranges)
    if response.status_code != 206:
        raise RegistryRejected(f"{what}: unexpected HTTP {response.status_code}")
    limit = sum(end - start for start, end in ranges) + _PART_OVERHEAD * (len(ranges) + 1)
    ctype = response.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/byteranges"):
        m = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if m is None:
            got = response.headers.get("content-range")
            raise ShortRead(f"{what}: answered Content-Range {got!r}")
        first, last = int(m.group(1)), int(m.group(2))
        if last - first + 1 > limit:
            raise ShortRead(f"{what}: answered bytes {first}-{last}, more than asked")
        parts = [(first, await _exactly(response, last - first + 1, what))]
    else:
        b = _BOUNDARY.search(ctype)
        if b is None:
            raise ShortRead(f"{what}: multipart answer without a boundary")
        try:
            body = await _read_at_most(response, limit)
        except _TooLarge:
            raise ShortRead(f"{what}: multipart answer larger than asked") from None
        parts = _parts(body, (b.group(1) or b.group(2)).encode(), what)
    out: list[bytes | None] = []
    for start, end in ranges:
        found = None
        for first, data in parts:
            if first <= start and end <= first + len(data):
                found = data[start - first : end - first]
                break
        out.append(found)
    for first, data in parts:
        if not any(first < end and start < first + len(data) for start, end in ranges):
            raise ShortRead(f"{what}: answered bytes {first}-{first + len(data) - 1}, not asked")
    return out


def _parts(body: bytes, boundary: bytes, what: str) -> list[tuple[int, bytes]]:
    """(first byte, bytes) of each part of a multipart/byteranges body."""
    delimiter = b"--" + boundary
    parts = []
    at = body.find(delimiter)
    while at >= 0:
        at += len(delimiter)
        if body.startswith(b"--", at):
            return parts  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", at)
        if head_end < 0:
            break
        headers = body[at:head_end].decode("latin-1").split("\r\n")
        ranges = [h.split(":", 1)[1].strip() for h in headers
                  if h.lower().startswith("content-range:")]  # fmt: skip
        m = _CONTENT_RANGE.match(ranges[0]) if len(ranges) == 1 else None
        if m is None:
            raise ShortRead(f"{what}: multipart part without one Content-Range")
        first, last = int(m.group(1)), int(m.group(2))
        start = head_end + 4
        stop = start + last - first + 1
        if body[stop : stop + 2 + len(delimiter)] != b"\r\n" + delimiter:
            if len(body) <= stop + 2:
                break
            raise ShortRead(f"{what}: multipart part {first}-{last}: not {last - first + 1} bytes")
        parts.append((first, body[start:stop]))
        at = stop + 2
    raise ShortRead(f"{what}: multipart answer cut short")


def verified_manifest(
    response: httpx.Response, raw: bytes, expected: Digest | None, size: int | None, what: str
) -> Manifest | Index:
    """Parse a manifest after checking it hashes to what was asked (or what the server says)."""
    if size is not None and len(raw) != size:
        raise ShortRead(f"{what}: {len(raw)} bytes, descriptor says {size}")
    digest = expected
    if digest is None:
        header = response.headers.get("docker-content-digest")
        try:
            digest = Digest.parse(header) if header else None
        except InvalidArgument:
            raise ManifestInvalid(f"{what}: invalid Docker-Content-Digest header") from None
        if digest is None:
            digest = Digest.of(raw)
    digest.check(raw, what)
    return parse_manifest_or_index(raw, digest, response.headers.get("content-type", ""))
