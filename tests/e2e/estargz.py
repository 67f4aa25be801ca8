"""eStargz test images made by an independent producer, stargz-snapshotter's `ctr-remote`.

`convert_and_push` pulls a pushed OCI image into a throwaway containerd (the overlayfs
reference stack), converts it with `ctr-remote image convert --estargz --oci`, and pushes the
result. `read_toc` and `blob_data_path` let a test find and damage a file's bytes inside the
registry's storage, which the registry then serves without checking.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.e2e.harness import Registry
from tests.e2e.images import MEDIA_MANIFEST
from tests.e2e.stack import REFERENCE, start_stack

__all__ = [
    "LANDMARKS",
    "EstargzImage",
    "blob_data_path",
    "convert_and_push",
    "copy_image",
    "read_toc",
]

# Entries ctr-remote adds to each layer. A full unpack (fallback) shows them in the root
# directory; a lazy mount may hide them. Either way they are not part of the image's tree.
LANDMARKS = frozenset({"/stargz.index.json", "/.prefetch.landmark", "/.no.prefetch.landmark"})

_FOOTER = 51


@dataclass(frozen=True)
class EstargzImage:
    repo: str
    tag: str
    manifest: dict[str, object]

    @property
    def layers(self) -> list[dict[str, object]]:
        return self.manifest["layers"]  # type: ignore[return-value]

    def size(self) -> int:
        """Compressed bytes of all layers: what a full pull downloads."""
        return sum(int(layer["size"]) for layer in self.layers)  # type: ignore[call-overload]

    def ref(self, host: str) -> str:
        """The reference through `host`, e.g. a proxy in front of the registry."""
        return f"{host}/{self.repo}:{self.tag}"


def convert_and_push(
    workdir: Path, registry: Registry, repo: str, src_tag: str, dst_tag: str
) -> EstargzImage:
    src = f"{registry.host}/{repo}:{src_tag}"
    dst = f"{registry.host}/{repo}:{dst_tag}"
    with start_stack(workdir, REFERENCE, show_logs=False) as stack:
        # `content fetch` stores the image without unpacking it anywhere.
        stack.ctr("content", "fetch", "--plain-http", src)
        # Level 1: test layers are mostly random bytes, where level 9 only costs time.
        stack.containerd.ctr(
            "images",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-compression-level",
            "1",
            src,
            dst,
            tool="ctr-remote",
        )
        stack.push(dst)
    resp = httpx.get(
        f"{registry.url}/v2/{repo}/manifests/{dst_tag}",
        headers={"Accept": MEDIA_MANIFEST},
        timeout=30,
    )
    resp.raise_for_status()
    manifest = resp.json()
    for layer in manifest["layers"]:
        if "containerd.io/snapshot/stargz/toc.digest" not in layer.get("annotations", {}):
            raise AssertionError(f"{dst}: layer {layer['digest']} has no TOC digest annotation")
    return EstargzImage(repo, dst_tag, manifest)


def copy_image(workdir: Path, src: str, dst: str, user: str = "") -> None:
    """Copy an image between registries (plain HTTP) through a throwaway containerd.

    `user` ("name:password") authenticates the push; the source needs no credentials.
    """
    with start_stack(workdir, REFERENCE, show_logs=False) as stack:
        stack.ctr("content", "fetch", "--plain-http", src)
        stack.ctr("images", "tag", src, dst)
        stack.ctr("images", "push", "--plain-http", *(["--user", user] if user else []), dst)


def blob_data_path(registry: Registry, digest: str) -> Path:
    """Where distribution's filesystem driver keeps a blob's bytes."""
    hexdigest = digest.removeprefix("sha256:")
    return (
        registry.workdir
        / "storage/docker/registry/v2/blobs/sha256"
        / hexdigest[:2]
        / hexdigest
        / "data"
    )


def read_toc(blob: bytes) -> dict[str, object]:
    """The TOC JSON of an eStargz blob, located through its 51-byte footer."""
    footer = gzip.GzipFile(fileobj=io.BytesIO(blob[-_FOOTER:]))
    footer.read()  # the footer is an empty gzip member; its extra field holds the offset
    extra = blob[-_FOOTER + 16 : -_FOOTER + 16 + 22]
    if not extra.endswith(b"STARGZ"):
        raise ValueError("not an eStargz blob: footer has no STARGZ marker")
    toc_offset = int(extra[:16], 16)
    tar_bytes = gzip.decompress(blob[toc_offset : len(blob) - _FOOTER])
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        member = tf.extractfile("stargz.index.json")
        assert member is not None
        return json.loads(member.read())
