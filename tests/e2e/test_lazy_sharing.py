"""One lazy layer under two chains, through containerd's garbage collector.

Two images end in the same eStargz data layer on different base layers, so containerd
keeps two committed snapshots (two chain IDs) for one layer digest; lazysnap must serve
both from one repository directory and keep it while either snapshot lives. The images
are built with lazysnap's own eStargz writer (`format/build.py`; deterministic, so the
shared layer has one digest) and pushed with their `toc.digest` annotations.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time

import httpx
import pytest

from snapshotter.format.build import build_estargz
from tests.e2e.daemon_status import layer_rows, status_after
from tests.e2e.harness import Registry
from tests.e2e.images import (
    MEDIA_CONFIG,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    Entry,
    Layer,
    busybox_layer,
)
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

MiB = 1024 * 1024
SHARED = {f"data/shared-{i}.bin": random.Random(90 + i).randbytes(2 * MiB + i) for i in range(3)}
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"


def _push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if client.head(f"/v2/{repo}/blobs/{digest}").status_code != 200:
        start = client.post(f"/v2/{repo}/blobs/uploads/")
        start.raise_for_status()
        where = httpx.URL(start.headers["Location"]).copy_merge_params({"digest": digest})
        client.put(where, content=data).raise_for_status()
    return digest


def _push_estargz_image(registry: Registry, repo: str, tag: str, layers: list[Layer]) -> list[str]:
    """Push `layers` as eStargz; returns the layer digests, base first."""
    descriptors, diff_ids = [], []
    with httpx.Client(base_url=registry.url, timeout=30) as client:
        for layer in layers:
            out = io.BytesIO()
            built = build_estargz(io.BytesIO(layer.tar()), out, compression_level=1)
            digest = _push_blob(client, repo, out.getvalue())
            descriptors.append({"mediaType": MEDIA_LAYER_GZIP, "digest": digest,
                                "size": built.size,
                                "annotations": {TOC_DIGEST: str(built.toc_digest)}})
            diff_ids.append(str(built.diff_id))
        config = json.dumps({
            "architecture": "amd64" if __import__("os").uname().machine == "x86_64" else "arm64",
            "os": "linux", "config": {"Cmd": ["/bin/echo", "ready"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }).encode()
        manifest = {
            "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": _push_blob(client, repo, config),
                       "size": len(config)},
            "layers": descriptors,
        }
        client.put(f"/v2/{repo}/manifests/{tag}", content=json.dumps(manifest).encode(),
                   headers={"Content-Type": MEDIA_MANIFEST}).raise_for_status()
    return [str(d["digest"]) for d in descriptors]


@pytest.fixture(scope="module")
def two_images(registry: Registry) -> tuple[str, str, str]:
    """(ref p, ref q, shared data layer digest): same top layer, different bases."""
    data = Layer((Entry("data", "dir", mode=0o755),
                  *(Entry(path, data=content) for path, content in SHARED.items())))
    other_base = busybox_layer(extra=[Entry("etc/variant", data=b"q\n")])
    p = _push_estargz_image(registry, "e2e/shared", "p", [busybox_layer(), data])
    q = _push_estargz_image(registry, "e2e/shared", "q", [other_base, data])
    assert p[1] == q[1] and p[0] != q[0]
    return f"{registry.host}/e2e/shared:p", f"{registry.host}/e2e/shared:q", p[1]


def _sha(stack: Stack, ref: str, cid: str, path: str) -> str:
    return stack.run(ref, cid, "sha256sum", f"/{path}").split()[0]


def test_a_layer_under_two_chains_lives_until_both_are_gone(
    stack: Stack, two_images: tuple[str, str, str]
) -> None:
    assert stack.lazysnap is not None
    root = stack.lazysnap.root
    p, q, shared = two_images
    for ref in (p, q):
        stack.pull(ref, tool="ctr-remote", verb="rpull")
    pulled = time.time()
    row = layer_rows(status_after(root, pulled), [shared])[shared]
    assert (row["mode"], row["snapshots"]) == ("lazy", 2)
    repo_dirs = [p.name for p in (root / "repo").iterdir()]
    assert row["path"].rpartition("/")[2] in repo_dirs
    assert len(repo_dirs) == 3, repo_dirs  # two bases, one shared data layer

    paths = sorted(SHARED)
    assert _sha(stack, p, "read-p", paths[0]) == hashlib.sha256(SHARED[paths[0]]).hexdigest()

    stack.remove_image_and_gc(p)
    removed = time.time()
    row = layer_rows(status_after(root, removed), [shared])[shared]
    assert row["snapshots"] == 1
    # q still reads the shared layer, including a file nobody read before.
    assert _sha(stack, q, "read-q", paths[1]) == hashlib.sha256(SHARED[paths[1]]).hexdigest()

    stack.remove_image_and_gc(q)
    assert layer_rows(status_after(root, time.time()), [shared]) == {}
    assert list((root / "repo").iterdir()) == []
