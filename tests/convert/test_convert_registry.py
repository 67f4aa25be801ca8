"""Registry to registry through the real RegistryClient on the in-memory fake: push order
(tag last, nothing tagged on failure), blobs already there, cross-repository mounts,
chunked uploads, and an index whose children go up by digest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.errors import NotFound
from snapshotter.format.build import InvalidLayerTar
from tests.convert.conftest import Convert
from tests.convert.layouts import Built, image_docs, index_docs, read_layout
from tests.e2e.images import Entry, Layer, sample_image
from tests.registry.fakeregistry import FakeRegistry

HOST = "registry.test"


def _push(fake: FakeRegistry, repo: str, tag: str, built: Built) -> None:
    """Store every blob and document of `built` in the fake, the root under `tag`."""
    for digest, data in built.blobs.items():
        fake.blobs[digest] = data
        fake.links.add((repo, digest))
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        if isinstance(doc, dict) and ("layers" in doc or "manifests" in doc):
            fake.manifests[(repo, digest)] = (data, doc["mediaType"])
    raw, media_type = fake.manifests[(repo, built.root["digest"])]
    fake.manifests[(repo, tag)] = (raw, media_type)


def _manifest_puts(fake: FakeRegistry) -> list[str]:
    return [s.url.path.rpartition("/")[2] for s in fake.seen
            if s.method == "PUT" and "/manifests/" in s.url.path]


def _writes(fake: FakeRegistry) -> list[str]:
    return [f"{s.method} {s.url.path}" for s in fake.seen if s.method in ("POST", "PATCH", "PUT")]


async def test_registry_to_registry_tag_last(fake: FakeRegistry, convert: Convert) -> None:
    _push(fake, "app", "v1", image_docs(list(sample_image().layers)))

    summary = await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")

    writes = _writes(fake)
    assert writes[-1] == "PUT /v2/app/manifests/esgz"
    assert sum("/manifests/" in w for w in writes) == 1
    raw, media_type = fake.manifests[("app", "esgz")]
    manifest = json.loads(raw)
    assert media_type == "application/vnd.oci.image.manifest.v1+json"
    assert all(fake.has_blob("app", d["digest"]) for d in manifest["layers"])
    assert fake.has_blob("app", manifest["config"]["digest"])
    assert summary.uploaded == 3


async def test_second_conversion_uploads_nothing(fake: FakeRegistry, convert: Convert) -> None:
    _push(fake, "app", "v1", image_docs(list(sample_image().layers)))
    await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")
    fake.seen.clear()

    summary = await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")

    assert summary.uploaded == 0 and summary.present == 3
    assert _writes(fake) == ["PUT /v2/app/manifests/esgz"]


async def test_blobs_in_the_source_repository_are_mounted(
    fake: FakeRegistry, convert: Convert
) -> None:
    """Converting an eStargz image again gives the same layers, so they can be mounted."""
    _push(fake, "app", "v1", image_docs(list(sample_image().layers)))
    await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")
    fake.seen.clear()

    summary = await convert(f"{HOST}/app:esgz", f"{HOST}/other:esgz")

    mounts = [s for s in fake.seen if s.method == "POST" and s.url.params.get("from") == "app"]
    assert len(mounts) == 3  # two layers and the (identical) config
    assert not [s for s in fake.seen if s.method in ("PATCH",) or
                (s.method == "PUT" and "/blobs/" in s.url.path)]
    assert summary.uploaded == 3  # uploaded to `other`, by mount
    assert fake.manifests[("other", "esgz")][0] == fake.manifests[("app", "esgz")][0]


async def test_large_layers_are_uploaded_in_chunks(fake: FakeRegistry, convert: Convert) -> None:
    import random

    big = random.Random(5).randbytes(17 << 20)  # more than push.CHUNK_SIZE (16 MiB)
    _push(fake, "app", "v1", image_docs([Layer((Entry("big", data=big),))]))

    await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")

    assert len([s for s in fake.seen if s.method == "PATCH"]) == 2
    manifest = json.loads(fake.manifests[("app", "esgz")][0])
    assert fake.has_blob("app", manifest["layers"][0]["digest"])


async def test_index_children_by_digest_then_the_index_by_tag(
    fake: FakeRegistry, convert: Convert
) -> None:
    amd = image_docs([Layer((Entry("amd", data=b"amd64"),))], arch="amd64", flavor="docker")
    arm = image_docs([Layer((Entry("arm", data=b"arm64"),))], arch="arm64", flavor="docker")
    _push(fake, "multi", "v1", index_docs([amd, arm], flavor="docker"))

    await convert(f"{HOST}/multi:v1", f"{HOST}/multi:esgz")

    puts = _manifest_puts(fake)
    assert puts[-1] == "esgz" and all(p.startswith("sha256:") for p in puts[:-1])
    raw, media_type = fake.manifests[("multi", "esgz")]
    assert media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
    for child in json.loads(raw)["manifests"]:
        assert ("multi", child["digest"]) in fake.manifests


async def test_registry_to_layout_and_back(
    fake: FakeRegistry, convert: Convert, tmp_path: Path
) -> None:
    _push(fake, "app", "v1", image_docs(list(sample_image().layers)))

    await convert(f"{HOST}/app:v1", f"oci:{tmp_path}/out:esgz")
    await convert(f"oci:{tmp_path}/out:esgz", f"{HOST}/copy:esgz")

    manifest, _ = read_layout(tmp_path / "out", "esgz")
    assert json.loads(fake.manifests[("copy", "esgz")][0])["layers"] == manifest["layers"]


@pytest.mark.allow_log_errors
async def test_missing_blob_fails_before_any_manifest(
    fake: FakeRegistry, convert: Convert, scratch: Path
) -> None:
    built = image_docs(list(sample_image().layers))
    _push(fake, "app", "v1", built)
    layer = json.loads(built.blobs[built.root["digest"]])["layers"][1]["digest"]
    del fake.blobs[layer]

    with pytest.raises(NotFound, match=f"layer 2 \\({layer}\\) of {HOST}/app:v1"):
        await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")

    assert _manifest_puts(fake) == []
    assert list(scratch.iterdir()) == []


async def test_layer_that_is_no_tar_pushes_no_manifest(
    fake: FakeRegistry, convert: Convert
) -> None:
    built = image_docs([Layer((Entry("a", data=b"a" * 100_000),)), b"\x1f\x8bnot really gzip"])
    _push(fake, "app", "v1", built)

    with pytest.raises(InvalidLayerTar, match=r"layer 2 .*layer tar"):
        await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")

    assert _manifest_puts(fake) == []
    assert ("app", "esgz") not in fake.manifests


async def test_plain_http_hosts_send_everything_over_http(
    fake: FakeRegistry, tmp_path: Path, scratch: Path
) -> None:
    from snapshotter.convert import ConvertOptions, convert_image
    from snapshotter.convert.stores import plain_http_hosts, registry_hosts
    from snapshotter.registry.client import RegistryClient

    _push(fake, "app", "v1", image_docs([Layer((Entry("a", data=b"a"),))]))
    src, dst = f"{HOST}/app:v1", f"{HOST}/app:esgz"
    assert registry_hosts(src, dst, f"oci:{tmp_path}/x") == [HOST]
    hosts_dir = plain_http_hosts(tmp_path / "hosts", registry_hosts(src, dst))
    client = RegistryClient(hosts_dir=hosts_dir, docker_config=tmp_path / "none.json",
                            transport=fake.transport())
    try:
        await convert_image(src, dst, client=client, options=ConvertOptions(tmp_dir=scratch))
    finally:
        await client.aclose()

    assert {s.url.scheme for s in fake.seen} == {"http"}
    assert ("app", "esgz") in fake.manifests


@pytest.mark.parametrize("auth", ["basic", "bearer"])
async def test_credentials_from_the_docker_config_as_the_daemon_reads_them(
    fake: FakeRegistry, tmp_path: Path, scratch: Path, auth: str
) -> None:
    import base64

    from snapshotter.convert import ConvertOptions, convert_image
    from snapshotter.registry.client import RegistryClient

    fake.auth, fake.users = auth, {"alice": "secret"}
    _push(fake, "app", "v1", image_docs([Layer((Entry("a", data=b"a"),))]))
    config = tmp_path / "docker.json"
    token = base64.b64encode(b"alice:secret").decode()
    config.write_text(json.dumps({"auths": {HOST: {"auth": token}}}))
    client = RegistryClient(hosts_dir=None, docker_config=config, transport=fake.transport())
    try:
        await convert_image(f"{HOST}/app:v1", f"{HOST}/app:esgz", client=client,
                            options=ConvertOptions(tmp_dir=scratch))
    finally:
        await client.aclose()

    assert ("app", "esgz") in fake.manifests


async def test_missing_source_image(fake: FakeRegistry, convert: Convert) -> None:
    with pytest.raises(NotFound, match="app:nope"):
        await convert(f"{HOST}/app:nope", f"{HOST}/app:esgz")
    assert _writes(fake) == []


async def test_registry_serving_other_bytes_than_the_digest(
    fake: FakeRegistry, convert: Convert, scratch: Path
) -> None:
    from snapshotter.errors import DataLoss

    built = image_docs(list(sample_image().layers))
    _push(fake, "app", "v1", built)
    layer = json.loads(built.blobs[built.root["digest"]])["layers"][0]["digest"]
    fake.blobs[layer] = fake.blobs[layer][:-10] + b"0123456789"

    with pytest.raises(DataLoss, match=f"layer 1 \\({layer}\\).*digest mismatch"):
        await convert(f"{HOST}/app:v1", f"{HOST}/app:esgz")

    assert _manifest_puts(fake) == []
    assert list(scratch.iterdir()) == []


async def test_progress_on_a_terminal(fake: FakeRegistry, client, scratch: Path) -> None:  # type: ignore[no-untyped-def]
    import io

    from snapshotter.convert import ConvertOptions, RichProgress, convert_image

    _push(fake, "app", "v1", image_docs(list(sample_image().layers)))
    out = io.StringIO()
    progress = RichProgress(out)

    await convert_image(f"{HOST}/app:v1", f"{HOST}/app:esgz", client=client,
                        options=ConvertOptions(tmp_dir=scratch, compression_level=1),
                        progress=progress)

    text = out.getvalue()
    assert "layers 2/2" in text
    assert text.count("(pushed)") == 2
