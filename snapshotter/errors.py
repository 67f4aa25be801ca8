"""Error categories shared by every layer of lazysnap.

They mirror containerd's errdefs so that each boundary (gRPC status, FUSE errno, CLI exit
code) can translate them from a single table. Raise the most specific subclass.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "ClosedError",
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "LazysnapError",
    "NotFound",
    "NotImplementedYet",
    "PermissionDenied",
    "Unavailable",
]


class LazysnapError(Exception):
    """Base of every error category; an unknown failure is reported as internal."""


class NotFound(LazysnapError):
    """The named object (snapshot, blob, manifest, file) does not exist."""


class AlreadyExists(LazysnapError):
    """The object exists already; for a remote Prepare this is the success signal."""


class FailedPrecondition(LazysnapError):
    """The object is in the wrong state for the request (e.g. commit of a committed key)."""


class InvalidArgument(LazysnapError):
    """The request itself is malformed: bad key, filter, field path, label, TOC, path."""


class Unavailable(LazysnapError):
    """Something outside is broken or unreachable right now; retrying later may work."""


class NotImplementedYet(LazysnapError):
    """A recognised request we do not serve (containerd's errdefs.ErrNotImplemented)."""


class PermissionDenied(LazysnapError):
    """Credentials were refused or missing."""


class DataLoss(LazysnapError):
    """Bytes failed verification (digest mismatch, truncated blob, corrupt cache file)."""


class ClosedError(LazysnapError):
    """The component was closed by us; calls after close() land here."""


CATEGORIES: tuple[type[LazysnapError], ...] = (
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    NotImplementedYet,
    PermissionDenied,
    DataLoss,
    ClosedError,
)


def category(exc: BaseException) -> type[LazysnapError] | None:
    """The category an exception belongs to, or None for an unexpected (internal) error."""
    for cat in CATEGORIES:
        if isinstance(exc, cat):
            return cat
    return None
