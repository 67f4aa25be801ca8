"""Media types a converter meets: what each layer type's compression is, and what to write.

Pure tables; the manifest and index types themselves live in `registry/manifest.py`.
"""

from __future__ import annotations

from snapshotter.convert.errors import UnsupportedMediaType

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "compression_of",
    "is_docker",
    "is_foreign",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# layer media type -> compression ("gzip", "zstd" or "" for a plain tar)
_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "",
    OCI_LAYER_GZIP: "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
# Layers the distribution rules say not to copy: their blobs live at their `urls`.
_FOREIGN = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)


def compression_of(media_type: str, what: str) -> str:
    """"gzip", "zstd" or "" (plain tar) for a layer media type; UnsupportedMediaType else."""
    try:
        return _LAYERS[media_type]
    except KeyError:
        raise UnsupportedMediaType(
            f"{what}: unsupported layer media type {media_type!r}"
        ) from None


def is_foreign(media_type: str) -> bool:
    return media_type in _FOREIGN


def is_docker(media_type: str) -> bool:
    return media_type.startswith("application/vnd.docker.")
