"""RegistryClient against a real docker-registry: plain HTTP, htpasswd, token auth."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from snapshotter.digest import Digest
from snapshotter.registry import push
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.credentials import Credential, StaticCredentials
from snapshotter.registry.errors import (
    BlobNotFound,
    ManifestNotFound,
    RegistryUnavailable,
    Unauthorized,
)
from snapshotter.registry.reference import Reference
from snapshotter.registry.retry import RetryPolicy
from tests.registry.fixtures import RegistryServer, run_registry

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
FAST = RetryPolicy(max_attempts=2, base_delay=0.05, max_delay=0.1, total_time=10.0)


def client_for(tmp_path: Path, **kwargs: object) -> RegistryClient:
    kwargs.setdefault("hosts_dir", tmp_path / "certs.d")
    kwargs.setdefault("docker_config", tmp_path / "no-config.json")
    kwargs.setdefault("timeout", 10.0)
    kwargs.setdefault("retry", FAST)
    return RegistryClient(**kwargs)  # type: ignore[arg-type]


async def push_image(
    client: RegistryClient, ref: Reference, layers: list[bytes], arch: str = "amd64"
) -> tuple[Digest, bytes]:
    config = json.dumps({"architecture": arch, "os": "linux", "rootfs": {}}).encode()
    await client.push_blob(ref, config, Digest.of(config))
    for layer in layers:
        await client.push_blob(ref, layer, Digest.of(layer))
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(Digest.of(config)),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": str(Digest.of(layer)),
                "size": len(layer),
            }
            for layer in layers
        ],
    }
    raw = json.dumps(doc).encode()
    return await client.put_manifest(ref, raw, OCI_MANIFEST), raw


async def test_push_pull_and_ranges(
    plain_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(tmp_path)
    ref = Reference.parse(f"{plain_registry.host}/lazysnap/app:v1")
    layer = os.urandom(300_000)
    monkeypatch.setattr(push, "CHUNK_SIZE", 64 << 10)  # the layer goes up in PATCH chunks
    try:
        digest, raw = await push_image(client, ref, [layer, b"small layer"])
        manifest = await client.get_manifest(ref, platform="linux/amd64")
        assert manifest.digest == digest and manifest.raw == raw
        d = manifest.layers[0].digest
        assert await client.blob_size(ref, d) == len(layer)
        assert await client.read_blob_range(ref, d, 0, 1) == layer[:1]
        assert await client.read_blob_range(ref, d, 1000, 70_000) == layer[1000:70_000]
        tail = await client.read_blob_range(ref, d, len(layer) - 51, len(layer))
        assert tail == layer[-51:]
        assert await client.read_blob_range(ref, d, 0, len(layer)) == layer
        assert await client.get_blob(ref, d) == layer
        # loopback without hosts.toml: HTTPS was tried, then plain HTTP kept
        [ep] = client.failover.endpoints(plain_registry.host)
        assert ep.scheme == "http"
        with pytest.raises(ManifestNotFound):
            await client.get_manifest(Reference.parse(f"{plain_registry.host}/lazysnap/app:nope"))
        with pytest.raises(BlobNotFound):
            await client.read_blob_range(ref, Digest.of(b"absent"), 0, 1)
        other = Reference.parse(f"{plain_registry.host}/lazysnap/other:v1")
        await client.push_blob(other, layer, d, mount_from="lazysnap/app")
        assert await client.read_blob_range(other, d, 5, 10) == layer[5:10]
    finally:
        await client.aclose()


async def test_index_platform_selection(plain_registry: RegistryServer, tmp_path: Path) -> None:
    client = client_for(tmp_path)
    base = f"{plain_registry.host}/lazysnap/multi"
    try:
        entries, digests = [], {}
        for arch in ("amd64", "arm64"):
            ref = Reference.parse(f"{base}:{arch}")
            digest, raw = await push_image(client, ref, [arch.encode() * 10], arch=arch)
            digests[arch] = digest
            entries.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": str(digest),
                    "size": len(raw),
                    "platform": {"os": "linux", "architecture": arch},
                }
            )
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        await client.put_manifest(Reference.parse(f"{base}:latest"), index.encode(), OCI_INDEX)
        ref = Reference.parse(f"{base}:latest")
        for arch in ("amd64", "arm64"):
            m = await client.get_manifest(ref, platform=f"linux/{arch}")
            assert m.digest == digests[arch]
    finally:
        await client.aclose()


async def test_htpasswd_basic_auth(htpasswd_registry: RegistryServer, tmp_path: Path) -> None:
    ref = Reference.parse(f"{htpasswd_registry.host}/lazysnap/app:v1")
    anonymous = client_for(tmp_path)
    wrong = client_for(
        tmp_path,
        extra_credentials=StaticCredentials(
            {htpasswd_registry.host: Credential(htpasswd_registry.username, "wrong")}
        ),
    )
    config = htpasswd_registry.docker_config(tmp_path / "docker" / "config.json")
    good = client_for(tmp_path, docker_config=config)
    try:
        with pytest.raises(Unauthorized):
            await anonymous.get_manifest(ref)
        with pytest.raises(Unauthorized):
            await wrong.get_manifest(ref)
        digest, _ = await push_image(good, ref, [b"layer via basic auth"])
        manifest = await good.get_manifest(ref)
        assert manifest.digest == digest
        d = manifest.layers[0].digest
        assert await good.read_blob_range(ref, d, 6, 9) == b"via"
    finally:
        for c in (anonymous, wrong, good):
            await c.aclose()


async def test_token_auth(token_registry: RegistryServer, tmp_path: Path) -> None:
    server = token_registry.token_server
    assert server is not None
    ref = Reference.parse(f"{token_registry.host}/lazysnap/app:v1")
    anonymous = client_for(tmp_path)
    user = client_for(tmp_path, extra_credentials=token_registry.credentials())
    refresh = server.new_refresh_token(token_registry.username)
    by_token = client_for(
        tmp_path,
        extra_credentials=StaticCredentials(
            {token_registry.host: Credential(identity_token=refresh)}
        ),
    )
    try:
        with pytest.raises(Unauthorized):
            await anonymous.get_manifest(ref)
        digest, _ = await push_image(user, ref, [b"layer via token auth"])
        before = len(server.issued)
        manifest = await user.get_manifest(ref)
        d = manifest.layers[0].digest
        for i in range(5):
            assert await user.read_blob_range(ref, d, i, i + 1) == b"layer"[i : i + 1]
        assert len(server.issued) - before <= 1  # one pull token, then cached
        assert manifest.digest == digest
        assert (await by_token.get_manifest(ref)).digest == digest
        assert server.issued[-1]["user"] == token_registry.username
        # anonymous pull allowed, push still refused
        server.anonymous_pull = True
        assert (await anonymous.get_manifest(ref)).digest == digest
        with pytest.raises(Unauthorized):
            await anonymous.push_blob(ref, b"nope", Digest.of(b"nope"))
    finally:
        for c in (anonymous, user, by_token):
            await c.aclose()


async def test_registry_going_away_fails_fast_and_recovers(tmp_path: Path) -> None:
    workdir = tmp_path / "reg"
    with run_registry(workdir) as server:
        client = client_for(tmp_path, timeout=3.0)
        ref = Reference.parse(f"{server.host}/lazysnap/app:v1")
        data = b"persisted blob"
        await client.push_blob(ref, data, Digest.of(data))
    try:
        # the registry is gone: a bounded failure, not a hang
        with trio.fail_after(15), pytest.raises(RegistryUnavailable):
            await client.read_blob_range(ref, Digest.of(data), 0, 4)
        port = int(server.host.rpartition(":")[2])
        with run_registry(workdir, port=port):
            assert await client.read_blob_range(ref, Digest.of(data), 0, 4) == data[:4]
    finally:
        await client.aclose()


async def test_tls_with_hosts_toml_ca_and_client_cert(
    tls_registry: RegistryServer, tmp_path: Path
) -> None:
    hosts_dir = tmp_path / "certs.d"
    ref = Reference.parse(f"{tls_registry.host}/lazysnap/app:v1")
    # No hosts.toml: HTTPS against an unknown CA fails; no silent downgrade to HTTP.
    bare = client_for(tmp_path, hosts_dir=tmp_path / "empty")
    try:
        with pytest.raises(RegistryUnavailable):
            await bare.get_manifest(ref)
        [ep] = bare.failover.endpoints(tls_registry.host)
        assert ep.scheme == "https"
    finally:
        await bare.aclose()
    # The CA but no client certificate: the server refuses the handshake.
    tls_registry.hosts_toml(hosts_dir, client=False)
    no_cert = client_for(tmp_path, hosts_dir=hosts_dir)
    try:
        with pytest.raises(RegistryUnavailable):
            await no_cert.get_manifest(ref)
    finally:
        await no_cert.aclose()
    tls_registry.hosts_toml(hosts_dir)
    good = client_for(tmp_path, hosts_dir=hosts_dir)
    try:
        digest, _ = await push_image(good, ref, [b"layer over mutual TLS"])
        manifest = await good.get_manifest(ref)
        assert manifest.digest == digest
        assert await good.read_blob_range(ref, manifest.layers[0].digest, 6, 10) == b"over"
    finally:
        await good.aclose()
    # skip_verify instead of the CA
    path = tls_registry.hosts_toml(hosts_dir, ca=False)
    path.write_text(path.read_text() + "skip_verify = true\n")
    insecure = client_for(tmp_path, hosts_dir=hosts_dir)
    try:
        assert (await insecure.get_manifest(ref)).digest == digest
    finally:
        await insecure.aclose()
