"""The `WWW-Authenticate` flows as an `httpx.Auth`: Bearer tokens per scope, and Basic.

Token requests are yielded through the same client as the request they authorize, so
they share its transport and TLS settings and its one httpx-error translation in
`client.py`. Failures of the token realm itself become registry errors here.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

import httpx
import trio

from snapshotter.registry.credentials import Credential, CredentialSource
from snapshotter.registry.errors import RegistryUnavailable, Unauthorized
from snapshotter.registry.retry import parse_retry_after

__all__ = ["SCOPE_EXTENSION", "Challenge", "RegistryAuth", "parse_challenges", "repository_scope"]

log = logging.getLogger(__name__)

# The client names the scopes a request needs here; the path alone cannot tell where the
# repository name starts when a mirror uses `override_path`.
SCOPE_EXTENSION = "lazysnap.scopes"
_DEFAULT_TOKEN_LIFETIME = 60.0
_MAX_TOKEN_BYTES = 1 << 20
_CLIENT_ID = "lazysnap"
_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9_.-]*)(?=\s|$|,)")


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercase: "bearer" or "basic"
    params: dict[str, str]


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """All challenges in `WWW-Authenticate` header values (RFC 7235 auth-params)."""
    out: list[Challenge] = []
    for header in headers:
        pos = 0
        while pos < len(header):
            m = _SCHEME.match(header, pos)
            if m is None:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while (p := _PARAM.match(header, pos)) is not None and p.end() > pos:
                value = p.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[p.group(1).lower()] = value
                pos = p.end()
            out.append(Challenge(scheme, params))
            while pos < len(header) and header[pos] in ", ":
                pos += 1
    return out


def repository_scope(repository: str, *, push: bool = False) -> str:
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


class RegistryAuth(httpx.Auth):
    """Authorizes requests to one registry endpoint; one instance per endpoint host.

    Lifecycle of a request: if a token for its scopes is cached (or Basic was asked for
    before), the header is added up front; a 401 then carries the challenge. For Bearer,
    the token is fetched from the realm: anonymously, with GET and Basic credentials, or
    with a POST `grant_type=refresh_token` form when the credential is an identity
    token. Tokens are cached per scope set until shortly before `expires_in`. A request
    that still gets 401 after a fresh token is answered with that 401.
    """

    def __init__(self, credential_host: str, credentials: CredentialSource | None) -> None:
        self._host = credential_host
        self._credentials = credentials
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._bearer: Challenge | None = None
        self._basic = False

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        raise RuntimeError("RegistryAuth works with httpx.AsyncClient only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        scopes: tuple[str, ...] = tuple(request.extensions.get(SCOPE_EXTENSION, ()))
        key = " ".join(sorted(scopes))
        sent_basic = False
        if self._bearer is not None and self._cached(key) is None:
            # Known realm: fetch the token first rather than collect another 401.
            async with self._lock(key):
                if self._cached(key) is None:
                    token_response = yield await self._token_request(self._bearer, scopes)
                    await self._store(token_response, self._bearer, key)
        token = self._cached(key)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic:
            sent_basic = await self._set_basic(request)
        response = yield request
        if response.status_code != 401:
            return
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer" and "realm" in c.params), None)
        if bearer is not None:
            self._bearer = bearer
            wanted = set(scopes)
            wanted.update(s for s in bearer.params.get("scope", "").split(" ") if s)
            async with self._lock(key):
                # Another task may have fetched a token while we waited; only the one
                # this request was refused with is known to be bad.
                fresh = self._cached(key)
                if fresh is None or fresh == token:
                    self._tokens.pop(key, None)
                    token_response = yield await self._token_request(bearer, tuple(sorted(wanted)))
                    await self._store(token_response, bearer, key)
            request.headers["Authorization"] = f"Bearer {self._tokens[key].value}"
            yield request
        elif any(c.scheme == "basic" for c in challenges) and not sent_basic:
            self._basic = True
            if await self._set_basic(request):
                yield request

    async def _token_request(self, challenge: Challenge, scopes: tuple[str, ...]) -> httpx.Request:
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        cred = await self._credential()
        if cred is not None and cred.identity_token:
            form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", cred.identity_token),
                ("client_id", _CLIENT_ID),
            ]
            if service:
                form.append(("service", service))
            form.extend(("scope", s) for s in scopes)
            return httpx.Request("POST", realm, data=dict(_multi(form)))
        params = [("service", service)] if service else []
        params.extend(("scope", s) for s in scopes)
        headers = {}
        if cred is not None and cred.username:
            params.append(("account", cred.username))
            headers["Authorization"] = _basic_header(cred)
        return httpx.Request("GET", realm, params=params, headers=headers)

    async def _store(self, response: httpx.Response, challenge: Challenge, key: str) -> None:
        realm = httpx.URL(challenge.params["realm"])
        where = f"token realm {realm.scheme}://{realm.netloc.decode()}{realm.path}"
        if response.status_code in (401, 403):
            raise Unauthorized(
                f"{where} refused {'credentials' if self._credentials else 'anonymous access'}"
                f" for {self._host} (HTTP {response.status_code})"
            )
        if response.status_code == 429 or response.status_code >= 500:
            raise RegistryUnavailable(
                f"{where}: HTTP {response.status_code}",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if response.status_code != 200:
            raise Unauthorized(f"{where}: HTTP {response.status_code}")
        body = await response.aread()
        try:
            if len(body) > _MAX_TOKEN_BYTES:
                raise ValueError("too large")
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            if not isinstance(value, str) or not value:
                raise ValueError("no token")
            lifetime = float(doc.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, TypeError, AttributeError):
            raise Unauthorized(f"{where}: unreadable token response") from None
        # Renew a little early so a token does not expire between check and use.
        lifetime = max(lifetime, _DEFAULT_TOKEN_LIFETIME)
        self._tokens[key] = _Token(value, trio.current_time() + lifetime * 0.9)
        log.debug("token for %s scopes %r valid %.0fs", self._host, key, lifetime)

    def _lock(self, key: str) -> trio.Lock:
        return self._locks.setdefault(key, trio.Lock())

    def _cached(self, key: str) -> str | None:
        token = self._tokens.get(key)
        if token is None or token.expires_at <= trio.current_time():
            return None
        return token.value

    async def _credential(self) -> Credential | None:
        if self._credentials is None:
            return None
        return await self._credentials.lookup(self._host)

    async def _set_basic(self, request: httpx.Request) -> bool:
        cred = await self._credential()
        if cred is None or not cred.username:
            return False
        request.headers["Authorization"] = _basic_header(cred)
        return True


def _multi(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    out: dict[str, str | list[str]] = {}
    for k, v in pairs:
        if k in out:
            prev = out[k]
            out[k] = [*prev, v] if isinstance(prev, list) else [prev, v]
        else:
            out[k] = v
    return out


def _basic_header(cred: Credential) -> str:
    raw = f"{cred.username}:{cred.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()
