"""Label keys that containerd, CRI, nerdctl and ctr-remote send us, and ours.

Also containerd's size rule for labels (labels/validate.go): key + value <= 4096 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from snapshotter.errors import InvalidArgument

__all__ = [
    "CRI_IMAGE_LAYERS",
    "CRI_IMAGE_REF",
    "CRI_LAYER_DIGEST",
    "CRI_MANIFEST_DIGEST",
    "GC_ROOT",
    "MAX_LABEL_SIZE",
    "REMOTE",
    "REMOTE_VALUE",
    "SNAPSHOT_REF",
    "STARGZ_DIGEST",
    "STARGZ_LAYERS",
    "STARGZ_PREFETCH",
    "STARGZ_REFERENCE",
    "STARGZ_SKIPVERIFY",
    "TOC_DIGEST",
    "UNCOMPRESSED_SIZE",
    "InvalidLabel",
    "LayerSource",
    "MissingSourceLabels",
    "layer_source",
    "validate_labels",
]

SNAPSHOT_REF = "containerd.io/snapshot.ref"
GC_ROOT = "containerd.io/gc.root"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
STARGZ_PREFETCH = "containerd.io/snapshot/remote/stargz.prefetch"
STARGZ_SKIPVERIFY = "containerd.io/snapshot/remote/stargz.skipverify"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
# Set on a committed snapshot that a remote layer provides (the handshake's marker).
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "remote snapshot"

MAX_LABEL_SIZE = 4096


class InvalidLabel(InvalidArgument):
    """A label that containerd itself would refuse."""


def validate_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if not key:
            raise InvalidLabel("label key must not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidLabel(
                f"label {key[:64]!r}: key and value greater than maximum size "
                f"({MAX_LABEL_SIZE} bytes)"
            )


@dataclass(frozen=True, slots=True)
class LayerSource:
    """Where a layer offered for remote mounting lives, as read from Prepare's labels.

    CRI/nerdctl/transfer-service keys win over the legacy `remote/stargz.*` keys that
    `ctr-remote image rpull` sets, as in stargz-snapshotter.
    """

    image_ref: str
    layer_digest: str
    manifest_digest: str = ""
    image_layers: tuple[str, ...] = ()
    toc_digest: str = ""
    skip_verify: bool = False
    prefetch_size: int | None = None


class MissingSourceLabels(InvalidArgument):
    """Prepare carried snapshot.ref but not enough labels to find the layer."""


def layer_source(labels: Mapping[str, str]) -> LayerSource:
    """The layer's source, or MissingSourceLabels naming what is missing."""
    ref = labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REFERENCE, "")
    digest = labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST, "")
    if not ref or not digest:
        missing = [k for k, v in (("image reference", ref), ("layer digest", digest)) if not v]
        raise MissingSourceLabels(
            f"no {' and no '.join(missing)} label (plain `ctr image pull` sends none; use "
            "`ctr-remote image rpull`, CRI, or the transfer service)"
        )
    layers = labels.get(CRI_IMAGE_LAYERS) or labels.get(STARGZ_LAYERS, "")
    prefetch = labels.get(STARGZ_PREFETCH, "")
    return LayerSource(
        image_ref=ref,
        layer_digest=digest,
        manifest_digest=labels.get(CRI_MANIFEST_DIGEST, ""),
        image_layers=tuple(x for x in layers.split(",") if x),
        toc_digest=labels.get(TOC_DIGEST, ""),
        skip_verify=labels.get(STARGZ_SKIPVERIFY, "").lower() in ("true", "1", "yes"),
        prefetch_size=int(prefetch) if prefetch.isdigit() else None,
    )
