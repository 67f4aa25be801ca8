"""Remembered blob-storage redirect URLs, reused until they expire or fail.

Registries answer blob GETs with a redirect to signed storage URLs; following the
registry for every chunk would double the round trips. An entry lives until the
expiry its signature states (S3 `X-Amz-Date` + `X-Amz-Expires`, `Expires=<unix>`,
Azure `se=`), less a margin, and at most `max_ttl` seconds.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import httpx
import trio

__all__ = ["REDACT_URLS", "RedirectCache", "url_expiry"]

_MARGIN = 30.0


class RedirectCache:
    def __init__(self, max_ttl: float = 600.0, max_entries: int = 4096) -> None:
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str, str], tuple[str, float]] = {}

    def get(self, key: tuple[str, str, str]) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= trio.current_time():
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: tuple[str, str, str], url: str) -> None:
        ttl = self.max_ttl
        expiry = url_expiry(url)
        if expiry is not None:
            ttl = min(ttl, expiry - time.time() - _MARGIN)
        if ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (url, trio.current_time() + ttl)

    def drop(self, key: tuple[str, str, str]) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


def url_expiry(url: str) -> float | None:
    """Unix time at which a signed URL stops working, if its query says."""
    params = httpx.URL(url).params
    try:
        if "X-Amz-Date" in params and "X-Amz-Expires" in params:
            signed = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            return signed.timestamp() + int(params["X-Amz-Expires"])
        if "Expires" in params:
            return float(params["Expires"])
        if "se" in params:
            return datetime.fromisoformat(params["se"].replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return None


class _RedactURLs(logging.Filter):
    """Strips queries from URLs in httpx's INFO request log: signatures are secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                f"{a.scheme}://{a.netloc.decode()}{a.path}" if isinstance(a, httpx.URL) else a
                for a in record.args
            )
        return True


REDACT_URLS = _RedactURLs()
