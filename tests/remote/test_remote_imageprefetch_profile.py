"""`lazysnap prefetch` with a learned profile: the profile's chunks, not the landmark plan."""

from __future__ import annotations

import io
import random
from functools import partial
from pathlib import Path

import pytest
from remote_fakes import layer_tar

from snapshotter.digest import Digest
from snapshotter.format.build import build_estargz
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.registry.retry import RetryPolicy
from snapshotter.remote.imageprefetch import TOC_DIGEST_ANNOTATION, ImagePrefetch, prefetch_images
from snapshotter.remote.layer import load_toc
from snapshotter.remote.profile import Access, Profile
from tests.registry.fakeregistry import FakeRegistry

RNG = random.Random(9)
FILES = {f"data/{i}.bin": RNG.randbytes(30_000) for i in range(4)}
MEDIA = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
async def image(tmp_path: Path):
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(layer_tar(FILES)), out, chunk_size=16 << 10,
                           prioritized=["data/0.bin"])
    fake = FakeRegistry()
    layer = fake.add_blob(out.getvalue())
    config = fake.add_blob(b"{}")
    manifest = fake.add_manifest("app", "v1", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": [{"mediaType": MEDIA, "digest": layer, "size": len(out.getvalue()),
                    "annotations": {TOC_DIGEST_ANNOTATION: str(result.toc_digest)}}],
    }, "application/vnd.oci.image.manifest.v1+json")
    client = RegistryClient(
        hosts_dir=None, docker_config=tmp_path / "none.json", transport=fake.transport(),
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_time=2.0),
    )
    ref = Reference.parse("registry.test/app:v1")
    fetch = partial(client.read_blob_range, ref, Digest.parse(layer))
    toc = await load_toc(fetch, blob_size=len(out.getvalue()), toc_digest=result.toc_digest,
                         max_toc_size=1 << 20)
    yield client, manifest, layer, toc, fake
    await client.aclose()


async def test_a_stored_profile_replaces_the_landmark_plan(image, cache) -> None:
    client, manifest, layer, toc, _ = image
    hot = toc.by_name()["data/2.bin"]
    profile = Profile(manifest, tuple(Access(layer, hot.name, c.digest, c.chunk_offset, 0.0)
                                      for c in hot.chunks))
    events: list[dict] = []
    how = ImagePrefetch(client=client, cache=cache, on_event=events.append,
                        profiles={manifest: profile}.get)
    await prefetch_images(["registry.test/app:v1"], how)
    assert [e["reason"] for e in events if e["event"] == "layer"] == ["profile"]
    by_name = toc.by_name()
    assert all(Digest.parse(c.digest) in cache for c in by_name["data/2.bin"].chunks)
    assert not any(Digest.parse(c.digest) in cache for c in by_name["data/0.bin"].chunks)


async def test_without_a_profile_the_landmark_plan_is_used(image, cache) -> None:
    client, _, _, _, _ = image
    events: list[dict] = []
    how = ImagePrefetch(client=client, cache=cache, on_event=events.append,
                        profiles=lambda manifest: None)
    await prefetch_images(["registry.test/app:v1"], how)
    assert [e["reason"] for e in events if e["event"] == "layer"] == ["landmark"]


async def test_chunks_apart_go_in_one_multi_range_request(image, cache) -> None:
    """Without the daemon (no fetcher), range requests still go as the daemon's do."""
    client, manifest, layer, toc, fake = image
    firsts = [toc.by_name()[f"data/{i}.bin"].chunks[0] for i in (1, 3)]
    assert firsts[0].end < firsts[1].offset  # apart: two ranges, not one
    profile = Profile(manifest, tuple(Access(layer, f"data/{i}.bin", c.digest, 0, 0.0)
                                      for i, c in zip((1, 3), firsts, strict=True)))
    before = len(fake.seen)
    how = ImagePrefetch(client=client, cache=cache, profiles={manifest: profile}.get)
    summary = await prefetch_images(["registry.test/app:v1"], how)
    assert summary.failed_chunks == 0
    assert all(Digest.parse(c.digest) in cache for c in firsts)
    ranges = [r.headers.get("range", "") for r in fake.seen[before:]
              if r.method == "GET" and layer in str(r.url) and "," in r.headers.get("range", "")]
    assert ranges == [f"bytes={firsts[0].offset}-{firsts[0].end - 1},"
                      f"{firsts[1].offset}-{firsts[1].end - 1}"]
