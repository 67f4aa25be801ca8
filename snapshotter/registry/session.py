"""HTTP mechanics under `RegistryClient`: one httpx client per TLS setting, auth per
endpoint, redirects to blob storage (credentials stay with the registry), and the
remembered storage URLs.

Raises registry errors through the status table it is given by `client.py`; httpx
exceptions pass through to `Failover`, which translates them with that module's table.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

# httpx imports httpcore when its first client is made: ~0.1 s that would otherwise
# land in the daemon's first lazy Prepare.
import httpcore  # noqa: F401
import httpx

from snapshotter.digest import Digest
from snapshotter.errors import ClosedError, NotFound
from snapshotter.registry.auth import SCOPE_EXTENSION, RegistryAuth, repository_scope
from snapshotter.registry.credentials import CredentialSource
from snapshotter.registry.errors import BlobNotFound
from snapshotter.registry.hosts import Endpoint
from snapshotter.registry.redirects import RedirectCache
from snapshotter.registry.reference import DOCKER_HUB, Reference
from snapshotter.registry.tls import ssl_context

__all__ = ["Session"]

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_USER_AGENT = "lazysnap/0.1"
RaiseForStatus = Callable[[httpx.Response, Endpoint, str, type[NotFound]], Awaitable[None]]


class Session:
    """The HTTP layer of one RegistryClient; `aclose()` ends it and later calls raise."""

    def __init__(
        self,
        credentials: CredentialSource,
        timeout: float,
        transport: httpx.AsyncBaseTransport | None,
        raise_for_status: RaiseForStatus,
    ) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._transport = transport  # a test seam: httpx.MockTransport
        self._raise_for_status = raise_for_status
        self._clients: dict[tuple[object, ...], httpx.AsyncClient] = {}
        self._auths: dict[str, RegistryAuth] = {}
        self.redirects = RedirectCache()
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def blob_url(self, ep: Endpoint, ref: Reference, digest: Digest) -> str:
        return f"{ep.base_url}/{ref.repository}/blobs/{digest}"

    def blob_upload_url(self, ep: Endpoint, ref: Reference) -> str:
        return f"{ep.base_url}/{ref.repository}/blobs/uploads/"

    def manifest_url(self, ep: Endpoint, ref: Reference, obj: str) -> str:
        return f"{ep.base_url}/{ref.repository}/manifests/{obj}"

    async def exchange(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        what: str,
        not_found: type[NotFound],
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        push: bool = False,
        extra_scopes: tuple[str, ...] = (),
        ok: tuple[int, ...] = (200, 201, 202, 204, 206),
    ) -> httpx.Response:
        """One authorized request to the registry (not following redirects), body read."""
        response = await self._send(
            ep, ref, method, url, headers, content, push=push, extra_scopes=extra_scopes
        )
        try:
            if response.status_code not in ok:
                await self._raise_for_status(response, ep, what, not_found)
            await response.aread()
        finally:
            await response.aclose()
        return response

    # -- machinery -------------------------------------------------------------------

    def redirect_key(self, ep: Endpoint, ref: Reference, digest: Digest) -> tuple[str, str, str]:
        return (ep.netloc, ref.repository, str(digest))

    async def blob_request(
        self,
        ep: Endpoint,
        ref: Reference,
        digest: Digest,
        what: str,
        headers: dict[str, str],
        method: str = "GET",
    ) -> httpx.Response:
        """GET (or HEAD) a blob, following redirects to storage without our credentials.

        A GET goes to the remembered storage URL first while it works. Returns an open
        streaming response with status 200 or 206; the caller closes it.
        """
        key = self.redirect_key(ep, ref, digest)
        cached = self.redirects.get(key) if method == "GET" else None
        if cached is not None:
            try:
                response = await self._plain(method, cached, headers)
            except httpx.HTTPError as exc:
                log.debug("%s: cached redirect failed (%s); resolving again", what, type(exc))
            else:
                if response.status_code in (200, 206):
                    return response
                await response.aclose()
                log.debug("%s: cached redirect answered %d", what, response.status_code)
            self.redirects.drop(key)
        url = self.blob_url(ep, ref, digest)
        cache_key = key if method == "GET" else None
        return await self.following(ep, ref, method, url, headers, what, BlobNotFound, cache_key)

    async def following(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        headers: dict[str, str],
        what: str,
        not_found: type[NotFound],
        cache_key: tuple[str, str, str] | None = None,
    ) -> httpx.Response:
        """Send, following redirects; credentials go to the endpoint's origin only.

        Returns an open streaming 200/206 response; a storage URL that answered is
        remembered under `cache_key`.
        """
        response = await self._send(ep, ref, method, url, headers, None)
        hops = 0
        while response.is_redirect and hops < _MAX_REDIRECTS:
            await response.aclose()
            url = str(response.url.join(response.headers["location"]))
            hops += 1
            if _same_origin(url, ep):
                response = await self._send(ep, ref, method, url, headers, None)
            else:
                # Storage URLs carry their own signature; our credentials stay home.
                response = await self._plain(method, url, headers)
                if cache_key is not None and response.status_code in (200, 206):
                    self.redirects.put(cache_key, url)
        if response.status_code not in (200, 206):
            try:
                await self._raise_for_status(response, ep, what, not_found)
            finally:
                await response.aclose()
        return response

    async def _plain(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        client = self._client(None)
        request = client.build_request(method, url, headers=headers)
        return await client.send(request, stream=True, follow_redirects=True)

    async def _send(
        self,
        ep: Endpoint,
        ref: Reference,
        method: str,
        url: str,
        headers: dict[str, str] | None,
        content: bytes | None,
        *,
        push: bool = False,
        extra_scopes: tuple[str, ...] = (),
    ) -> httpx.Response:
        if self.closed:
            raise ClosedError("registry client is closed")
        client = self._client(ep)
        params = {"ns": ep.upstream} if ep.is_mirror else None
        request = client.build_request(
            method,
            url,
            headers=[*ep.headers, *(headers or {}).items()],
            content=content,
            params=params,
            extensions={
                SCOPE_EXTENSION: (repository_scope(ref.repository, push=push), *extra_scopes)
            },
        )
        log.debug("%s %s://%s%s", method, request.url.scheme, ep.netloc, request.url.path)
        return await client.send(request, auth=self._auth(ep), stream=True)

    def _auth(self, ep: Endpoint) -> RegistryAuth:
        auth = self._auths.get(ep.netloc)
        if auth is None:
            host = DOCKER_HUB if ep.upstream == DOCKER_HUB and not ep.is_mirror else ep.netloc
            auth = self._auths[ep.netloc] = RegistryAuth(host, self._credentials)
        return auth

    def _client(self, ep: Endpoint | None) -> httpx.AsyncClient:
        key: tuple[object, ...] = () if ep is None else (ep.skip_verify, ep.ca, ep.client_certs)
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                verify=ssl_context(ep) if self._transport is None else True,
                transport=self._transport,
                timeout=httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
                headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
                follow_redirects=False,
                trust_env=False,
            )
            self._clients[key] = client
        return client


def _same_origin(url: str, ep: Endpoint) -> bool:
    parsed = httpx.URL(url)
    return parsed.scheme == ep.scheme and parsed.netloc.decode() == ep.netloc
