"""Registry error types: the categories of `snapshotter.errors`, made specific.

`client.py` is the one place that turns httpx exceptions and HTTP statuses into these.
Messages name the object (repository, digest, host) and never carry credentials or
signed URLs.
"""

from __future__ import annotations

from snapshotter.errors import (
    DataLoss,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

__all__ = [
    "BlobNotFound",
    "HostsConfigInvalid",
    "InvalidReference",
    "ManifestInvalid",
    "ManifestNotFound",
    "PlatformNotFound",
    "RangeNotSupported",
    "RegistryRejected",
    "RegistryUnavailable",
    "ShortRead",
    "Unauthorized",
]


class InvalidReference(InvalidArgument):
    """An image reference that does not parse."""


class HostsConfigInvalid(InvalidArgument):
    """A hosts.toml that does not parse, or names an unknown capability or scheme."""


class BlobNotFound(NotFound):
    """The registry answered 404 for a blob."""


class ManifestNotFound(NotFound):
    """The registry answered 404 for a manifest (tag or digest)."""


class PlatformNotFound(NotFound):
    """An index or manifest list has no manifest for the requested platform."""


class ManifestInvalid(InvalidArgument):
    """A manifest that is not JSON, too large, or of an unknown media type."""


class RegistryRejected(InvalidArgument):
    """A 4xx the request cannot recover from (400, 405, 416, ...)."""


class Unauthorized(PermissionDenied):
    """401/403 after the auth flow ran, or a token realm that refused us."""


class RegistryUnavailable(Unavailable):
    """Connection failure, timeout, 429 or 5xx: retrying later may work.

    `retry_after` is the server's Retry-After in seconds, when it sent one.
    `tls_mismatch` marks an HTTPS attempt at a server that speaks plain HTTP.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        tls_mismatch: bool = False,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.tls_mismatch = tls_mismatch
        if retryable is not None:
            self.retryable = retryable


class RangeNotSupported(RegistryUnavailable):
    """The server ignored `Range` and would send a large whole blob instead."""

    retryable = False


class ShortRead(DataLoss):
    """A response body whose length is not the one asked for."""
