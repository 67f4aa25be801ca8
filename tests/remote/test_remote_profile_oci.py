"""Profiles stored in a registry: referrers API and the `sha256-<hex>` tag fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.digest import Digest
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import OCI_MANIFEST
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
from snapshotter.remote.profile_oci import fallback_tag, find_profile, push_profile
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


async def test_the_newest_of_two_pushes_wins(registry) -> None:
    fake, client = registry
    manifest = _image(fake)
    await push_profile(client, REF, _profile(manifest, "old"))
    await push_profile(client, REF, _profile(manifest, "new"))
    found = await find_profile(client, REF, manifest)
    assert found is not None
    assert decode_profile(found).files() == ["new"]


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
