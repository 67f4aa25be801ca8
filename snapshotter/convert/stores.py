"""Where images come from and go to: a registry (through `RegistryClient`) or an OCI layout.

`open_source` and `open_destination` parse SRC/DST: `oci:DIR[:tag]` is a layout directory,
anything else a registry reference. Sources verify every byte they hand out against its
descriptor; destinations write blobs before the manifests that name them, and only the
final `put_manifest(..., tagged=True)` makes the image visible under its name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from snapshotter.convert.errors import InvalidLocation, LayoutNotFound
from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, InvalidArgument, NotFound
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    Index,
    Manifest,
    parse_manifest_or_index,
)
from snapshotter.registry.reference import Reference

__all__ = [
    "REF_NAME",
    "ImageDestination",
    "ImageSource",
    "LayoutDestination",
    "LayoutSource",
    "RegistryDestination",
    "RegistrySource",
    "open_destination",
    "open_source",
    "plain_http_hosts",
    "registry_hosts",
]

REF_NAME = "org.opencontainers.image.ref.name"
_CONTAINERD_NAME = "io.containerd.image.name"
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_RANGE = 8 << 20  # bytes per ranged GET when downloading a layer
_MAX_CONFIG = 64 << 20

OnBytes = Callable[[int], None]


class ImageSource(Protocol):
    """Read side. `root()` is the manifest or index SRC names; `child()` one it lists.

    `fetch_layer` returns a local path holding exactly the blob `desc` names (verified),
    downloading into `dest` if it must; a layout returns its own file instead.
    """

    name: str
    registry_repo: tuple[str, str] | None  # (host, repository), for cross-repo mounts

    async def root(self) -> Manifest | Index: ...
    async def child(self, desc: Descriptor) -> Manifest | Index: ...
    async def blob(self, desc: Descriptor, what: str) -> bytes: ...
    async def fetch_layer(
        self, desc: Descriptor, dest: Path, what: str, on_bytes: OnBytes | None = None
    ) -> Path: ...


class ImageDestination(Protocol):
    """Write side. `push_blob` returns False when the blob was there already."""

    name: str

    async def push_blob(
        self, data: bytes | Path, digest: Digest, *, mount_from: tuple[str, str] | None = None
    ) -> bool: ...
    async def put_manifest(self, raw: bytes, media_type: str, *, tagged: bool) -> Digest: ...


def _layout_location(text: str) -> tuple[Path, str | None]:
    body = text[len("oci:") :]
    head, colon, tail = body.rpartition(":")
    if colon and head and _TAG.match(tail):
        return Path(head), tail
    if not body:
        raise InvalidLocation(f"{text!r}: want oci:DIR[:tag]")
    return Path(body), None


def open_source(text: str, client: RegistryClient) -> ImageSource:
    if text.startswith("oci:"):
        return LayoutSource(*_layout_location(text))
    return RegistrySource(client, Reference.parse(text))


def open_destination(text: str, client: RegistryClient) -> ImageDestination:
    if text.startswith("oci:"):
        return LayoutDestination(*_layout_location(text))
    ref = Reference.parse(text)
    if ref.digest is not None:
        raise InvalidLocation(f"destination {text!r}: name a tag, not a digest")
    return RegistryDestination(client, ref)


def registry_hosts(*locations: str) -> list[str]:
    """The registry hosts that SRC/DST texts name (layouts name none)."""
    return sorted({Reference.parse(t).host for t in locations if not t.startswith("oci:")})


def plain_http_hosts(hosts_dir: Path, hosts: list[str]) -> Path:
    """Write a hosts.toml per host that sends everything over plain HTTP (`--plain-http`)."""
    for host in hosts:
        (hosts_dir / host).mkdir(parents=True, exist_ok=True)
        (hosts_dir / host / "hosts.toml").write_text(f'server = "http://{host}"\n')
    return hosts_dir


# -- registry ------------------------------------------------------------------------


class RegistrySource:
    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client, self.ref = client, ref
        self.name = str(ref)
        self.registry_repo = (ref.host, ref.repository)

    async def root(self) -> Manifest | Index:
        return await self.client.get_manifest_raw(self.ref)

    async def child(self, desc: Descriptor) -> Manifest | Index:
        return await self.client.get_manifest_raw(self.ref.with_digest(desc.digest))

    async def blob(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > _MAX_CONFIG:
            raise InvalidArgument(f"{what}: {desc.size} bytes is too large for a config")
        return await self.client.get_blob(self.ref, desc.digest, max_size=_MAX_CONFIG)

    async def fetch_layer(
        self, desc: Descriptor, dest: Path, what: str, on_bytes: OnBytes | None = None
    ) -> Path:
        # Ranged GETs: each piece is retried on its own, and none is larger than _RANGE.
        verifier = desc.digest.verifier()
        async with await trio.open_file(dest, "wb") as f:
            for start in range(0, desc.size, _RANGE):
                end = min(start + _RANGE, desc.size)
                data = await self.client.read_blob_range(self.ref, desc.digest, start, end)
                verifier.update(data)
                await f.write(data)
                if on_bytes is not None:
                    on_bytes(len(data))
        verifier.verify(what)
        return dest


class RegistryDestination:
    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self.client, self.ref = client, ref
        self.name = str(ref)

    async def push_blob(
        self, data: bytes | Path, digest: Digest, *, mount_from: tuple[str, str] | None = None
    ) -> bool:
        try:
            await self.client.blob_size(self.ref, digest)
            return False
        except NotFound:
            pass
        repo = None
        if mount_from is not None and mount_from[0] == self.ref.host:
            repo = mount_from[1]
        await self.client.push_blob(self.ref, data, digest, mount_from=repo)
        return True

    async def put_manifest(self, raw: bytes, media_type: str, *, tagged: bool) -> Digest:
        ref = self.ref if tagged else Reference(self.ref.host, self.ref.repository, None,
                                                Digest.of(raw))
        return await self.client.put_manifest(ref, raw, media_type)


# -- OCI image layout ----------------------------------------------------------------


def _blob_path(root: Path, digest: Digest) -> Path:
    return root / "blobs" / digest.algorithm / digest.hex


def _hash_file(path: Path, digest: Digest, size: int, what: str) -> None:
    verifier = digest.verifier()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            verifier.update(piece)
    if verifier.size != size:
        raise DataLoss(f"{what}: {verifier.size} bytes, the descriptor says {size}")
    verifier.verify(what)


class LayoutSource:
    def __init__(self, root: Path, tag: str | None) -> None:
        self.dir, self.tag = root, tag
        self.name = f"oci:{root}" + (f":{tag}" if tag else "")
        self.registry_repo = None

    async def root(self) -> Manifest | Index:
        index_path = self.dir / "index.json"
        try:
            raw = await trio.Path(index_path).read_bytes()
        except FileNotFoundError:
            raise LayoutNotFound(f"{self.name}: no OCI layout (missing {index_path})") from None
        index = parse_manifest_or_index(raw, Digest.of(raw), "")
        if not isinstance(index, Index):
            raise LayoutNotFound(f"{self.name}: index.json is not an image index")
        if self.tag is None:
            if len(index.manifests) != 1:
                raise LayoutNotFound(
                    f"{self.name}: the layout holds {len(index.manifests)} images; "
                    "name one as oci:DIR:TAG"
                )
            return await self.child(index.manifests[0])
        for desc in index.manifests:
            names = (desc.annotations.get(REF_NAME), desc.annotations.get(_CONTAINERD_NAME, ""))
            if self.tag == names[0] or names[1].endswith(f":{self.tag}"):
                return await self.child(desc)
        raise LayoutNotFound(f"{self.name}: no image tagged {self.tag!r} in the layout")

    async def child(self, desc: Descriptor) -> Manifest | Index:
        what = f"manifest {desc.digest} in {self.name}"
        if desc.size > MAX_MANIFEST_BYTES:
            raise InvalidArgument(f"{what}: {desc.size} bytes is too large for a manifest")
        raw = await self._read(desc, what)
        return parse_manifest_or_index(raw, desc.digest, desc.media_type)

    async def blob(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > _MAX_CONFIG:
            raise InvalidArgument(f"{what}: {desc.size} bytes is too large for a config")
        return await self._read(desc, what)

    async def _read(self, desc: Descriptor, what: str) -> bytes:
        try:
            raw = await trio.Path(_blob_path(self.dir, desc.digest)).read_bytes()
        except FileNotFoundError:
            raise LayoutNotFound(f"{what}: blob missing from the layout") from None
        if len(raw) != desc.size:
            raise DataLoss(f"{what}: {len(raw)} bytes, the descriptor says {desc.size}")
        desc.digest.check(raw, what)
        return raw

    async def fetch_layer(
        self, desc: Descriptor, dest: Path, what: str, on_bytes: OnBytes | None = None
    ) -> Path:
        path = _blob_path(self.dir, desc.digest)
        if not path.is_file():
            raise LayoutNotFound(f"{what}: blob missing from the layout")
        await trio.to_thread.run_sync(_hash_file, path, desc.digest, desc.size, what)
        return path


class LayoutDestination:
    """Blobs go in `blobs/<alg>/<hex>` by atomic rename; `index.json` is rewritten last."""

    def __init__(self, root: Path, tag: str | None) -> None:
        self.dir, self.tag = root, tag
        self.name = f"oci:{root}" + (f":{tag}" if tag else "")

    async def push_blob(
        self, data: bytes | Path, digest: Digest, *, mount_from: tuple[str, str] | None = None
    ) -> bool:
        return await trio.to_thread.run_sync(self._write_blob, data, digest)

    def _write_blob(self, data: bytes | Path, digest: Digest) -> bool:
        path = _blob_path(self.dir, digest)
        if path.is_file():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                if isinstance(data, bytes):
                    out.write(data)
                else:
                    with open(data, "rb") as f:
                        while piece := f.read(1 << 20):
                            out.write(piece)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    async def put_manifest(self, raw: bytes, media_type: str, *, tagged: bool) -> Digest:
        digest = Digest.of(raw)
        await self.push_blob(raw, digest)
        if tagged:
            await trio.to_thread.run_sync(self._add_to_index, digest, len(raw), media_type)
        return digest

    def _add_to_index(self, digest: Digest, size: int, media_type: str) -> None:
        index_path = self.dir / "index.json"
        try:
            index = json.loads(index_path.read_bytes())
        except FileNotFoundError:
            index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                     "manifests": []}
        except ValueError as exc:
            raise InvalidArgument(f"{self.name}: existing index.json is not JSON: {exc}") from None
        desc: dict[str, object] = {"mediaType": media_type, "digest": str(digest), "size": size}
        manifests = index.setdefault("manifests", [])
        if self.tag is not None:
            desc["annotations"] = {REF_NAME: self.tag}
        # One entry per name (an untagged image's name is its digest), as a tag moves.
        manifests[:] = [
            m for m in manifests
            if (m.get("annotations") or {}).get(REF_NAME) != self.tag
            or (self.tag is None and m.get("digest") != str(digest))
        ]
        manifests.append(desc)
        (self.dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        tmp = index_path.with_name(f".index.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, index_path)
