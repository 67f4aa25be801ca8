"""Profiles in the registry: an OCI artifact whose `subject` is the image manifest.

Found through the referrers API (`GET /v2/<name>/referrers/<digest>`), or, on registries
without it, through the tag-schema fallback: an OCI index tagged `sha256-<hex>` of the
subject that lists the referring manifests. Every step is verified by digest (the artifact
manifest, its subject, the profile blob); the profile's own checks are `decode_profile`'s.

The lookup is on the first Prepare's path, one round trip per step, so a pushed profile
carries its blob inline in the artifact's layer descriptor, and the fallback index carries
the artifact inline (OCI 1.1 descriptor `data`, up to `INLINE_BYTES` each): one GET finds
it where the index is ours. Both are still stored for readers that ignore `data`, and an
inline copy that does not match its descriptor is ignored in favour of a fetch.

A profile pushed again (a nightly job, a new node pool) adds an artifact; the newest, by
its `org.opencontainers.image.created` annotation, is the one used: a referrers listing
comes in no particular order. The fallback index is rewritten by every push, so it keeps
only the newest profile (and whatever other tools' referrers it lists): a listing that
grew with each push would be downloaded whole on every first pull, and registries refuse
manifests over 4 MiB.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
import logging
from typing import Any

import trio

from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, NotFound
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    Manifest,
    parse_manifest_or_index,
)
from snapshotter.registry.reference import Reference
from snapshotter.remote.profile import MAX_PROFILE_BYTES, PROFILE_MEDIA_TYPE, InvalidProfile

__all__ = ["EMPTY_CONFIG", "INLINE_BYTES", "fallback_tag", "find_profile", "push_profile"]

log = logging.getLogger(__name__)

EMPTY_CONFIG = b"{}"
_EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
# Larger content is only referenced: registries cap manifests at 4 MiB, and every lookup
# downloads what is inline.
INLINE_BYTES = 256 << 10
CREATED = "org.opencontainers.image.created"


def fallback_tag(subject: Digest) -> str:
    return f"{subject.algorithm}-{subject.hex}"


def _at(ref: Reference, *, tag: str | None = None, digest: Digest | None = None) -> Reference:
    return dataclasses.replace(ref, tag=tag, digest=digest)


async def push_profile(client: RegistryClient, ref: Reference, raw: bytes) -> tuple[Digest, str]:
    """Store `raw` (an encoded profile) as a referrer of `ref`'s manifest.

    Returns the artifact manifest's digest and how it can be found: "referrers" when the
    registry indexes it itself, else "tag" (the fallback index was updated).
    """
    subject = await client.get_manifest(ref)
    blob = Digest.of(raw)
    empty = Digest.of(EMPTY_CONFIG)
    await client.push_blob(ref, EMPTY_CONFIG, empty)
    await client.push_blob(ref, raw, blob)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": PROFILE_MEDIA_TYPE,
        "config": {"mediaType": _EMPTY_TYPE, "digest": str(empty), "size": len(EMPTY_CONFIG)},
        "layers": [_descriptor(PROFILE_MEDIA_TYPE, raw, blob)],
        "subject": {"mediaType": subject.media_type, "digest": str(subject.digest),
                    "size": len(subject.raw)},
        "annotations": {CREATED: _now()},
    }
    manifest_raw = json.dumps(doc, separators=(",", ":")).encode()
    digest = Digest.of(manifest_raw)
    await client.put_manifest(_at(ref, digest=digest), manifest_raw, OCI_MANIFEST)
    if await client.get_referrers(ref, subject.digest) is not None:
        return digest, "referrers"
    # No referrers API: add the artifact to the subject's fallback index.
    tag_ref = _at(ref, tag=fallback_tag(subject.digest))
    entries: list[dict[str, Any]] = []
    try:
        found = await client.get_manifest_raw(tag_ref)
        if isinstance(found, Index):
            entries = [e for e in json.loads(found.raw).get("manifests", [])
                       if isinstance(e, dict) and e.get("artifactType") != PROFILE_MEDIA_TYPE]
    except NotFound:
        pass
    entries.append({**_descriptor(OCI_MANIFEST, manifest_raw, digest),
                    "artifactType": PROFILE_MEDIA_TYPE, "annotations": doc["annotations"]})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    await client.put_manifest(tag_ref, json.dumps(index, separators=(",", ":")).encode(),
                              OCI_INDEX)
    return digest, "tag"


def _now() -> str:
    """RFC 3339 in UTC to the microsecond: two pushes in one second still order."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _created(entry: dict[str, Any]) -> datetime.datetime | None:
    """When the artifact says it was made; None when it does not say so usably."""
    annotations = entry.get("annotations")
    text = annotations.get(CREATED) if isinstance(annotations, dict) else None
    if not isinstance(text, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _newest(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate created last; those without a usable date rank below the others,
    and among equals the later one listed wins (the fallback index appends)."""
    def rank(k: int) -> tuple[bool, datetime.datetime, int]:
        when = _created(candidates[k])
        return when is not None, when or datetime.datetime.min.replace(tzinfo=datetime.UTC), k

    return candidates[max(range(len(candidates)), key=rank)]


def _descriptor(media_type: str, content: bytes, digest: Digest) -> dict[str, Any]:
    doc: dict[str, Any] = {"mediaType": media_type, "digest": str(digest), "size": len(content)}
    if len(content) <= INLINE_BYTES:
        doc["data"] = base64.b64encode(content).decode()
    return doc


def _inline(desc: dict[str, Any], digest: Digest, what: str) -> bytes | None:
    """The descriptor's inline content if it is there and is what it describes."""
    data = desc.get("data")
    if not isinstance(data, str) or len(data) > 2 * INLINE_BYTES:
        return None
    try:
        content = base64.b64decode(data, validate=True)
        if len(content) != desc.get("size"):
            raise DataLoss(f"{what}: inline data of {len(content)} bytes, not {desc.get('size')}")
        digest.check(content, f"{what}: inline data")
    except (binascii.Error, DataLoss) as exc:
        log.warning("%s: inline copy ignored, fetching it (%s)", what, exc)
        return None
    return content


async def _listing(client: RegistryClient, ref: Reference, subject: Digest) -> bytes | None:
    """The index of `subject`'s referrers: the referrers API's, else the fallback tag's.

    Until the registry has answered once whether it has the API, both are asked at once
    (a round trip saved on registries without it, one extra GET on the others, once)."""
    tag_ref = _at(ref, tag=fallback_tag(subject))

    async def fallback() -> bytes | None:
        try:
            found = await client.get_manifest_raw(tag_ref)
        except NotFound:
            return None
        return found.raw if isinstance(found, Index) else b"{}"

    has_api = client.has_referrers_api(ref.host)
    if has_api is False:
        return await fallback()
    if has_api:
        listing = await client.get_referrers(ref, subject)
        return listing if listing is not None else await fallback()
    answers: dict[str, bytes | None] = {}
    failures: list[Exception] = []

    async def ask(key: str, fn: Any) -> None:
        try:
            answers[key] = await fn()
        except Exception as exc:  # kept, and raised only if that answer decides
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "api", lambda: client.get_referrers(ref, subject))
        nursery.start_soon(ask, "tag", fallback)
    if "api" not in answers:
        raise failures[0]
    if answers["api"] is not None:
        return answers["api"]
    if "tag" not in answers:
        raise failures[0]
    return answers["tag"]


async def find_profile(client: RegistryClient, ref: Reference, subject: Digest) -> bytes | None:
    """The newest profile blob stored for manifest `subject` in `ref`'s repository, or None.

    Raises InvalidProfile when the artifact found does not refer to `subject`; the blob
    itself is checked against its digest (DataLoss otherwise).
    """
    listing = await _listing(client, ref, subject)
    if listing is None:
        return None
    try:
        entries = json.loads(listing).get("manifests") or []
    except (ValueError, AttributeError):
        raise InvalidProfile(f"referrers of {subject}: not an index") from None
    candidates = [e for e in entries
                  if isinstance(e, dict) and e.get("artifactType") == PROFILE_MEDIA_TYPE]
    if not candidates:
        return None
    chosen = _newest(candidates)
    artifact_digest = Digest.parse(str(chosen.get("digest", "")))
    what = f"profile artifact {artifact_digest}"
    inline = _inline(chosen, artifact_digest, what)
    if inline is not None:
        artifact = parse_manifest_or_index(inline, artifact_digest, OCI_MANIFEST)
    else:
        artifact = await client.get_manifest_raw(_at(ref, digest=artifact_digest))
    if not isinstance(artifact, Manifest):
        raise InvalidProfile(f"{what}: not an image manifest")
    doc = json.loads(artifact.raw)
    named = (doc.get("subject") or {}).get("digest")
    if named != str(subject):
        raise InvalidProfile(f"{what}: its subject is {named}, not {subject}")
    layers = [(d, raw) for d, raw in zip(artifact.layers, doc.get("layers") or [], strict=False)
              if d.media_type == PROFILE_MEDIA_TYPE]
    if not layers or layers[0][0].size > MAX_PROFILE_BYTES:
        raise InvalidProfile(f"{what}: no profile layer of acceptable size")
    desc, raw_desc = layers[0]
    log.debug("%s: profile blob %s", what, desc.digest)
    inline = _inline(raw_desc, desc.digest, f"{what}: profile blob {desc.digest}")
    if inline is not None:
        return inline
    return await client.get_blob(ref, desc.digest, max_size=MAX_PROFILE_BYTES)
