"""Small OCI layouts built inside the tests, and readers for what `convert` wrote.

Images come from `tests.e2e.images` specs (the same `Entry`/`Layer` lists the e2e tests
use), compressed as each test asks: gzip, zstd or a plain tar, OCI or Docker media types.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from snapshotter.format.estargz import FOOTER_SIZE, parse_footer, read_toc_json
from tests.e2e.images import Entry, Layer

__all__ = [
    "LAYER_TYPES",
    "Built",
    "layer_files",
    "read_blob",
    "read_layout",
    "toc_of",
    "write_image",
]

LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", ""): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", ""): "application/vnd.docker.image.rootfs.diff.tar",
}
MANIFEST_TYPES = {
    "oci": "application/vnd.oci.image.manifest.v1+json",
    "docker": "application/vnd.docker.distribution.manifest.v2+json",
}
CONFIG_TYPES = {
    "oci": "application/vnd.oci.image.config.v1+json",
    "docker": "application/vnd.docker.container.image.v1+json",
}
INDEX_TYPES = {
    "oci": "application/vnd.oci.image.index.v1+json",
    "docker": "application/vnd.docker.distribution.manifest.list.v2+json",
}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


@dataclass
class Built:
    """What was written: blobs by digest, and the root document's descriptor."""

    blobs: dict[str, bytes]
    root: dict[str, Any]


def image_docs(
    layers: list[Layer] | list[bytes],
    *,
    flavor: str = "oci",
    compression: str = "gzip",
    arch: str = "amd64",
    annotations: dict[str, str] | None = None,
) -> Built:
    """A manifest, its config and layer blobs; `layers` may be raw tar bytes."""
    blobs: dict[str, bytes] = {}
    descs, diff_ids = [], []
    for layer in layers:
        raw = layer if isinstance(layer, bytes) else layer.tar()
        blob = compress(raw, compression)
        blobs[_digest(blob)] = blob
        descs.append({"mediaType": LAYER_TYPES[(flavor, compression)], "digest": _digest(blob),
                      "size": len(blob), "annotations": {"keep.me": "yes"}})
        diff_ids.append(_digest(raw))
    config = json.dumps({
        "architecture": arch, "os": "linux", "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "test"}],
    }).encode()
    blobs[_digest(config)] = config
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPES[flavor],
        "config": {"mediaType": CONFIG_TYPES[flavor], "digest": _digest(config),
                   "size": len(config)},
        "layers": descs,
    }
    if annotations:
        manifest["annotations"] = annotations
    raw_manifest = json.dumps(manifest).encode()
    blobs[_digest(raw_manifest)] = raw_manifest
    root = {"mediaType": MANIFEST_TYPES[flavor], "digest": _digest(raw_manifest),
            "size": len(raw_manifest), "platform": {"os": "linux", "architecture": arch}}
    return Built(blobs, root)


def index_docs(images: list[Built], *, flavor: str = "oci",
               extra: list[dict[str, Any]] | None = None) -> Built:
    blobs: dict[str, bytes] = {}
    for image in images:
        blobs.update(image.blobs)
    doc = {"schemaVersion": 2, "mediaType": INDEX_TYPES[flavor],
           "manifests": [i.root for i in images] + (extra or []),
           "annotations": {"index.note": "kept"}}
    raw = json.dumps(doc).encode()
    blobs[_digest(raw)] = raw
    return Built(blobs, {"mediaType": INDEX_TYPES[flavor], "digest": _digest(raw),
                         "size": len(raw)})


def write_image(root: Path, built: Built, tag: str = "v1") -> None:
    for digest, data in built.blobs.items():
        path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    desc = {k: v for k, v in built.root.items() if k != "platform"}
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "manifests": [desc]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def read_blob(root: Path, digest: str) -> bytes:
    return (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def read_layout(root: Path, tag: str = "v1") -> tuple[dict[str, Any], dict[str, Any]]:
    """(root document, its descriptor in index.json) for `tag`."""
    index = json.loads((root / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads(read_blob(root, desc["digest"])), desc
    raise AssertionError(f"no {tag!r} in {root}/index.json")


def toc_of(blob: bytes) -> tuple[bytes, dict[str, Any]]:
    """(TOC JSON bytes, parsed) of an eStargz blob, through the project's reader."""
    offset, _ = parse_footer(blob[-FOOTER_SIZE:], blob_size=len(blob))
    raw = read_toc_json(blob[offset : len(blob) - FOOTER_SIZE], max_size=64 << 20)
    return raw, json.loads(raw)


def layer_files(tar_bytes: bytes) -> dict[str, tuple[Any, ...]]:
    """name -> (type, mode, uid, gid, size, sha256, link, devices, xattrs) of a plain tar."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        for m in tf:
            data = tf.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
            xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items()
                                  if k.startswith("SCHILY.xattr.")))
            out[m.name.rstrip("/")] = (m.type, m.mode, m.uid, m.gid, m.size,
                                       hashlib.sha256(data).hexdigest(), m.linkname,
                                       m.devmajor, m.devminor, xattrs, int(m.mtime))
    return out


__all__ += ["CONFIG_TYPES", "INDEX_TYPES", "MANIFEST_TYPES", "Entry", "compress",
            "image_docs", "index_docs"]
