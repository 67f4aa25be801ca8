"""`lazysnap convert` end to end against real tools: the registry, containerd's overlayfs
snapshotter, stargz-snapshotter's `ctr-remote`, and lazysnap itself.

One sample image (whiteouts, an opaque dir, hardlinks, xattrs, devices, a fifo, a file over
4 MiB) is converted twice, by `lazysnap convert` and by `ctr-remote image convert --estargz`;
the tests compare the two TOCs, let ctr-remote read our layers, run our image under the
overlayfs snapshotter (the result must be an ordinary image too) and lazily under lazysnap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.estargz import LANDMARKS, EstargzImage, convert_and_push, read_toc
from tests.e2e.harness import Registry
from tests.e2e.images import MEDIA_MANIFEST, merged_tree, push_image, sample_image
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import REFERENCE, Stack
from tests.e2e.tree import LISTING_SCRIPT, RUNTIME_PATHS, compare, host_xattrs, parse_listing

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

REPO = "e2e/convert"
REPO_ROOT = Path(__file__).resolve().parents[2]
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
OURS_ONLY = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


@dataclass(frozen=True)
class Converted:
    ours: EstargzImage
    theirs: EstargzImage
    cli_output: str


def lazysnap_convert(src: str, dst: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter", "convert", "--plain-http", *args, src, dst],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, f"lazysnap convert failed:\n{result.stderr}"
    return result.stdout + result.stderr


def _manifest(registry: Registry, tag: str) -> dict[str, Any]:
    resp = httpx.get(f"{registry.url}/v2/{REPO}/manifests/{tag}",
                     headers={"Accept": MEDIA_MANIFEST}, timeout=30)
    resp.raise_for_status()
    return resp.json()


def _blob(registry: Registry, digest: str) -> bytes:
    resp = httpx.get(f"{registry.url}/v2/{REPO}/blobs/{digest}", timeout=60,
                     follow_redirects=True)
    resp.raise_for_status()
    return resp.content


@pytest.fixture(scope="module")
def converted(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    push_image(registry.url, REPO, "v1", sample_image())
    work = tmp_path_factory.mktemp("convert")
    # Prioritized files (and so landmarks) only reorder entries: the TOCs still compare equal.
    prioritize = work / "prioritize.txt"
    prioritize.write_text("bin/busybox\netc/passwd\ndata/hello.txt\n")
    out = lazysnap_convert(f"{registry.host}/{REPO}:v1", f"{registry.host}/{REPO}:lazysnap",
                           "--prioritize", str(prioritize))
    ours = EstargzImage(REPO, "lazysnap", _manifest(registry, "lazysnap"))
    theirs = convert_and_push(work / "ctr-remote", registry, REPO, "v1", "ctr-remote")
    return Converted(ours, theirs, out)


def _files(toc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a TOC says about each file, without where its bytes sit in the blob."""
    files: dict[str, dict[str, Any]] = {}
    for e in toc["entries"]:  # type: ignore[union-attr]
        name = e["name"].removeprefix("./").rstrip("/")
        if name in OURS_ONLY:
            continue
        if e["type"] == "chunk":
            files[name]["chunks"].append((e.get("chunkOffset", 0), e.get("chunkSize", 0),
                                          e["chunkDigest"]))
            continue
        files[name] = {
            "type": e["type"], "size": e.get("size", 0), "mode": e.get("mode", 0) & 0o7777,
            "uid": e.get("uid", 0), "gid": e.get("gid", 0), "modtime": e.get("modtime", ""),
            "linkName": e.get("linkName", ""), "dev": (e.get("devMajor", 0), e.get("devMinor", 0)),
            "xattrs": e.get("xattrs", {}),
            # ctr-remote writes the digest of no bytes for an empty file; we leave it out.
            "digest": e.get("digest", "") if e.get("size") else "",
            "chunks": [(0, e.get("chunkSize", 0), e["chunkDigest"])] if "chunkDigest" in e else [],
        }
    return files


def test_tocs_list_the_same_files_as_ctr_remote(registry: Registry, converted: Converted) -> None:
    assert "converted " in converted.cli_output and "layers:    2" in converted.cli_output
    assert len(converted.ours.layers) == len(converted.theirs.layers) == 2
    for ours, theirs, first in zip(converted.ours.layers, converted.theirs.layers,
                                   ({"bin/busybox", "etc/passwd"}, {"data/hello.txt"}),
                                   strict=True):
        our_toc = read_toc(_blob(registry, str(ours["digest"])))
        names = [e["name"] for e in our_toc["entries"]]  # type: ignore[union-attr]
        assert first <= set(names[: names.index(".prefetch.landmark")])
        our_files = _files(our_toc)
        their_files = _files(read_toc(_blob(registry, str(theirs["digest"]))))
        differences = [
            (name, our_files.get(name), their_files.get(name))
            for name in sorted(set(our_files) | set(their_files))
            if our_files.get(name) != their_files.get(name)
        ]
        assert not differences, "\n".join(map(repr, differences))
        assert any(len(f["chunks"]) > 1 for f in our_files.values()) or len(our_files) > 20


@pytest.mark.parametrize("stack", [REFERENCE], indirect=True)
def test_converted_image_runs_under_overlayfs_and_ctr_remote_reads_it(
    stack: Stack, converted: Converted, registry: Registry
) -> None:
    ref = converted.ours.ref(registry.host)
    stack.pull(ref)

    seen = parse_listing(stack.run(ref, "listing", "sh", "-c", LISTING_SCRIPT))
    expected = merged_tree(sample_image())
    assert compare(expected, seen, ignore=RUNTIME_PATHS | LANDMARKS) == []
    _check_xattrs(stack, ref, expected)
    # stargz-snapshotter's reader opens each layer from containerd's content store.
    for layer in converted.ours.layers:
        digest = stack.containerd.ctr("images", "get-toc-digest", str(layer["digest"]),
                                      tool="ctr-remote").stdout.strip()
        assert digest == layer["annotations"][TOC_DIGEST]  # type: ignore[index]


@pytest.fixture
def proxy(registry: Registry) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", registry.port)) as p:
        yield p


def test_both_conversions_mount_lazily_under_lazysnap(
    stack: Stack, converted: Converted, proxy: TcpProxy
) -> None:
    expected = merged_tree(sample_image())
    for name, image in (("ours", converted.ours), ("theirs", converted.theirs)):
        proxy.reset()
        ref = image.ref(proxy.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        fetched = proxy.counts().down
        seen = parse_listing(stack.run(ref, f"listing-{name}", "sh", "-c", LISTING_SCRIPT))
        assert compare(expected, seen, ignore=RUNTIME_PATHS | LANDMARKS) == [], name
        assert fetched < 0.2 * image.size(), f"{name}: rpull downloaded the layers: not lazy"
    _check_xattrs(stack, converted.ours.ref(proxy.host), expected)
    remote = [s for s in stack.snapshots() if "remote snapshot" in str(stack.info(s.key))]
    assert len(remote) >= 3  # both images' layers; the busybox layers may coincide


def _check_xattrs(stack: Stack, ref: str, expected: dict[str, Any]) -> None:
    stack.run(ref, "xattrs", "sleep", "60", rm=False, detach=True)
    try:
        assert host_xattrs(stack.task_rootfs("xattrs"), expected) == []
    finally:
        stack.ctr("tasks", "rm", "-f", "xattrs")
        stack.ctr("containers", "rm", "xattrs")
