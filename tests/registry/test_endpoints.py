"""Which endpoint gets which request: hosts.toml capabilities, headers, Docker Hub defaults."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import httpx

from snapshotter.digest import Digest
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from tests.registry.fakeregistry import FakeRegistry
from tests.registry.images import OCI_MANIFEST, manifest_doc

MakeClient = Callable[..., RegistryClient]
DATA = b"endpoint test blob" * 10


def hosts_toml(hosts_dir: Path, host: str, text: str) -> Path:
    (hosts_dir / host).mkdir(parents=True, exist_ok=True)
    (hosts_dir / host / "hosts.toml").write_text(text)
    return hosts_dir


async def test_capabilities_route_requests(
    fake: FakeRegistry, make_client: MakeClient, tmp_path: Path
) -> None:
    hosts = hosts_toml(
        tmp_path,
        "registry.test",
        'server = "https://registry.test"\n'
        '[host."https://pull-only.test"]\n  capabilities = ["pull"]\n'
        '  [host."https://pull-only.test".header]\n    x-mirror-key = "abc"\n',
    )
    fake.add_manifest("app", "v1", manifest_doc(fake, [b"x"]), OCI_MANIFEST)
    client = make_client(hosts_dir=hosts)
    ref = Reference.parse("registry.test/app:v1")
    manifest = await client.get_manifest(ref)  # by tag: "resolve", the mirror may not
    assert [s.url.host for s in fake.seen] == ["registry.test"]
    fake.seen.clear()
    await client.get_manifest(ref.with_digest(manifest.digest))  # by digest: "pull"
    await client.read_blob_range(ref, manifest.layers[0].digest, 0, 1)
    assert {s.url.host for s in fake.seen} == {"pull-only.test"}
    assert all(s.headers["x-mirror-key"] == "abc" for s in fake.seen)
    fake.seen.clear()
    await client.push_blob(ref, DATA, Digest.of(DATA))  # "push": the server only
    assert {s.url.host for s in fake.seen} == {"registry.test"}


async def test_docker_hub_defaults_and_credentials(
    fake: FakeRegistry, make_client: MakeClient, tmp_path: Path
) -> None:
    fake.auth, fake.users = "basic", {"hubuser": "hubpass"}
    config = tmp_path / "docker.json"
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    config.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}}))
    fake.add_manifest("library/alpine", "latest", manifest_doc(fake, [b"x"]), OCI_MANIFEST)
    client = make_client(docker_config=config)
    await client.get_manifest(Reference.parse("alpine"))
    assert fake.seen[-1].url == httpx.URL(
        "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
    )
    assert fake.seen[-1].headers["authorization"] == f"Basic {auth}"


async def test_manifest_redirect_and_size_without_content_length(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    digest = fake.add_manifest("app", "v1", manifest_doc(fake, [b"x"]), OCI_MANIFEST)
    fake.script("/v2/app/manifests/v1", [(307, {"Location": f"/v2/app/manifests/{digest}"})])
    client = make_client()
    ref = Reference.parse("registry.test/app:v1")
    assert str((await client.get_manifest(ref)).digest) == digest
    blob = Digest.parse(fake.add_blob(DATA))
    fake.script(f"/v2/app/blobs/{blob}", [(200, {})])  # a HEAD without Content-Length
    assert await client.blob_size(ref, blob) == len(DATA)
    assert [s.headers.get("range") for s in fake.seen[-2:]] == [None, "bytes=0-0"]
