"""Which endpoint to ask, how often, and for how long: mirrors, retries, HTTP fallback.

Owns the per-host endpoint lists. The translation of httpx errors is passed in from
`client.py`, the one place that defines it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
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
    An HTTPS endpoint marked `http_fallback` (a loopback registry without hosts.toml)
    is asked over HTTPS and plain HTTP at once by its first idempotent request: the
    scheme that answers stays (a plain-HTTP server otherwise costs a failed TLS handshake
    and a new connection, ~4 round trips, on the first Prepare's path); requests that
    must not run twice probe HTTPS first, and switch to HTTP if the server does not speak
    TLS.
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
                return await self._attempt(host, i, op, what, limit, race=idempotent)

            try:
                return await with_retries(self._retry, attempt, what=what, idempotent=idempotent)
            except (NotFound, Unavailable, PermissionDenied) as exc:
                if isinstance(exc, Unavailable):
                    self._down[endpoints[i].netloc] = trio.current_time() + DOWN_FOR
                last = exc
                log.debug("%s: %s failed: %s", what, endpoints[i].describe(), exc)
        assert last is not None
        raise last

    async def _attempt(
        self, host: str, index: int, op: Op[T], what: str, limit: float | None, *, race: bool
    ) -> T:
        ep = self._endpoints[host][index]
        with trio.move_on_after(limit if limit is not None else float("inf")):
            if race and ep.http_fallback:
                return await self._race(host, index, op, what)
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
                ep = self._to_plain(host, index)
        raise RegistryUnavailable(f"{what}: no answer from {ep.describe()} within {limit:g}s")

    async def _race(self, host: str, index: int, op: Op[T], what: str) -> T:
        """`op` over HTTPS and plain HTTP at once; the first answer wins and fixes the
        endpoint's scheme. A TLS server refuses the plain request (400), a plain server
        fails the handshake: only one can answer."""
        tls = self._endpoints[host][index]
        plain = tls.as_plain_http()
        answers: dict[str, T] = {}
        errors: dict[str, LazysnapError] = {}
        answered: set[str] = set()  # arms whose server answered in HTTP, if with an error

        async def arm(name: str, ep: Endpoint, nursery: trio.Nursery) -> None:
            try:
                answers[name] = await op(ep)
            except httpx.HTTPError as exc:
                errors[name] = self._translate(exc, ep, what)
            except LazysnapError as exc:
                errors[name] = exc
                answered.add(name)
            else:
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(arm, "tls", tls, nursery)
            nursery.start_soon(arm, "plain", plain, nursery)
        if "tls" in answers or "tls" in answered:  # it speaks TLS: no more plain requests
            self._endpoints[host][index] = replace(tls, http_fallback=False)
        if "tls" in answers:
            return answers["tls"]
        error = errors.get("tls")  # none when the plain answer cancelled it
        plain_server = isinstance(error, RegistryUnavailable) and error.tls_mismatch
        if "tls" not in answered and ("plain" in answers or plain_server):
            self._to_plain(host, index)
            if "plain" in answers:
                return answers["plain"]
            raise errors["plain"]
        assert error is not None
        raise error

    def _to_plain(self, host: str, index: int) -> Endpoint:
        """The endpoint does not speak TLS: plain HTTP from now on (and no fallback)."""
        ep = self._endpoints[host][index]
        log.debug("%s does not speak TLS; using http://%s", ep.describe(), ep.netloc)
        plain = self._endpoints[host][index] = ep.as_plain_http()
        return plain
