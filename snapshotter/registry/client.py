"""The registry client: manifests, blob HEAD/GET/Range reads, pushes, over hosts.toml endpoints.

The one place where httpx exceptions and HTTP statuses become registry errors
(`_translate`, `_raise_for_status`). Runs under trio; every request is bounded in time.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import trio

from snapshotter.digest import Digest
from snapshotter.errors import LazysnapError, NotFound
from snapshotter.registry import push
from snapshotter.registry.credentials import (
    ChainedCredentials,
    CredentialSource,
    DockerConfigCredentials,
)
from snapshotter.registry.errors import (
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
from snapshotter.registry.recent import RecentManifests
from snapshotter.registry.redirects import REDACT_URLS
from snapshotter.registry.reference import Reference
from snapshotter.registry.responses import (
    range_body,
    ranges_body,
    read_capped,
    tail_body,
    verified_manifest,
)
from snapshotter.registry.retry import RetryPolicy, parse_retry_after
from snapshotter.registry.session import Session

__all__ = ["RegistryClient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_ERROR_BODY = 64 << 10


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
        retry = retry or RetryPolicy(max_attempts=max_attempts)
        self.failover = Failover(hosts_dir, retry, timeout, _translate)
        self.session = Session(ChainedCredentials(sources), timeout, transport, _raise_for_status)
        self.redirects = self.session.redirects
        self._recent = RecentManifests()
        self._referrers_api: dict[str, bool] = {}  # host -> answered the referrers API
        self._multi_range: dict[str, bool] = {}  # host -> answered multi-range requests
        logging.getLogger("httpx").addFilter(REDACT_URLS)  # a set: adding twice keeps one

    # -- public API ------------------------------------------------------------------

    async def get_manifest(
        self, ref: Reference, *, platform: str | None = None, max_age: float | None = None
    ) -> Manifest:
        """The image manifest for `ref`, choosing from an index by `platform`. With
        `max_age`, one fetched for the same reference and platform at most that many
        seconds ago (or being fetched now) is reused: see registry/recent.py."""
        if max_age is not None:
            fetch = partial(self.get_manifest, ref, platform=platform)
            return await self._recent.get(f"{ref}#{platform or ''}", max_age, fetch)
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
            response = await self.session.blob_request(ep, ref, digest, what, {}, method="HEAD")
            await response.aclose()
            length = response.headers.get("content-length")
            if length is not None and length.isdigit():
                return int(length)
            # Some proxies drop it on HEAD; a one-byte range states the total instead.
            response = await self.session.blob_request(
                ep, ref, digest, what, {"Range": "bytes=0-0"}
            )
            await response.aclose()
            total = response.headers.get("content-range", "").rpartition("/")[2]
            if response.status_code == 206 and total.isdigit():
                return int(total)
            raise ShortRead(f"{what}: neither Content-Length nor Content-Range")

        return await self.failover.run(ref.host, "pull", what, op)

    async def read_blob_range(self, ref: Reference, digest: Digest, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob, exactly, or an error; never a partial answer."""
        what = f"blob {digest} of {ref.host}/{ref.repository} range [{start}, {end})"
        if not 0 <= start < end:
            raise RegistryRejected(f"{what}: empty or negative range")
        return await self._ranged(ref, digest, what, f"bytes={start}-{end - 1}",
                                  partial(range_body, start=start, end=end, what=what))  # fmt: skip

    async def read_blob_ranges(
        self, ref: Reference, digest: Digest, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        """Bytes [start, end) of each of `ranges` (ascending, disjoint), in one request
        where the server answers multi-range requests (multipart/byteranges, as Go's and
        most registries' file servers do), else one request per range. A host that once
        answered with fewer ranges than asked (object stores behind a redirect often do)
        gets single ranges from then on; a 200 is closed unread."""
        if len(ranges) == 1 or self._multi_range.get(ref.host) is False:
            return await self._each_range(ref, digest, ranges)
        what = f"blob {digest} of {ref.host}/{ref.repository} {len(ranges)} ranges"
        spec = "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in ranges)
        try:
            got: list[bytes | None] = await self._ranged(
                ref, digest, what, spec, partial(ranges_body, ranges=list(ranges), what=what)
            )
        except (RegistryRejected, ShortRead) as exc:
            if self._multi_range.get(ref.host) is not None:
                raise
            # A first multi-range answer that is refused (416, 400) or garbled says the
            # server does not do them; single ranges say whether the blob is fine.
            log.info("%s: multi-range request failed (%s); asking single ranges", what, exc)
            got = [None] * len(ranges)
        if any(data is None for data in got):
            if self._multi_range.get(ref.host) is None:
                log.info("%s answers one range per request; asking so from now on", ref.host)
            self._multi_range[ref.host] = False
            rest = [r for r, data in zip(ranges, got, strict=True) if data is None]
            fetched = iter(await self._each_range(ref, digest, rest))
            return [data if data is not None else next(fetched) for data in got]
        self._multi_range[ref.host] = True
        return [data for data in got if data is not None]

    async def _each_range(
        self, ref: Reference, digest: Digest, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        out: list[bytes] = [b""] * len(ranges)
        # Within the one request slot the caller holds: a few at a time, not all at once.
        limiter = trio.CapacityLimiter(4)

        async def one(i: int, start: int, end: int) -> None:
            async with limiter:
                out[i] = await self.read_blob_range(ref, digest, start, end)

        async with trio.open_nursery() as nursery:
            for i, (start, end) in enumerate(ranges):
                nursery.start_soon(one, i, start, end)
        return out

    async def read_blob_tail(self, ref: Reference, digest: Digest, n: int) -> tuple[bytes, int]:
        """The last min(n, size) bytes of a blob and its size, in one request (a suffix
        range): what a HEAD and a range request would give, one round trip sooner."""
        what = f"blob {digest} of {ref.host}/{ref.repository} last {n} bytes"
        if n <= 0:
            raise RegistryRejected(f"{what}: empty range")
        return await self._ranged(ref, digest, what, f"bytes=-{n}",
                                  partial(tail_body, n=n, what=what))  # fmt: skip

    async def _ranged(
        self, ref: Reference, digest: Digest, what: str, byte_range: str,
        body: Callable[[httpx.Response], Awaitable[T]],
    ) -> T:  # fmt: skip
        """A Range request for a blob, its answer read by `body`, with failover."""
        headers = {"Range": byte_range}

        async def op(ep: Endpoint) -> T:
            response = await self.session.blob_request(ep, ref, digest, what, headers)
            try:
                return await body(response)
            except BaseException:
                # A storage URL that broke mid-body is not reused; the registry decides.
                self.redirects.drop(self.session.redirect_key(ep, ref, digest))
                raise
            finally:
                await response.aclose()

        return await self.failover.run(ref.host, "pull", what, op)

    async def get_blob(self, ref: Reference, digest: Digest, *, max_size: int = 1 << 30) -> bytes:
        """A whole blob, verified against `digest` (DataLoss on mismatch)."""
        what = f"blob {digest} of {ref.host}/{ref.repository}"

        async def op(ep: Endpoint) -> bytes:
            response = await self.session.blob_request(ep, ref, digest, what, {})
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

    async def get_referrers(self, ref: Reference, subject: Digest) -> bytes | None:
        """The raw OCI index of manifests whose `subject` is `subject` (the referrers API),
        or None when the registry does not offer that API (then use the `sha256-<hex>`
        tag fallback)."""
        what = f"referrers of {ref.host}/{ref.repository}@{subject}"

        async def op(ep: Endpoint) -> bytes | None:
            url = f"{ep.base_url}/{ref.repository}/referrers/{subject}"
            try:
                response = await self.session.exchange(
                    ep, ref, "GET", url, what, ManifestNotFound, ok=(200,),
                    headers={"Accept": "application/vnd.oci.image.index.v1+json"},
                )
            except ManifestNotFound:
                self._referrers_api[ref.host] = False
                return None
            self._referrers_api[ref.host] = True
            if len(response.content) > MAX_MANIFEST_BYTES:
                raise ManifestInvalid(f"{what}: over {MAX_MANIFEST_BYTES} bytes")
            return response.content

        return await self.failover.run(ref.host, "pull", what, op)

    def multi_range(self, host: str) -> bool:
        """Whether to ask `host` for several ranges in one request: until it answered one
        with fewer ranges than asked."""
        return self._multi_range.get(host) is not False

    def has_referrers_api(self, host: str) -> bool | None:
        """Whether `host` answered the referrers API last time; None until it answered."""
        return self._referrers_api.get(host)

    async def aclose(self) -> None:
        self.failover.closed = True
        await self.session.aclose()

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
            url = self.session.manifest_url(ep, ref, obj)
            headers = {"Accept": ACCEPT_MANIFESTS}
            response = await self.session.following(
                ep, ref, "GET", url, headers, what, ManifestNotFound
            )
            try:
                if response.status_code != 200:
                    raise RegistryRejected(f"{what}: unexpected HTTP {response.status_code}")
                raw = await read_capped(response, MAX_MANIFEST_BYTES, what)
            finally:
                await response.aclose()
            return verified_manifest(response, raw, expected, size, what)

        return await self.failover.run(ref.host, capability, what, op)


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
