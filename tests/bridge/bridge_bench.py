"""The bench for bridge tests: `FuseRemoteLayers` on the running trio loop with real parts
below it (RegistryClient over the in-memory fake registry, chunk cache, repository), eStargz
layers built by `format/build.py`, and Prepare labels as ctr-remote and CRI send them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
import trio

from snapshotter import labels as L
from snapshotter.bridge import FuseRemoteLayers
from snapshotter.config import Config
from snapshotter.format.build import build_estargz
from snapshotter.format.estargz import TOC_NAME, footer_bytes
from snapshotter.fs.repository import Repository
from snapshotter.registry.retry import RetryPolicy
from tests.registry.fakeregistry import FakeRegistry

FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_time=3.0)
IMAGE = "registry.test/app:v1"
CHUNK = 64 << 10
FILES = {
    "etc/hello.txt": b"hello from a lazy layer\n",
    "usr/big.bin": random.Random(5).randbytes(3 * CHUNK + 17),
}


def layer_tar(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class Layer:
    digest: str
    toc_digest: str
    size: int


def push_estargz(fake: FakeRegistry, files: Mapping[str, bytes] = FILES) -> Layer:
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(layer_tar(files)), out, chunk_size=CHUNK)
    return Layer(fake.add_blob(out.getvalue()), str(result.toc_digest), result.size)


def blob_with_toc(toc: dict[str, object]) -> tuple[bytes, str]:
    """An eStargz-shaped blob whose TOC is `toc`, verbatim, with its true digest."""
    raw = json.dumps(toc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(raw)
        tf.addfile(info, io.BytesIO(raw))
    # A leading member, so the TOC does not start at offset 0 like nothing real does.
    blob = gzip.compress(b"\0" * 512) + gzip.compress(buf.getvalue())
    toc_offset = len(gzip.compress(b"\0" * 512))
    return blob + footer_bytes(toc_offset), "sha256:" + hashlib.sha256(raw).hexdigest()


def layer_labels(
    layer: str, toc: str = "", *, cri: bool = False, ref: str = IMAGE
) -> dict[str, str]:
    """Prepare's labels: ctr-remote's `remote/stargz.*` keys, or the CRI ones."""
    chain = "sha256:" + hashlib.sha256(layer.encode()).hexdigest()
    out = {L.SNAPSHOT_REF: chain, L.GC_ROOT: "2024-01-01T00:00:00Z"}
    if cri:
        out |= {L.CRI_IMAGE_REF: ref, L.CRI_LAYER_DIGEST: layer, L.CRI_IMAGE_LAYERS: layer}
    else:
        out |= {L.STARGZ_REFERENCE: ref, L.STARGZ_DIGEST: layer, L.STARGZ_LAYERS: layer}
    if toc:
        out[L.TOC_DIGEST] = toc
    return out


@dataclass
class Bench:
    """One bridge on the running trio loop, called from worker threads like gRPC does."""

    bridge: FuseRemoteLayers
    repo: Repository
    fake: FakeRegistry
    cfg: Config
    prepared: int = 0

    async def prepare(self, labels: Mapping[str, str]) -> str | None:
        self.prepared += 1
        key = f"default/{self.prepared}/extract {labels.get(L.SNAPSHOT_REF, '')}"
        return await trio.to_thread.run_sync(self.bridge.prepare, key, "", labels)

    async def call(self, method: str, handle: str) -> None:
        await trio.to_thread.run_sync(getattr(self.bridge, method), handle)


MakeBench = Callable[..., Bench]


def registry_down() -> FakeRegistry:
    """A registry that refuses every connection."""
    fake = FakeRegistry()
    fake.transport = lambda: httpx.MockTransport(_refuse)  # type: ignore[method-assign]
    return fake


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


