"""Learned access profiles: the format, its checks, recording, and the prefetch plan it gives.

Pure: no I/O, no clock of its own (callers pass times), no registry. A profile says which
chunks the containers of one image (named by its manifest digest) read during their first
seconds, in first-access order; `plan_profile` turns it into a `PrefetchPlan` for one layer.
A profile is a hint: only chunks whose digest the layer's verified TOC lists are planned,
so a wrong or stale profile costs bandwidth and never changes what a file contains.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.remote.prefetch import PrefetchPlan, blob_order

__all__ = [
    "MAX_PROFILE_BYTES",
    "PROFILE_MEDIA_TYPE",
    "PROFILE_SCHEMA",
    "Access",
    "InvalidProfile",
    "Profile",
    "ProfileMismatch",
    "Recorder",
    "decode_profile",
    "encode_profile",
    "plan_image_profile",
    "plan_profile",
]

PROFILE_SCHEMA = "lazysnap.profile.v1"
PROFILE_MEDIA_TYPE = "application/vnd.lazysnap.profile.v1+json"
MAX_PROFILE_BYTES = 16 << 20
# Accesses are planned in groups of about this many compressed bytes, each group sorted by
# blob offset: the order stays first-access at this grain while neighbours coalesce.
_GROUP_BYTES = 8 << 20
_T = TypeVar("_T")


class InvalidProfile(InvalidArgument):
    """Profile bytes that are not a well-formed, self-consistent profile."""


class ProfileMismatch(InvalidArgument):
    """A well-formed profile for another image than the one it is applied to."""


@dataclass(frozen=True, slots=True)
class Access:
    """The first read of one chunk: which layer, file and chunk, and when (seconds after
    the image's first read)."""

    layer: str  # layer digest
    file: str
    chunk: str  # chunk digest
    offset: int  # the chunk's offset in the file
    time: float
    # Where the chunk lies in the layer blob: (compressed offset, compressed end, offset
    # inside the inflated member, size). With it the chunk can be fetched (and verified
    # against `chunk`) before the layer's TOC is read; profiles written before it lack it.
    span: tuple[int, int, int, int] | None = None

    def as_chunk(self) -> Chunk | None:
        """The chunk as the profile locates it, or None without a `span`. Unverified: only
        the bytes fetched for it are checked (against `chunk`), so a wrong span costs a
        failed fetch, never wrong content."""
        if self.span is None:
            return None
        offset, end, inner, size = self.span
        return Chunk(chunk_offset=self.offset, size=size, offset=offset, end=end,
                     inner_offset=inner, digest=self.chunk)


@dataclass(frozen=True, slots=True)
class Profile:
    manifest: str  # the image manifest digest this profile belongs to
    accesses: tuple[Access, ...]  # in first-access order
    window: float = 0.0  # seconds recorded
    image_ref: str = ""  # informational only: never used to match

    def files(self) -> list[str]:
        """Files in first-access order, once each."""
        return list(dict.fromkeys(a.file for a in self.accesses))

    def layers(self) -> list[str]:
        return list(dict.fromkeys(a.layer for a in self.accesses))


def encode_profile(profile: Profile) -> bytes:
    """The portable form: `{"digest": <sha256 of the canonical body>, "profile": body}`."""
    body = _canonical(_body(profile))
    doc = {"digest": str(Digest.of(body)), "profile": json.loads(body)}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def decode_profile(raw: bytes, *, manifest: str | None = None, what: str = "profile") -> Profile:
    """Parse and check a profile; with `manifest`, it must name exactly that digest.

    Raises InvalidProfile (malformed, digest mismatch) or ProfileMismatch, naming `what`.
    """
    if len(raw) > MAX_PROFILE_BYTES:
        raise InvalidProfile(f"{what}: {len(raw)} bytes, over {MAX_PROFILE_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidProfile(f"{what}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("profile"), dict):
        raise InvalidProfile(f"{what}: no \"profile\" object")
    body = doc["profile"]
    try:
        declared = Digest.parse(str(doc.get("digest", "")))
    except InvalidArgument:
        raise InvalidProfile(f"{what}: no valid \"digest\"") from None
    actual = Digest.of(_canonical(body))
    if actual != declared:
        raise InvalidProfile(f"{what}: digest mismatch: declares {declared}, content is {actual}")
    profile = _parse_body(body, what)
    if manifest is not None and profile.manifest != manifest:
        raise ProfileMismatch(
            f"{what}: belongs to manifest {profile.manifest}, not to {manifest}"
        )
    return profile


def plan_profile(profile: Profile, layer: str, toc: Toc) -> PrefetchPlan:
    """The chunks of `layer` the profile lists, in first-access order (coarsely; see
    `_GROUP_BYTES`), each once; chunks the TOC does not have are left out."""
    wanted = [a.chunk for a in profile.accesses if a.layer == layer]
    if not wanted:
        return PrefetchPlan(end=0, chunks=(), reason="profile")
    want = set(wanted)
    known: dict[str, Chunk] = {}
    for chunk in toc.chunks():
        if chunk.digest in want and chunk.digest not in known:
            known[chunk.digest] = chunk
    ordered = [known[d] for d in dict.fromkeys(wanted) if d in known]
    chunks = tuple(c for group in _groups(ordered, lambda c: c.end - c.offset)
                   for c in sorted(group, key=blob_order))
    return PrefetchPlan(end=0, chunks=chunks, reason="profile")


def plan_image_profile(profile: Profile, layers: Iterable[str]) -> list[tuple[str, list[Chunk]]]:
    """Steps to prefetch the profile's chunks of `layers` (the image's layer digests)
    before any TOC is read, from the spans the profile recorded.

    One ordered list for the whole image, so that a layer prepared late by containerd does
    not start late: each step is (layer digest, chunks sorted by blob offset), the steps in
    first-access order at the grain of `_GROUP_BYTES`. Accesses without a span (older
    profiles) and of other layers are left out; they are planned per layer from its TOC.
    """
    allowed = set(layers)
    seen: set[tuple[str, str]] = set()
    ordered: list[tuple[str, Chunk]] = []
    for access in profile.accesses:
        chunk = access.as_chunk()
        key = (access.layer, access.chunk)
        if chunk is None or access.layer not in allowed or key in seen:
            continue
        seen.add(key)
        ordered.append((access.layer, chunk))
    steps: list[tuple[str, list[Chunk]]] = []
    for group in _groups(ordered, lambda item: item[1].end - item[1].offset):
        by_layer: dict[str, list[Chunk]] = {}
        for layer, chunk in group:
            by_layer.setdefault(layer, []).append(chunk)
        for layer, chunks in by_layer.items():
            steps.append((layer, sorted(chunks, key=blob_order)))
    return steps


def _groups(items: list[_T], size: Callable[[_T], int]) -> list[list[_T]]:
    """`items` cut, in order, into consecutive groups of about `_GROUP_BYTES` compressed
    bytes: first-access order at that grain; callers sort each group by blob offset so
    that neighbours coalesce."""
    groups: list[list[_T]] = []
    total = _GROUP_BYTES
    for item in items:
        if total >= _GROUP_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size(item)
    return groups


@dataclass
class Recorder:
    """Collects first reads of chunks for one image during `window` seconds from its first
    read. `read(...)` returns False once the window is over (the caller then stops calling
    and saves `profile()`)."""

    manifest: str
    window: float
    image_ref: str = ""
    started: float | None = None
    _seen: dict[tuple[str, str], Access] = field(default_factory=dict)

    def read(self, layer: str, entry: Entry, chunk: Chunk, now: float) -> bool:
        if self.started is None:
            self.started = now
        elapsed = now - self.started
        if elapsed > self.window:
            return False
        key = (layer, chunk.digest)
        if key not in self._seen:
            span = (chunk.offset, chunk.end, chunk.inner_offset, chunk.size)
            self._seen[key] = Access(layer, entry.name, chunk.digest, chunk.chunk_offset,
                                     round(elapsed, 4), span)
        return True

    def __len__(self) -> int:
        return len(self._seen)

    def profile(self) -> Profile:
        return Profile(self.manifest, tuple(self._seen.values()), self.window, self.image_ref)


# -- internals ---------------------------------------------------------------------------


def _body(profile: Profile) -> dict[str, Any]:
    layers = profile.layers()
    index = {d: i for i, d in enumerate(layers)}
    return {
        "schema": PROFILE_SCHEMA,
        "manifest": profile.manifest,
        "imageRef": profile.image_ref,
        "window": profile.window,
        "layers": layers,
        # [layer index, file, chunk offset, chunk digest, seconds] + the span's four
        # numbers when known: compact for big stacks
        "accesses": [[index[a.layer], a.file, a.offset, a.chunk, a.time, *(a.span or ())]
                     for a in profile.accesses],
    }


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _parse_body(body: Mapping[str, Any], what: str) -> Profile:
    if body.get("schema") != PROFILE_SCHEMA:
        raise InvalidProfile(f"{what}: schema {body.get('schema')!r}, expected {PROFILE_SCHEMA}")
    manifest = _digest_text(body.get("manifest"), f"{what}: manifest")
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise InvalidProfile(f"{what}: \"layers\" is not a list")
    layer_digests = [_digest_text(d, f"{what}: layer") for d in layers]
    accesses = body.get("accesses")
    if not isinstance(accesses, list):
        raise InvalidProfile(f"{what}: \"accesses\" is not a list")
    window = body.get("window", 0.0)
    ref = body.get("imageRef", "")
    if not isinstance(window, int | float) or not isinstance(ref, str):
        raise InvalidProfile(f"{what}: bad \"window\" or \"imageRef\"")
    return Profile(manifest, tuple(_accesses(accesses, layer_digests, what)), float(window), ref)


def _accesses(rows: Iterable[Any], layers: list[str], what: str) -> Iterable[Access]:
    for n, row in enumerate(rows):
        ok = (
            isinstance(row, list) and len(row) in (5, 9)
            and isinstance(row[0], int) and 0 <= row[0] < len(layers)
            and isinstance(row[1], str) and isinstance(row[2], int) and row[2] >= 0
            and isinstance(row[4], int | float)
            and (len(row) == 5 or _span_ok(row[5:]))
        )
        if not ok:
            raise InvalidProfile(f"{what}: access #{n} is malformed: {str(row)[:120]}")
        chunk = _digest_text(row[3], f"{what}: access #{n} chunk")
        span = (row[5], row[6], row[7], row[8]) if len(row) == 9 else None
        yield Access(layers[row[0]], row[1], chunk, row[2], float(row[4]), span)


def _span_ok(span: list[Any]) -> bool:
    """Whole numbers, a non-empty compressed extent, the chunk inside its member's size
    bound (no member inflates past 2**40 bytes here: that is a hostile number)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
        return False
    offset, end, inner, size = span
    return 0 <= offset < end and 0 <= inner < 1 << 40 and 0 <= size < 1 << 40


def _digest_text(value: Any, what: str) -> str:
    try:
        return str(Digest.parse(str(value)))
    except InvalidArgument:
        raise InvalidProfile(f"{what}: {str(value)[:80]!r} is not a digest") from None
