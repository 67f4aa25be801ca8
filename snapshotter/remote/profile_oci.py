"""Profiles in the registry: an OCI artifact whose `subject` is the image manifest.

Found through the referrers API (`GET /v2/<name>/referrers/<digest>`), or, on registries
without it, through the tag-schema fallback: an OCI index tagged `sha256-<hex>` of the
subject that lists the referring manifests. Every step is verified by digest (the artifact
manifest, its subject, the profile blob); the profile's own checks are `decode_profile`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from snapshotter.digest import Digest
from snapshotter.errors import NotFound
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import OCI_INDEX, OCI_MANIFEST, Index, Manifest
from snapshotter.registry.reference import Reference
from snapshotter.remote.profile import MAX_PROFILE_BYTES, PROFILE_MEDIA_TYPE, InvalidProfile

__all__ = ["EMPTY_CONFIG", "fallback_tag", "find_profile", "push_profile"]

log = logging.getLogger(__name__)

EMPTY_CONFIG = b"{}"
_EMPTY_TYPE = "application/vnd.oci.empty.v1+json"


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
        "layers": [{"mediaType": PROFILE_MEDIA_TYPE, "digest": str(blob), "size": len(raw)}],
        "subject": {"mediaType": subject.media_type, "digest": str(subject.digest),
                    "size": len(subject.raw)},
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
                       if e.get("digest") != str(digest)]
    except NotFound:
        pass
    entries.append({"mediaType": OCI_MANIFEST, "digest": str(digest), "size": len(manifest_raw),
                    "artifactType": PROFILE_MEDIA_TYPE})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    await client.put_manifest(tag_ref, json.dumps(index, separators=(",", ":")).encode(),
                              OCI_INDEX)
    return digest, "tag"


async def find_profile(client: RegistryClient, ref: Reference, subject: Digest) -> bytes | None:
    """The newest profile blob stored for manifest `subject` in `ref`'s repository, or None.

    Raises InvalidProfile when the artifact found does not refer to `subject`; the blob
    itself is checked against its digest by the client (DataLoss otherwise).
    """
    listing = await client.get_referrers(ref, subject)
    if listing is None:
        try:
            found = await client.get_manifest_raw(_at(ref, tag=fallback_tag(subject)))
        except NotFound:
            return None
        listing = found.raw if isinstance(found, Index) else b"{}"
    try:
        entries = json.loads(listing).get("manifests") or []
    except (ValueError, AttributeError):
        raise InvalidProfile(f"referrers of {subject}: not an index") from None
    candidates = [e for e in entries
                  if isinstance(e, dict) and e.get("artifactType") == PROFILE_MEDIA_TYPE]
    if not candidates:
        return None
    artifact_digest = Digest.parse(str(candidates[-1].get("digest", "")))
    artifact = await client.get_manifest_raw(_at(ref, digest=artifact_digest))
    what = f"profile artifact {artifact_digest}"
    if not isinstance(artifact, Manifest):
        raise InvalidProfile(f"{what}: not an image manifest")
    named = (json.loads(artifact.raw).get("subject") or {}).get("digest")
    if named != str(subject):
        raise InvalidProfile(f"{what}: its subject is {named}, not {subject}")
    layers = [d for d in artifact.layers if d.media_type == PROFILE_MEDIA_TYPE]
    if not layers or layers[0].size > MAX_PROFILE_BYTES:
        raise InvalidProfile(f"{what}: no profile layer of acceptable size")
    log.debug("%s: profile blob %s", what, layers[0].digest)
    return await client.get_blob(ref, layers[0].digest, max_size=MAX_PROFILE_BYTES)
