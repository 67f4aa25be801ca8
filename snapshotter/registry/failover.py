"""Which endpoint to ask, how often, and for how long: mirrors, retries, HTTP fallback.

Owns the per-host endpoint lists. The translation of httpx errors is passed in from
`client.py`, the one place that defines it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import trio

from snapshotter.errors import ClosedError, LazysnapError, NotFound, PermissionDenied, Unavailable
from snapshotter.registry.errors import RegistryRejected, RegistryUnavailable
from snapshotter.registry.hosts import Endpoint, load_endpoints
from snapshotter.registry.retry import RetryPolicy, with_retries

__all__ = ["Failover"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Op = Callable[[Endpoint], Awaitable[T]]
Translate = Callable[[httpx.HTTPError, Endpoint, str], LazysnapError]

# An endpoint that stayed unavailable through its retries is skipped this long
# (unless every endpoint is), so a dead mirror does not tax every chunk read.
DOWN_FOR = 30.0


class Failover:
    """Runs an operation against a registry host's endpoints until one answers.

    Endpoints with the needed capability are tried in hosts.toml order, each with
    `retry`; NotFound, Unavailable and PermissionDenied move on to the next, and the
    last endpoint's error is raised. Each attempt is bounded by `timeout` seconds
    (or, with `bounded=False`, only per read: whole-blob transfers).
    An HTTPS endpoint marked `http_fallback` that meets a plain-HTTP server is switched
    to HTTP for good.
    """

    def __init__(
        self, hosts_dir: Path | None, retry: RetryPolicy, timeout: float, translate: Translate
    ) -> None:
        self._hosts_dir = hosts_dir
        self._retry = retry
        self._timeout = timeout
        self._translate = translate
        self._endpoints: dict[str, list[Endpoint]] = {}
        self._down: dict[str, float] = {}
        self.closed = False

    def endpoints(self, host: str) -> list[Endpoint]:
        if host not in self._endpoints:
            self._endpoints[host] = load_endpoints(self._hosts_dir, host)
        return self._endpoints[host]

    async def run(
        self,
        host: str,
        capability: str,
        what: str,
        op: Op[T],
        *,
        idempotent: bool = True,
        bounded: bool = True,
    ) -> T:
        if self.closed:
            raise ClosedError("registry client is closed")
        endpoints = self.endpoints(host)
        indexes = [i for i, ep in enumerate(endpoints) if capability in ep.capabilities]
        if not indexes:
            raise RegistryRejected(f"{what}: no endpoint of {host} may {capability}")
        now = trio.current_time()
        live = [i for i in indexes if self._down.get(endpoints[i].netloc, 0.0) <= now] or indexes
        limit = self._timeout if bounded else None
        last: LazysnapError | None = None
        for i in live:

            async def attempt(i: int = i) -> T:
                return await self._attempt(host, i, op, what, limit)

            try:
                return await with_retries(self._retry, attempt, what=what, idempotent=idempotent)
            except (NotFound, Unavailable, PermissionDenied) as exc:
                if isinstance(exc, Unavailable):
                    self._down[endpoints[i].netloc] = trio.current_time() + DOWN_FOR
                last = exc
                log.debug("%s: %s failed: %s", what, endpoints[i].describe(), exc)
        assert last is not None
        raise last

    async def _attempt(self, host: str, index: int, op: Op[T], what: str, limit: float | None) -> T:
        ep = self._endpoints[host][index]
        with trio.move_on_after(limit if limit is not None else float("inf")):
            while True:
                try:
                    return await op(ep)
                except httpx.HTTPError as exc:
                    error = self._translate(exc, ep, what)
                    if not (
                        isinstance(error, RegistryUnavailable)
                        and error.tls_mismatch
                        and ep.http_fallback
                    ):
                        raise error from exc
                # Like containerd: a loopback registry without hosts.toml may speak plain
                # HTTP. The plain endpoint has no fallback, so this loops at most twice.
                log.debug("%s does not speak TLS; using http://%s", ep.describe(), ep.netloc)
                ep = self._endpoints[host][index] = ep.as_plain_http()
        raise RegistryUnavailable(f"{what}: no answer from {ep.describe()} within {limit:g}s")
