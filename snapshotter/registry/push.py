"""Uploads (blobs and manifests) for `lazysnap convert` and the test image builder.

Speaks through `RegistryClient.exchange`, so errors are translated there. A blob upload
is retried as a whole (a new upload session each time): the blob is content-addressed,
so repeating it is safe even though its POST/PATCH requests are not idempotent.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import trio

from snapshotter.digest import Digest
from snapshotter.registry.auth import repository_scope
from snapshotter.registry.errors import (
    BlobNotFound,
    InvalidReference,
    ManifestNotFound,
    RegistryRejected,
)
from snapshotter.registry.hosts import Endpoint
from snapshotter.registry.reference import Reference

if TYPE_CHECKING:
    from snapshotter.registry.client import RegistryClient

__all__ = ["CHUNK_SIZE", "push_blob", "put_manifest"]

# Blobs up to this size go in one PUT; larger ones in PATCH chunks of this size.
CHUNK_SIZE = 16 << 20
_OCTETS = {"Content-Type": "application/octet-stream"}


async def push_blob(
    client: RegistryClient,
    ref: Reference,
    data: bytes | Path,
    digest: Digest,
    *,
    mount_from: str | None = None,
    chunk_size: int | None = None,
) -> None:
    chunk_size = chunk_size or CHUNK_SIZE
    what = f"upload of blob {digest} to {ref.host}/{ref.repository}"
    if isinstance(data, bytes):
        digest.check(data, what)
        size = len(data)
    else:
        size = (await trio.Path(data).stat()).st_size

    async def op(ep: Endpoint) -> None:
        blob_url = client.session.blob_url(ep, ref, digest)
        try:
            await client.session.exchange(ep, ref, "HEAD", blob_url, what, BlobNotFound, push=True)
            return  # already there
        except BlobNotFound:
            pass
        upload_url = client.session.blob_upload_url(ep, ref)
        extra: tuple[str, ...] = ()
        if mount_from is not None and mount_from != ref.repository:
            upload_url = str(
                httpx.URL(upload_url).copy_merge_params({"mount": str(digest), "from": mount_from})
            )
            extra = (repository_scope(mount_from),)
        started = await client.session.exchange(
            ep,
            ref,
            "POST",
            upload_url,
            what,
            BlobNotFound,
            push=True,
            extra_scopes=extra,
            ok=(201, 202),
        )
        if started.status_code == 201:
            return  # mounted from the other repository
        location = _location(started, upload_url, what)
        if size <= chunk_size:
            body = data if isinstance(data, bytes) else await trio.Path(data).read_bytes()
            final = httpx.URL(location).copy_merge_params({"digest": str(digest)})
            await client.session.exchange(
                ep,
                ref,
                "PUT",
                str(final),
                what,
                BlobNotFound,
                headers=_OCTETS,
                content=body,
                push=True,
                ok=(201, 204),
            )
            return
        offset = 0
        async with _chunks(data, chunk_size) as chunks:
            async for chunk in chunks:
                headers = {**_OCTETS, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
                patched = await client.session.exchange(
                    ep,
                    ref,
                    "PATCH",
                    location,
                    what,
                    BlobNotFound,
                    headers=headers,
                    content=chunk,
                    push=True,
                    ok=(202, 204),
                )
                location = _location(patched, location, what)
                offset += len(chunk)
        final = httpx.URL(location).copy_merge_params({"digest": str(digest)})
        await client.session.exchange(
            ep, ref, "PUT", str(final), what, BlobNotFound, push=True, ok=(201, 204)
        )

    await client.failover.run(ref.host, "push", what, op, bounded=False)


async def put_manifest(
    client: RegistryClient, ref: Reference, raw: bytes, media_type: str
) -> Digest:
    digest = Digest.of(raw)
    if ref.digest is not None and ref.digest != digest:
        raise InvalidReference(f"manifest for {ref}: its digest is {digest}")
    obj = ref.tag if ref.tag is not None else str(digest)
    what = f"upload of manifest {ref.host}/{ref.repository}:{obj}"

    async def op(ep: Endpoint) -> None:
        response = await client.session.exchange(
            ep,
            ref,
            "PUT",
            client.session.manifest_url(ep, ref, obj),
            what,
            ManifestNotFound,
            headers={"Content-Type": media_type},
            content=raw,
            push=True,
            ok=(200, 201, 204),
        )
        said = response.headers.get("docker-content-digest")
        if said and said != str(digest):
            raise RegistryRejected(f"{what}: registry computed digest {said}, we have {digest}")

    await client.failover.run(ref.host, "push", what, op)
    return digest


def _location(response: httpx.Response, base: str, what: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise RegistryRejected(f"{what}: upload response without Location")
    return str(httpx.URL(base).join(location))


class _chunks:
    """Async iterator over fixed-size pieces of bytes or a file."""

    def __init__(self, data: bytes | Path, size: int) -> None:
        self._data, self._size = data, size
        self._file: trio.abc.AsyncResource | None = None

    async def __aenter__(self) -> _chunks:
        if isinstance(self._data, Path):
            self._file = await trio.open_file(self._data, "rb")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._file is not None:
            await self._file.aclose()

    def __aiter__(self) -> _chunks:
        self._offset = 0
        return self

    async def __anext__(self) -> bytes:
        if isinstance(self._data, bytes):
            chunk = self._data[self._offset : self._offset + self._size]
        else:
            chunk = await self._file.read(self._size)  # type: ignore[union-attr]
        if not chunk:
            raise StopAsyncIteration
        self._offset += len(chunk)
        return chunk
