"""Small images for tests: blobs, a manifest, and an index over platforms."""

from __future__ import annotations

import json

from tests.registry.fakeregistry import FakeRegistry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def manifest_doc(fake: FakeRegistry, layers: list[bytes], note: str = "") -> dict:
    config = json.dumps({"architecture": "amd64", "os": "linux", "note": note}).encode()
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": fake.add_blob(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": LAYER,
                "digest": fake.add_blob(data),
                "size": len(data),
                "annotations": {"containerd.io/snapshot/stargz/toc.digest": f"toc-{i}"},
            }
            for i, data in enumerate(layers)
        ],
    }


def add_multiarch(fake: FakeRegistry, repo: str, tag: str, platforms: list[str]) -> dict[str, str]:
    """An index with one manifest per "os/arch[/variant]"; returns platform -> digest."""
    digests, entries = {}, []
    for plat in platforms:
        doc = manifest_doc(fake, [plat.encode() * 100], note=plat)
        digest = fake.add_manifest(repo, None, doc, OCI_MANIFEST)
        raw, _ = fake.manifests[(repo, digest)]
        os_, arch, *variant = plat.split("/")
        platform = {"os": os_, "architecture": arch}
        if variant:
            platform["variant"] = variant[0]
        entries.append(
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(raw), "platform": platform}
        )
        digests[plat] = digest
    fake.add_manifest(
        repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX
    )
    return digests
