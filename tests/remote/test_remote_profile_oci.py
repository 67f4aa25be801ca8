"""Profiles stored in a registry: referrers API and the `sha256-<hex>` tag fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.digest import Digest
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import OCI_INDEX, OCI_MANIFEST
from snapshotter.registry.reference import Reference
from snapshotter.registry.retry import RetryPolicy
from snapshotter.remote.profile import (
    PROFILE_MEDIA_TYPE,
    Access,
    InvalidProfile,
    Profile,
    decode_profile,
    encode_profile,
)
from snapshotter.remote.profile_oci import (
    CREATED,
    _newest,
    fallback_tag,
    find_profile,
    push_profile,
)
from tests.registry.fakeregistry import FakeRegistry

FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_time=5.0)
REF = Reference.parse("registry.test/app:v1")


def _image(fake: FakeRegistry) -> Digest:
    config = fake.add_blob(b'{"architecture":"amd64","os":"linux"}')
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": config, "size": 38},
           "layers": []}
    return Digest.parse(fake.add_manifest("app", "v1", doc, OCI_MANIFEST))


def _profile(manifest: Digest, name: str = "bin/app") -> bytes:
    layer = str(Digest.of(b"layer"))
    return encode_profile(Profile(str(manifest), (Access(layer, name, layer, 0, 0.0),)))


@pytest.fixture(params=[True, False], ids=["referrers-api", "tag-fallback"])
async def registry(request, tmp_path: Path):
    fake = FakeRegistry(referrers_api=request.param)
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    yield fake, client
    await client.aclose()


async def test_a_pushed_profile_is_found_again(registry) -> None:
    fake, client = registry
    manifest = _image(fake)
    assert await find_profile(client, REF, manifest) is None
    raw = _profile(manifest)
    _, how = await push_profile(client, REF, raw)
    assert how == ("referrers" if fake.referrers_api else "tag")
    assert (("app", fallback_tag(manifest)) in fake.manifests) == (not fake.referrers_api)
    found = await find_profile(client, REF, manifest)
    assert found == raw
    assert decode_profile(found, manifest=str(manifest)).files() == ["bin/app"]


async def test_the_newest_push_wins_in_whatever_order_the_registry_lists(registry) -> None:
    fake, client = registry
    manifest = _image(fake)
    for k in range(6):  # the fake lists referrers by digest, as distribution does
        await push_profile(client, REF, _profile(manifest, f"push-{k}"))
        found = await find_profile(client, REF, manifest)
        assert found is not None
        assert decode_profile(found).files() == [f"push-{k}"]


async def test_the_fallback_index_keeps_one_profile_and_other_referrers() -> None:
    fake = FakeRegistry(referrers_api=False)
    client = RegistryClient(hosts_dir=None, docker_config=Path("/nonexistent/none.json"),
                            retry=FAST_RETRY, transport=fake.transport())
    try:
        manifest = _image(fake)
        signature = {"mediaType": OCI_MANIFEST, "digest": str(Digest.of(b"sig")), "size": 3,
                     "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json"}
        fake.add_manifest("app", fallback_tag(manifest),
                          {"schemaVersion": 2, "manifests": [signature]}, OCI_INDEX)
        for k in range(3):
            await push_profile(client, REF, _profile(manifest, f"push-{k}"))
        raw, _ = fake.manifests[("app", fallback_tag(manifest))]
        entries = json.loads(raw)["manifests"]
        assert entries[0] == signature
        assert [e["artifactType"] for e in entries[1:]] == [PROFILE_MEDIA_TYPE]
        assert CREATED in entries[1]["annotations"]
        found = await find_profile(client, REF, manifest)
        assert found is not None and decode_profile(found).files() == ["push-2"]
    finally:
        await client.aclose()


def test_an_artifact_without_a_usable_date_ranks_below_dated_ones() -> None:
    dated = {"digest": "a", "annotations": {CREATED: "2026-01-01T00:00:00Z"}}
    later_listed = [{"digest": "b"}, {"digest": "c", "annotations": {CREATED: "yesterday"}}]
    assert _newest([dated, *later_listed])["digest"] == "a"
    assert _newest(later_listed)["digest"] == "c"  # none dated: the last listed
    newer = {"digest": "d", "annotations": {CREATED: "2026-01-01T01:00:00+02:00"}}
    assert _newest([dated, newer])["digest"] == "a"  # 23:00 the day before, in UTC


async def test_an_artifact_about_another_subject_is_refused(tmp_path: Path) -> None:
    fake = FakeRegistry()
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())
    try:
        manifest = _image(fake)
        blob = fake.add_blob(_profile(manifest))
        other = str(Digest.of(b"other"))
        artifact = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "artifactType": PROFILE_MEDIA_TYPE,
                    "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                               "digest": fake.add_blob(b"{}"), "size": 2},
                    "layers": [{"mediaType": PROFILE_MEDIA_TYPE, "digest": blob, "size": 10}],
                    "subject": {"mediaType": OCI_MANIFEST, "digest": other, "size": 1}}
        digest = fake.add_manifest("app", None, artifact, OCI_MANIFEST)
        index = {"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": 1,
             "artifactType": PROFILE_MEDIA_TYPE}]}
        fake.add_manifest("app", fallback_tag(manifest), index,
                          "application/vnd.oci.image.index.v1+json")
        with pytest.raises(InvalidProfile, match="subject"):
            await find_profile(client, REF, manifest)
        assert json.loads(fake.manifests[("app", digest)][0])["subject"]["digest"] == other
    finally:
        await client.aclose()


def _lookups(fake: FakeRegistry) -> list[str]:
    """What a lookup asked for, in order: referrers / tag / artifact / blob."""
    kinds = []
    for seen in fake.requests_to("registry.test", "GET"):
        path = seen.url.path
        if "/referrers/" in path:
            kinds.append("referrers")
        elif "/blobs/" in path:
            kinds.append("blob")
        elif "/manifests/sha256:" in path:
            kinds.append("artifact")
        elif "/manifests/" in path:
            kinds.append("tag" if "/manifests/sha256-" in path else "manifest")
    return kinds


async def test_a_lookup_reads_the_inline_copies_instead_of_fetching_them(registry) -> None:
    fake, client = registry
    manifest = _image(fake)
    raw = _profile(manifest)
    digest, _ = await push_profile(client, REF, raw)
    artifact = json.loads(fake.manifests[("app", str(digest))][0])
    assert fake.has_blob("app", artifact["layers"][0]["digest"])  # stored for other readers
    fresh = RegistryClient(hosts_dir=None, docker_config=Path("/nonexistent"),
                           retry=FAST_RETRY, transport=fake.transport())  # fmt: skip
    try:
        fake.seen.clear()
        assert await find_profile(fresh, REF, manifest) == raw
        # Not knowing yet whether the registry has the referrers API, both are asked at
        # once; the API's index names the artifact only, the fallback index holds it.
        if fake.referrers_api:
            assert sorted(_lookups(fake)) == ["artifact", "referrers", "tag"]
        else:
            assert sorted(_lookups(fake)) == ["referrers", "tag"]
        fake.seen.clear()
        assert await find_profile(fresh, REF, manifest) == raw
        assert _lookups(fake) == (["referrers", "artifact"] if fake.referrers_api else ["tag"])
    finally:
        await fresh.aclose()


@pytest.mark.allow_log_errors
async def test_a_wrong_inline_copy_is_ignored_and_the_content_fetched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRegistry(referrers_api=False)
    client = RegistryClient(hosts_dir=None, docker_config=tmp_path / "none.json",
                            retry=FAST_RETRY, transport=fake.transport())  # fmt: skip
    try:
        manifest = _image(fake)
        raw = _profile(manifest)
        await push_profile(client, REF, raw)
        index_raw, media_type = fake.manifests[("app", fallback_tag(manifest))]
        index = json.loads(index_raw)
        index["manifests"][-1]["data"] = "e30="  # "{}": not the artifact the entry names
        fake.manifests[("app", fallback_tag(manifest))] = (json.dumps(index).encode(), media_type)
        fake.seen.clear()
        assert await find_profile(client, REF, manifest) == raw
        assert _lookups(fake) == ["tag", "artifact"]  # the artifact's own copy of the blob
        assert "inline copy ignored, fetching it" in caplog.text
    finally:
        await client.aclose()


async def test_a_large_profile_is_referenced_not_inline(registry, monkeypatch) -> None:
    fake, client = registry
    monkeypatch.setattr("snapshotter.remote.profile_oci.INLINE_BYTES", 64)
    manifest = _image(fake)
    raw = _profile(manifest)
    assert len(raw) > 64
    digest, _ = await push_profile(client, REF, raw)
    assert "data" not in json.loads(fake.manifests[("app", str(digest))][0])["layers"][0]
    fake.seen.clear()
    assert await find_profile(client, REF, manifest) == raw
    assert _lookups(fake)[-2:] == ["artifact", "blob"]
