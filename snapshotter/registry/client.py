"""The registry client: manifests, blob HEAD/GET/Range reads, pushes, over hosts.toml endpoints.

The one place where httpx exceptions and HTTP statuses become registry errors
(`_translate`, `_raise_for_status`). Runs under trio; every request is bounded in time.
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

import httpx

from snapshotter.digest import Digest
from snapshotter.errors import ClosedError, LazysnapError, NotFound
from snapshotter.registry import push
from snapshotter.registry.auth import SCOPE_EXTENSION, RegistryAuth, repository_scope
from snapshotter.registry.credentials import (
    ChainedCredentials,
    CredentialSource,
    DockerConfigCredentials,
)
from snapshotter.registry.errors import (
    BlobNotFound,
    ManifestInvalid,
    ManifestNotFound,
    RegistryRejected,
    RegistryUnavailable,
    ShortRead,
    Unauthorized,
)
from snapshotter.registry.failover import Failover
from snapshotter.registry.hosts import DEFAULT_HOSTS_DIR, Endpoint
from snapshotter.registry.manifest import (
    ACCEPT_MANIFESTS,
    MAX_MANIFEST_BYTES,
    Index,
    Manifest,
    Platform,
    host_platform,
)
from snapshotter.registry.redirects import REDACT_URLS, RedirectCache
from snapshotter.registry.reference import DOCKER_HUB, Reference
from snapshotter.registry.responses import range_body, read_capped, verified_manifest
from snapshotter.registry.retry import RetryPolicy, parse_retry_after
from snapshotter.registry.tls import ssl_context

__all__ = ["RegistryClient"]

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_MAX_ERROR_BODY = 64 << 10
_USER_AGENT = "lazysnap/0.1"


class RegistryClient:
    """Talks the OCI distribution API to registries, their mirrors and blob storage.

    Lifecycle: create once per daemon, share among tasks, `await aclose()` at the end;
    calls after that raise ClosedError. For each registry host the endpoints come from
    `hosts_dir` (containerd's certs.d convention) and are tried in order, each with
    bounded retries (`max_attempts`, backoff, Retry-After), failing over on NotFound,
    Unavailable and PermissionDenied; the last endpoint's error is raised. Every
    attempt ends within `timeout` seconds, except whole-blob transfers, whose every
    read is bounded instead. Example::

        client = RegistryClient(hosts_dir=None)
        ref = Reference.parse("127.0.0.1:5000/app:v1")
        manifest = await client.get_manifest(ref)
        head = await client.read_blob_range(ref, manifest.layers[0].digest, 0, 512)
    """

    def __init__(
        self,
        *,
        hosts_dir: Path | None = DEFAULT_HOSTS_DIR,
        docker_config: Path | None = None,
        timeout: float = 30.0,
        max_attempts: int = 4,
        extra_credentials: CredentialSource | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        sources: list[CredentialSource] = []
        if extra_credentials is not None:
            sources.append(extra_credentials)
        sources.append(DockerConfigCredentials(docker_config))
        self._credentials = ChainedCredentials(sources)
        self._timeout = timeout
        self._transport = transport  # a test seam: httpx.MockTransport
        retry = retry or RetryPolicy(max_attempts=max_attempts)
        self.failover = Failover(hosts_dir, retry, timeout, _translate)
        self._clients: dict[tuple[object, ...], httpx.AsyncClient] = {}
        self._auths: dict[str, RegistryAuth] = {}
        self.redirects = RedirectCache()
        logging.getLogger("httpx").addFilter(REDACT_URLS)  # a set: adding twice keeps one

    # -- public API ------------------------------------------------------------------

    async def get_manifest(self, ref: Reference, *, platform: str | None = None) -> Manifest:
        """The image manifest for `ref`, choosing from an index by `platform`."""
        wanted = Platform.parse(platform) if platform else host_platform()
        capability = "pull" if ref.digest is not None else "resolve"
        found = await self._fetch_manifest(ref, ref.object, capability, ref.digest, None)
        for _ in range(3):
            if isinstance(found, Manifest):
                return found
            chosen = found.select(wanted)
            found = await self._fetch_manifest(
                ref, str(chosen.digest), "pull", chosen.digest, chosen.size
            )
        raise ManifestInvalid(f"image {ref}: indexes nested too deeply")

    async def get_manifest_raw(self, ref: Reference) -> Manifest | Index:
        """The manifest or index `ref` names, without platform selection."""
        capability = "pull" if ref.digest is not None else "resolve"
        return await self._fetch_manifest(ref, ref.object, capability, ref.digest, None)

    async def blob_size(self, ref: Reference, digest: Digest) -> int:
        what = f"blob {digest} of {ref.host}/{ref.repository}"

        async def op(ep: Endpoint) -> int:
            response = await self._blob_request(ep, ref, digest, what, {}, method="HEAD")
            await response.aclose()
            length = response.headers.get("content-length")
            if length is not None and length.isdigit():
                return int(length)
            raise ShortRead(f"{what}: HEAD answered without Content-Length")

        return await self.failover.run(ref.host, "pull", what, op)

    async def read_blob_range(self, ref: Reference, digest: Digest, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob, exactly, or an error; never a partial answer."""
        what = f"blob {digest} of {ref.host}/{ref.repository} range [{start}, {end})"
        if not 0 <= start < end:
            raise RegistryRejected(f"{what}: empty or negative range")
        headers = {"Range": f"bytes={start}-{end - 1}"}

        async def op(ep: Endpoint) -> bytes:
            response = await self._blob_request(ep, ref, digest, what, headers)
            try:
                return await range_body(response, start, end, what)
            finally:
                await response.aclose()

        return await self.failover.run(ref.host, "pull", what, op)

    async def get_blob(self, ref: Reference, digest: Digest, *, max_size: int = 1 << 30) -> bytes:
        """A whole blob, verified against `digest` (DataLoss on mismatch)."""
        what = f"blob {digest} of {ref.host}/{ref.repository}"

        async def op(ep: Endpoint) -> bytes:
            response = await self._blob_request(ep, ref, digest, what, {})
            try:
                if response.status_code != 200:
                    raise RegistryRejected(f"{what}: unexpected HTTP {response.status_code}")
                data = await read_capped(response, max_size, what)
            finally:
                await response.aclose()
            digest.check(data, what)
            return data

        return await self.failover.run(ref.host, "pull", what, op, bounded=False)

    async def push_blob(
        self, ref: Reference, data: bytes | Path, digest: Digest, *, mount_from: str | None = None
    ) -> None:
        """Upload a blob unless present: cross-repo mount, monolithic PUT or chunked PATCH."""
        await push.push_blob(self, ref, data, digest, mount_from=mount_from)

    async def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> Digest:
        """Store a manifest under `ref`'s tag (or digest); returns its digest."""
        return await push.put_manifest(self, ref, raw, media_type)

    async def aclose(self) -> None:
        self.failover.closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # -- used by push.py -------------------------------------------------------------

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
                await _raise_for_status(response, ep, what, not_found)
            await response.aread()
        finally:
            await response.aclose()
        return response

    # -- machinery -------------------------------------------------------------------

    async def _fetch_manifest(
        self,
        ref: Reference,
        obj: str,
        capability: str,
        expected: Digest | None,
        size: int | None,
    ) -> Manifest | Index:
        what = (
            f"manifest {ref.host}/{ref.repository}:{obj}"
            if expected is None
            else (f"manifest {ref.host}/{ref.repository}@{expected}")
        )

        async def op(ep: Endpoint) -> Manifest | Index:
            url = self.manifest_url(ep, ref, obj)
            response = await self._send(ep, ref, "GET", url, {"Accept": ACCEPT_MANIFESTS}, None)
            try:
                if response.status_code != 200:
                    await _raise_for_status(response, ep, what, ManifestNotFound)
                raw = await read_capped(response, MAX_MANIFEST_BYTES, what)
            finally:
                await response.aclose()
            return verified_manifest(response, raw, expected, size, what)

        return await self.failover.run(ref.host, capability, what, op)

    async def _blob_request(
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
        key = (ep.netloc, ref.repository, str(digest))
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
                if method == "GET" and response.status_code in (200, 206):
                    self.redirects.put(key, url)
        if response.status_code not in (200, 206):
            try:
                await _raise_for_status(response, ep, what, BlobNotFound)
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
        if self.failover.closed:
            raise ClosedError("registry client is closed")
        client = self._client(ep)
        params = {"ns": ep.upstream} if ep.is_mirror else None
        request = client.build_request(
            method,
            url,
            headers={**dict(ep.headers), **(headers or {})},
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


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# httpx exception -> (registry error, what went wrong); the first matching row wins.
_HTTPX_ERRORS: tuple[tuple[type[httpx.HTTPError], type[LazysnapError], str], ...] = (
    (httpx.TimeoutException, RegistryUnavailable, "timed out"),
    (httpx.ConnectError, RegistryUnavailable, "cannot connect"),
    (httpx.RemoteProtocolError, RegistryUnavailable, "broke the HTTP protocol"),
    (httpx.NetworkError, RegistryUnavailable, "network error"),
    (httpx.TooManyRedirects, RegistryRejected, "too many redirects"),
    (httpx.UnsupportedProtocol, RegistryRejected, "unsupported URL scheme"),
    (httpx.HTTPError, RegistryUnavailable, "HTTP failure"),
)


def _translate(exc: httpx.HTTPError, ep: Endpoint, what: str) -> LazysnapError:
    # Only the exception's type goes in the message: httpx may quote a signed URL.
    for cls, category, reason in _HTTPX_ERRORS:
        if isinstance(exc, cls):
            message = f"{what}: {ep.describe()} {reason} ({type(exc).__name__})"
            if category is not RegistryUnavailable:
                return category(message)
            tls = _ssl_error(exc)
            if tls is None:
                return RegistryUnavailable(message)
            # A certificate the server will keep presenting: no point in retrying.
            bad_cert = isinstance(tls, ssl.SSLCertVerificationError)
            detail = getattr(tls, "verify_message" if bad_cert else "reason", None) or str(tls)
            return RegistryUnavailable(
                f"{message}: TLS {detail or 'handshake failed'}",
                # a TLS alert means the peer speaks TLS; anything else may be plain HTTP
                tls_mismatch=not bad_cert and "ALERT" not in str(detail),
                retryable=False if bad_cert else None,
            )
    raise AssertionError("httpx.HTTPError is the last row")  # pragma: no cover


async def _raise_for_status(
    response: httpx.Response, ep: Endpoint, what: str, not_found: type[NotFound]
) -> None:
    """Raise the registry error for a non-success status, with the OCI error code if any."""
    code = response.status_code
    detail = f"HTTP {code} from {ep.describe()}"
    try:
        body = await read_capped(response, _MAX_ERROR_BODY, what)
        errors = json.loads(body).get("errors") or []
        codes = sorted({e.get("code") for e in errors if isinstance(e.get("code"), str)})
        if codes:
            detail += f" ({', '.join(codes)})"
    except (LazysnapError, httpx.HTTPError, ValueError, AttributeError, TypeError):
        pass
    if code == 404:
        raise not_found(f"{what}: not found, {detail}")
    if code in (401, 403):
        raise Unauthorized(f"{what}: access denied, {detail}")
    if code in (408, 429) or code >= 500:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise RegistryUnavailable(f"{what}: {detail}", retry_after=retry_after)
    raise RegistryRejected(f"{what}: {detail}")
