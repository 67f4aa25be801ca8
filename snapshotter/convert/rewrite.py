"""New config, manifest and index documents around converted layers; pure JSON in, bytes out.

Each document is edited in place from the source's own JSON, so fields we do not know
(history, annotations, subject, artifactType, vendor keys) pass through unchanged. Only
what the conversion changes is touched: layer descriptors, `rootfs.diff_ids`, the config
descriptor, child manifest descriptors, and with `oci=True` the Docker media types.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from snapshotter.convert.errors import InvalidImage
from snapshotter.convert.mediatypes import (
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    is_docker,
)
from snapshotter.digest import Digest
from snapshotter.labels import TOC_DIGEST, UNCOMPRESSED_SIZE

__all__ = [
    "NewBlob",
    "config_diff_ids",
    "layer_media_type",
    "new_config",
    "new_index",
    "new_layer_descriptor",
    "new_manifest",
]

# Annotations that describe the old blob's bytes and would lie about the new one.
_STALE_PREFIXES = ("io.containers.zstd-chunked.", "containerd.io/snapshot/stargz/")
_STALE = frozenset({TOC_DIGEST, UNCOMPRESSED_SIZE, "containerd.io/uncompressed"})


@dataclass(frozen=True, slots=True)
class NewBlob:
    """A document or blob as written: what its parent's descriptor must say."""

    digest: Digest
    size: int
    media_type: str


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise InvalidImage(f"{what}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidImage(f"{what}: not a JSON object")
    return doc


def config_diff_ids(raw: bytes, layers: int, what: str) -> list[Digest]:
    """The config's `rootfs.diff_ids`, which must name exactly one per layer."""
    doc = _loads(raw, what)
    rootfs = doc.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or len(ids) != layers:
        have = len(ids) if isinstance(ids, list) else "no"
        raise InvalidImage(f"{what}: {have} rootfs.diff_ids for {layers} layers")
    try:
        return [Digest.parse(str(d)) for d in ids]
    except ValueError as exc:
        raise InvalidImage(f"{what}: {exc}") from None


def new_config(raw: bytes, diff_ids: Sequence[Digest], what: str) -> bytes:
    doc = _loads(raw, what)
    doc["rootfs"]["diff_ids"] = [str(d) for d in diff_ids]
    return _dumps(doc)


def new_layer_descriptor(
    old: Mapping[str, Any], blob: NewBlob, toc_digest: Digest, uncompressed_size: int
) -> dict[str, Any]:
    desc = {k: v for k, v in old.items() if k != "urls"}
    annotations = {
        k: v
        for k, v in (old.get("annotations") or {}).items()
        if k not in _STALE and not k.startswith(_STALE_PREFIXES)
    }
    annotations[TOC_DIGEST] = str(toc_digest)
    annotations[UNCOMPRESSED_SIZE] = str(uncompressed_size)
    desc.update(mediaType=blob.media_type, digest=str(blob.digest), size=blob.size)
    desc["annotations"] = annotations
    return desc


def layer_media_type(manifest_media_type: str, oci: bool) -> str:
    return DOCKER_LAYER_GZIP if is_docker(manifest_media_type) and not oci else OCI_LAYER_GZIP


def new_manifest(
    raw: bytes,
    media_type: str,
    config: NewBlob,
    layers: Sequence[Mapping[str, Any]],
    *,
    oci: bool,
    what: str,
) -> tuple[bytes, str]:
    """(bytes, media type) of the manifest with a new config and layer list."""
    doc = _loads(raw, what)
    if oci and is_docker(media_type):
        media_type = OCI_MANIFEST
        doc["mediaType"] = OCI_MANIFEST
    doc["config"] = {
        **doc["config"],
        "mediaType": OCI_CONFIG if oci else doc["config"].get("mediaType", config.media_type),
        "digest": str(config.digest),
        "size": config.size,
    }
    doc["layers"] = list(layers)
    return _dumps(doc), media_type


def new_index(
    raw: bytes,
    media_type: str,
    children: Sequence[tuple[int, NewBlob]],
    *,
    oci: bool,
    what: str,
) -> tuple[bytes, str]:
    """The index listing only `children`: (position in the source list, what was written)."""
    doc = _loads(raw, what)
    if oci and media_type == DOCKER_LIST:
        media_type = OCI_INDEX
        doc["mediaType"] = OCI_INDEX
    old = doc["manifests"]
    doc["manifests"] = [
        {**old[i], "mediaType": blob.media_type, "digest": str(blob.digest), "size": blob.size}
        for i, blob in children
    ]
    return _dumps(doc), media_type
