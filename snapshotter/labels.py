"""Label keys that containerd, CRI, nerdctl and ctr-remote send us, and ours.

Also containerd's size rule for labels (labels/validate.go): key + value <= 4096 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

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
