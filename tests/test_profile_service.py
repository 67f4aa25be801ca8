"""ProfileService over a real Repository (no FUSE), RemoteBlob, cache and the fake registry:
learning a profile from reads, applying a stored or pushed one, refusing bad ones."""

from __future__ import annotations

import io
import json
import logging
import re
from functools import partial
from pathlib import Path

import pytest
import trio

from snapshotter import profiles
from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.format.build import build_estargz
from snapshotter.fs.repository import Repository
from snapshotter.fs.tree import LayerTree
from snapshotter.labels import LayerSource
from snapshotter.profiles import ProfileService, ProfileStore
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import OCI_MANIFEST
from snapshotter.registry.reference import Reference
from snapshotter.registry.retry import RetryPolicy
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.layer import load_toc
from snapshotter.remote.profile import encode_profile
from snapshotter.remote.profile_oci import push_profile
from tests.registry.fakeregistry import FakeRegistry
from tests.remote.remote_fakes import CHUNK, FILES, layer_tar, signed_profile

REF = "registry.test/app:v1"
FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_time=5.0)


class Bench:
    def __init__(self, tmp: Path, fake: FakeRegistry, client: RegistryClient, layer: str,
                 manifest: str, toc_digest: Digest) -> None:
        self.tmp, self.fake, self.client = tmp, fake, client
        self.layer, self.manifest, self.toc_digest = layer, manifest, toc_digest
        self.n = 0

    async def daemon(self, window: float = 0.3, ahead: bool = False, **kw):  # type: ignore[no-untyped-def]
        """A fresh 'daemon': its own cache, store and repository, the layer attached.
        With `ahead`, the service may fetch a found profile's chunks before any TOC
        (its range requests are logged in `self.ahead_ranges`)."""
        self.n += 1
        root = self.tmp / f"d{self.n}"
        cache = ChunkCache(root / "cache", max_bytes=64 << 20)
        store = ProfileStore(root / "profiles")
        repo = Repository()
        if ahead:
            self.ahead_ranges: list[tuple[str, int, int]] = []

            def fetcher(ref: Reference, digest: Digest):  # type: ignore[no-untyped-def]
                async def fetch(start: int, end: int) -> bytes:
                    self.ahead_ranges.append((str(digest), start, end))
                    return await self.client.read_blob_range(ref, digest, start, end)
                return fetch

            kw.update(fetcher=fetcher, cache=cache)
        service = ProfileService(store, repo, self.client, window=window, **kw)
        ref = Reference.parse(REF)
        size = await self.client.blob_size(ref, Digest.parse(self.layer))
        fetch = partial(self.client.read_blob_range, ref, Digest.parse(self.layer))
        toc = await load_toc(fetch, blob_size=size, toc_digest=self.toc_digest,
                             max_toc_size=1 << 20)
        blob = RemoteBlob(fetch, cache, blob_size=size, name="layer x")
        repo.attach("1", LayerTree.from_toc(toc), blob)
        source = LayerSource(image_ref=REF, layer_digest=self.layer)
        return service, store, repo, cache, toc, blob, source


@pytest.fixture
async def bench(tmp_path: Path):
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(layer_tar(FILES)), out, chunk_size=CHUNK)
    fake = FakeRegistry()
    layer = fake.add_blob(out.getvalue())
    config = fake.add_blob(b"{}")
    manifest = fake.add_manifest("app", "v1", {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer, "size": len(out.getvalue())}]}, OCI_MANIFEST)
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    yield Bench(tmp_path, fake, client, layer, manifest, result.toc_digest)
    await client.aclose()


async def _read(repo: Repository, name: str) -> bytes:
    layer = repo.layer("1")
    assert layer is not None
    for ino in range(1, len(layer.tree) + 1):
        entry = layer.tree.entry(ino)
        if entry.name == name:
            return await repo.read(layer, entry, 0, entry.size)
    raise AssertionError(name)


async def _learn(bench: Bench, preparing: bool = False) -> bytes:
    """A profile learned by a fresh daemon; with `preparing`, the bridge first told it
    the layer was being prepared (the lookup then finds nothing before the attach)."""
    service, store, repo, cache, toc, blob, source = await bench.daemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        if preparing:
            service.preparing(source)
            with trio.fail_after(5):
                while not any(image.settled for image in service._images.values()):
                    await trio.sleep(0.01)
        service.attached("1", source, toc, blob)
        with trio.fail_after(5):
            while repo.layer("1").observer is None:  # type: ignore[union-attr]
                await trio.sleep(0.01)
        await _read(repo, "usr/lib/big.bin")
        await _read(repo, "etc/hello.txt")
        with trio.fail_after(5):
            while store.raw(bench.manifest) is None:
                await trio.sleep(0.05)
        await trio.sleep(0.4)
        await _read(repo, "usr/lib/zeros")  # after the window: not recorded
        nursery.cancel_scope.cancel()
    cache.close()
    raw = store.raw(bench.manifest)
    assert raw is not None
    return raw


async def test_a_profile_is_learned_from_the_first_reads_of_an_image(bench) -> None:
    raw = await _learn(bench)
    doc = json.loads(raw)["profile"]
    assert doc["manifest"] == bench.manifest  # resolved from the tag: ctr sends no digest
    assert [a[1] for a in doc["accesses"]][-1] == "etc/hello.txt"
    assert {a[1] for a in doc["accesses"]} == {"usr/lib/big.bin", "etc/hello.txt"}


async def test_a_profile_is_learned_when_the_lookup_ran_before_the_attach(bench) -> None:
    raw = await _learn(bench, preparing=True)
    assert {a[1] for a in json.loads(raw)["profile"]["accesses"]} == {
        "usr/lib/big.bin", "etc/hello.txt"}


async def _apply(bench: Bench, setup) -> tuple[ChunkCache, RemoteBlob, object]:  # type: ignore[no-untyped-def]
    service, store, _repo, cache, toc, blob, source = await bench.daemon()
    await setup(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await _attach_and_settle(service, bench, source, toc, blob)
        nursery.cancel_scope.cancel()
    return cache, blob, toc


async def _attach_and_settle(  # type: ignore[no-untyped-def]
    service: ProfileService, bench: Bench, source, toc, blob, timeout: float = 5
) -> None:
    service.attached("1", source, toc, blob)
    with trio.fail_after(timeout):
        while not _settled(service, bench):
            await trio.sleep(0.01)


def _settled(service: ProfileService, bench: Bench) -> bool:
    """The profile was prefetched, or there was none (or a bad one) and learning began."""
    row = service.status(bench.layer).get("profile", {})
    image = service._images.get(bench.manifest)
    return "complete" in row or (image is not None and image.settled and image.profile is None)


async def test_a_stored_profile_prefetches_its_chunks_on_a_cold_start(bench) -> None:
    raw = await _learn(bench)

    async def setup(store: ProfileStore) -> None:
        store.save_raw(raw)

    cache, blob, toc = await _apply(bench, setup)
    by_name = toc.by_name()
    for name in ("usr/lib/big.bin", "etc/hello.txt"):
        assert all(Digest.parse(c.digest) in cache for c in by_name[name].chunks)
    assert not any(Digest.parse(c.digest) in cache for c in by_name["usr/lib/zeros"].chunks)
    assert blob.statistics().bytes_prefetch > 0
    cache.close()


@pytest.mark.parametrize("referrers_api", [False, True], ids=["tag-fallback", "referrers"])
async def test_a_pushed_profile_is_found_in_the_registry(bench, referrers_api: bool) -> None:
    raw = await _learn(bench)
    bench.fake.referrers_api = referrers_api
    bench.fake.seen.clear()
    await push_profile(bench.client, Reference.parse(REF), raw)

    async def setup(store: ProfileStore) -> None:
        pass

    cache, blob, _toc = await _apply(bench, setup)
    assert blob.statistics().bytes_prefetch > 0
    cache.close()
    tagged = [s for s in bench.fake.seen if "/manifests/sha256-" in str(s.url)]
    assert bool(tagged) != referrers_api


async def test_a_profile_pushed_after_the_first_lookup_is_found_later(
    bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first rollout often comes before its profile: an image found without one is
    looked up again, by a Prepare after LOOKUP_AGAIN (not by every Prepare)."""
    monkeypatch.setattr(profiles, "LOOKUP_AGAIN", 0.5)
    raw = await _learn(bench)
    service, store, _repo, cache, toc, blob, source = await bench.daemon(record=False)

    def lookups() -> int:
        return len([s for s in bench.fake.seen
                    if s.method == "GET" and "/manifests/sha256-" in str(s.url)])

    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await _attach_and_settle(service, bench, source, toc, blob)
        assert lookups() > 0
        await push_profile(bench.client, Reference.parse(REF), raw)
        asked = lookups()
        service.preparing(source)  # the image pulled again at once: no second lookup
        await trio.sleep(0.1)
        assert lookups() == asked and service._images[bench.manifest].profile is None
        await trio.sleep(0.5)
        service.preparing(source)
        with trio.fail_after(5):
            while service._images[bench.manifest].profile is None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert service._images[bench.manifest].source == "registry"
    assert store.raw(bench.manifest) is not None  # kept for the next start
    cache.close()


async def test_a_cri_manifest_digest_label_needs_no_resolving(bench) -> None:
    service, store, repo, cache, toc, blob, source = await bench.daemon()
    source = LayerSource(image_ref=REF, layer_digest=bench.layer,
                         manifest_digest=bench.manifest)
    bench.fake.seen.clear()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await _attach_and_settle(service, bench, source, toc, blob)
        nursery.cancel_scope.cancel()
    assert not [s for s in bench.fake.seen if s.url.path.endswith("/manifests/v1")]
    del store, repo
    cache.close()


@pytest.mark.allow_log_errors
async def test_a_tampered_registry_profile_is_refused_and_learning_goes_on(bench, caplog) -> None:
    raw = await _learn(bench)
    doc = json.loads(raw)
    doc["profile"]["window"] = 99.0
    await push_profile(bench.client, Reference.parse(REF), json.dumps(doc).encode())

    async def setup(store: ProfileStore) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="lazysnap.profiles"):
        cache, blob, _ = await _apply(bench, setup)
    assert "registry profile rejected" in caplog.text and "digest mismatch" in caplog.text
    # _apply returned because the service went on to learn a profile of its own.
    assert blob.statistics().bytes_prefetch == 0
    cache.close()


@pytest.mark.allow_log_errors
async def test_another_images_profile_is_refused(bench, caplog) -> None:
    raw = await _learn(bench)
    doc = json.loads(raw)
    other = json.loads(encode_profile_for(doc, str(Digest.of(b"other"))))

    async def setup(store: ProfileStore) -> None:
        # Filed under this image's name, but naming another manifest inside.
        store.directory.mkdir(parents=True, exist_ok=True)
        store.path(bench.manifest).write_text(json.dumps(other))

    with caplog.at_level(logging.WARNING, logger="lazysnap.profiles"):
        cache, blob, _ = await _apply(bench, setup)
    assert "stored profile rejected" in caplog.text and "belongs to manifest" in caplog.text
    assert blob.statistics().bytes_prefetch == 0
    cache.close()


def encode_profile_for(doc: dict, manifest: str) -> bytes:
    from snapshotter.remote.profile import decode_profile

    profile = decode_profile(json.dumps(doc).encode())
    return encode_profile(type(profile)(manifest, profile.accesses, profile.window))


async def test_layers_restored_at_start_are_not_profiled(bench) -> None:
    service, store, repo, cache, toc, blob, source = await bench.daemon()
    restored = trio.Event()
    service._after = restored
    service.attached("1", source, toc, blob)
    await trio.sleep(0.2)
    assert repo.layer("1").observer is None  # type: ignore[union-attr]
    assert not service._images
    del store
    cache.close()


async def _apply_ahead(  # type: ignore[no-untyped-def]
        bench: Bench, raw: bytes, **kw) -> tuple[ChunkCache, RemoteBlob, object, dict]:  # type: ignore[type-arg]
    service, store, _repo, cache, toc, blob, source = await bench.daemon(ahead=True, **kw)
    store.save_raw(raw)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await _attach_and_settle(service, bench, source, toc, blob, timeout=10)
        nursery.cancel_scope.cancel()
    return cache, blob, toc, service.status(bench.layer)["profile"]


async def test_a_found_profile_is_fetched_ahead_from_its_spans_for_the_whole_image(
        bench, caplog) -> None:
    """The chunks arrive through the image-wide fetch (located by the profile, before any
    TOC), so the attached layer's own prefetch has nothing left to do."""
    raw = await _learn(bench)
    assert all(len(row) == 9 for row in json.loads(raw)["profile"]["accesses"])
    with caplog.at_level(logging.INFO, logger="lazysnap.profiles"):
        cache, blob, toc, row = await _apply_ahead(bench, raw)
    assert "prefetched ahead of the TOCs" in caplog.text
    assert not re.search(r"profile of \S+ prefetched \d+ chunks", caplog.text)  # no 2nd pass
    by_name = toc.by_name()  # type: ignore[attr-defined]
    wanted = [c for n in ("usr/lib/big.bin", "etc/hello.txt") for c in by_name[n].chunks]
    assert all(Digest.parse(c.digest) in cache for c in wanted)
    assert not any(Digest.parse(c.digest) in cache for c in by_name["usr/lib/zeros"].chunks)
    # The layer was attached: the fetch ahead went through its blob, so its statistics
    # (status rows, metrics) count those bytes; the TOC-located pass found nothing left.
    assert blob.statistics().bytes_prefetch == row["bytes"] > 0
    assert row["complete"] is True
    assert row["fetched_chunks"] == row["chunks"] == len({c.digest for c in wanted})
    cache.close()


async def test_preparing_a_layer_starts_the_fetch_ahead_before_its_toc_is_read(bench) -> None:
    """Told that a layer is being prepared (its TOC not fetched yet), the service looks
    the profile up and fetches its chunks into a blob the bridge adopts on attach; the
    manifest the tag resolved to is not fetched again."""
    raw = await _learn(bench)
    service, store, _repo, cache, toc, _blob, source = await bench.daemon(ahead=True)
    store.save_raw(raw)
    bench.fake.seen.clear()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        service.preparing(source)
        with trio.fail_after(10):
            while not bench.ahead_ranges or service.blobs.get(bench.layer) is None:
                await trio.sleep(0.01)
            image = service._images[bench.manifest]
            assert image.ahead is not None
            await image.ahead.wait()
        nursery.cancel_scope.cancel()
    ahead = service.blobs[bench.layer]
    assert ahead.statistics().bytes_prefetch > 0
    by_name = toc.by_name()  # type: ignore[attr-defined]
    assert all(Digest.parse(c.digest) in cache for c in by_name["etc/hello.txt"].chunks)
    manifests = [s.url.path for s in bench.fake.seen if "/manifests/" in s.url.path]
    # The tag is not resolved again at all: the learning run above resolved it less than
    # a minute ago with the same client (RegistryClient.get_manifest's max_age), and the
    # fetch ahead reuses the document the tag resolved to.
    assert manifests == [], manifests
    cache.close()


@pytest.mark.allow_log_errors
async def test_a_profile_whose_spans_lie_costs_fetches_never_content(bench, caplog) -> None:
    """Spans are the profile's word, not the TOC's: one that points at other bytes fails
    the chunk's digest check, and the layer's TOC-located prefetch fetches it instead."""
    raw = await _learn(bench)
    doc = json.loads(raw)["profile"]
    for row in doc["accesses"]:  # every span now points at the first chunk's bytes
        row[5:9] = doc["accesses"][-1][5:9]
    from snapshotter.remote.profile import decode_profile

    forged = encode_profile(decode_profile(signed_profile(doc)))
    with caplog.at_level(logging.WARNING):
        cache, blob, toc, row = await _apply_ahead(bench, forged)
    by_name = toc.by_name()  # type: ignore[attr-defined]
    for name in ("usr/lib/big.bin", "etc/hello.txt"):
        for chunk in by_name[name].chunks:
            data = cache.get(Digest.parse(chunk.digest))
            assert data is not None and Digest.of(data) == Digest.parse(chunk.digest)
    assert blob.statistics().bytes_prefetch > 0  # the TOC-located fetch did the work
    assert row["complete"] is True
    assert "prefetch of" in caplog.text and "failed" in caplog.text
    cache.close()


async def test_layers_served_from_elsewhere_are_not_fetched_ahead(bench) -> None:
    """A layer a repository root holds is never read through the repository, so the
    image-wide fetch leaves it out (were it attached lazily after all, its own TOC-located
    prefetch still runs)."""
    raw = await _learn(bench)
    cache, blob, _toc, _row = await _apply_ahead(
        bench, raw, elsewhere=lambda digest: digest == bench.layer)
    assert bench.ahead_ranges == []
    assert blob.statistics().bytes_prefetch > 0
    cache.close()


async def test_blobs_fetched_ahead_are_kept_for_the_bridge_to_adopt(bench) -> None:
    service, _store, _repo, cache, _toc, blob, source = await bench.daemon(ahead=True)
    ref = Reference.parse(REF)
    other = str(Digest.of(b"a later layer"))
    ahead = service._blob(ref, other, 1000)
    assert service.blobs == {other: ahead} and service._blob(ref, other, 1000) is ahead
    assert service._blob(ref, other, 999) is not ahead  # another size: not the same blob
    service._attached_blobs[bench.layer] = blob
    assert service._blob(ref, bench.layer, blob.blob_size) is blob
    del source
    cache.close()
