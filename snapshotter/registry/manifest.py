"""Image manifests, OCI indexes and Docker manifest lists: parsing and platform choice.

Pure: bytes in, frozen values out. Fetching lives in `client.py`.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument
from snapshotter.registry.errors import ManifestInvalid, PlatformNotFound

__all__ = [
    "ACCEPT_MANIFESTS",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MAX_MANIFEST_BYTES",
    "Descriptor",
    "Index",
    "Manifest",
    "Platform",
    "host_platform",
    "parse_manifest_or_index",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
ACCEPT_MANIFESTS = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
# distribution refuses manifests over 4 MiB; a larger answer is not a manifest.
MAX_MANIFEST_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {text!r}, want os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "").normalized()

    def normalized(self) -> Platform:
        arch, variant = self.architecture, self.variant
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}.get(
            arch, arch
        )
        if arch == "arm64" and variant == "v8":
            variant = ""  # arm64 implies v8; indexes write it either way
        return Platform(self.os, arch, variant)

    def matches(self, other: Platform) -> bool:
        a, b = self.normalized(), other.normalized()
        if (a.os, a.architecture) != (b.os, b.architecture):
            return False
        return not a.variant or not b.variant or a.variant == b.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    """linux/<arch of this machine>, as containerd's default platform matcher."""
    machine = _platform.machine().lower()
    variant = ""
    if machine.startswith("armv7"):
        machine, variant = "arm", "v7"
    elif machine.startswith("armv6"):
        machine, variant = "arm", "v6"
    return Platform("linux", machine, variant).normalized()


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest; `raw` are the exact bytes `digest` was computed over."""

    digest: Digest
    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Index:
    """An OCI index or Docker manifest list."""

    digest: Digest
    media_type: str
    raw: bytes
    manifests: tuple[Descriptor, ...]

    def select(self, wanted: Platform) -> Descriptor:
        """The first entry for `wanted`, preferring an exact variant, as containerd does."""
        candidates = [d for d in self.manifests if d.platform and d.platform.matches(wanted)]
        exact = [d for d in candidates if d.platform and d.platform.normalized() == wanted]
        chosen = (exact or candidates)[:1]
        if not chosen:
            have = ", ".join(sorted({str(d.platform) for d in self.manifests if d.platform}))
            raise PlatformNotFound(
                f"index {self.digest}: no manifest for platform {wanted} (has: {have or 'none'})"
            )
        return chosen[0]


def parse_manifest_or_index(raw: bytes, digest: Digest, content_type: str) -> Manifest | Index:
    what = f"manifest {digest}"
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ManifestInvalid(f"{what}: not JSON") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid(f"{what}: not a JSON object")
    media_type = doc.get("mediaType") or content_type.partition(";")[0].strip()
    if media_type not in MANIFEST_TYPES | INDEX_TYPES:
        # OCI allows omitting mediaType; the shape then decides.
        if "manifests" in doc:
            media_type = OCI_INDEX
        elif "layers" in doc and "config" in doc:
            media_type = OCI_MANIFEST
        else:
            raise ManifestInvalid(f"{what}: unsupported media type {media_type!r}")
    try:
        if media_type in INDEX_TYPES:
            entries = tuple(_descriptor(d) for d in _list(doc, "manifests"))
            return Index(digest, media_type, raw, entries)
        return Manifest(
            digest,
            media_type,
            raw,
            config=_descriptor(doc["config"]),
            layers=tuple(_descriptor(d) for d in _list(doc, "layers")),
            annotations=_annotations(doc),
        )
    except (KeyError, TypeError, ValueError, InvalidArgument) as exc:
        raise ManifestInvalid(f"{what}: malformed {media_type}: {exc}") from None


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a list")
    return value


def _annotations(doc: Mapping[str, Any]) -> dict[str, str]:
    value = doc.get("annotations") or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("annotations must map strings to strings")
    return dict(value)


def _descriptor(doc: Any) -> Descriptor:
    if not isinstance(doc, dict):
        raise ValueError("descriptor must be an object")
    size = doc["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"invalid size {size!r}")
    media_type = doc.get("mediaType", "")
    if not isinstance(media_type, str):
        raise ValueError("mediaType must be a string")
    plat = doc.get("platform")
    platform = None
    if isinstance(plat, dict):
        platform = Platform(
            str(plat.get("os", "")), str(plat.get("architecture", "")), str(plat.get("variant", ""))
        )
    urls = doc.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ValueError("urls must be a list of strings")
    return Descriptor(
        media_type=media_type,
        digest=Digest.parse(str(doc["digest"])),
        size=size,
        annotations=_annotations(doc),
        urls=tuple(urls),
        platform=platform,
    )
