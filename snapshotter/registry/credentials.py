"""Registry credentials: docker's `config.json` (`auths`, `credHelpers`, `credsStore`).

Secrets live only in `Credential` objects, whose repr is redacted; nothing here logs
or raises a message containing one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from snapshotter.registry.reference import DOCKER_HUB

__all__ = [
    "ChainedCredentials",
    "Credential",
    "CredentialSource",
    "DockerConfigCredentials",
    "StaticCredentials",
    "default_docker_config",
]

log = logging.getLogger(__name__)

_HUB_KEY = "https://index.docker.io/v1/"
_HELPER_TIMEOUT = 10.0
_HELPER_TOKEN_USER = "<token>"


@dataclass(frozen=True, slots=True)
class Credential:
    """A username and password, or an identity (refresh) token for the token realm."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        kind = "identity-token" if self.identity_token else "password"
        return f"Credential(username={self.username!r}, {kind}=<redacted>)"


class CredentialSource(Protocol):
    """Looks up credentials for a registry host (`docker.io`, `127.0.0.1:5000`).

    Returns None when it has none. Never raises for a missing entry; a broken source
    (unreadable file, failing helper) logs a warning without secrets and returns None.
    """

    async def lookup(self, host: str) -> Credential | None: ...


class StaticCredentials:
    """A fixed host -> credential table (tests, and the `--user` of CLI commands)."""

    def __init__(self, table: dict[str, Credential]) -> None:
        self._table = dict(table)

    async def lookup(self, host: str) -> Credential | None:
        return self._table.get(host)


class ChainedCredentials:
    """The first source that has an answer wins."""

    def __init__(self, sources: Sequence[CredentialSource]) -> None:
        self._sources = tuple(sources)

    async def lookup(self, host: str) -> Credential | None:
        for source in self._sources:
            cred = await source.lookup(host)
            if cred is not None:
                return cred
        return None


def default_docker_config() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, as docker does."""
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return Path(env) / "config.json"
    return Path.home() / ".docker" / "config.json"


class DockerConfigCredentials:
    """Credentials the way `docker login` stores them.

    Order, as in docker: `credHelpers[host]`, then `credsStore`, then `auths`
    (base64 `auth`, or `username`/`password`, plus `identitytoken`). Docker Hub is
    stored under `https://index.docker.io/v1/`. The file is re-read when it changes.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path if path is not None else default_docker_config()
        self._stamp: tuple[int, int] | None = None
        self._doc: dict[str, object] = {}

    async def lookup(self, host: str) -> Credential | None:
        doc = self._load()
        helpers = doc.get("credHelpers")
        helper = helpers.get(host) if isinstance(helpers, dict) else None
        if helper is None and isinstance(doc.get("credsStore"), str):
            helper = doc["credsStore"]
        if isinstance(helper, str) and helper:
            cred = await _run_helper(helper, _server_url(host))
            if cred is not None:
                return cred
        auths = doc.get("auths")
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if _normalize(key) == host and isinstance(entry, dict):
                    return _from_auths_entry(entry, host, self._path)
        return None

    def _load(self) -> dict[str, object]:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._doc, self._stamp = {}, None
            return self._doc
        except OSError as exc:
            log.warning("docker config %s unreadable: %s", self._path, exc.strerror)
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                doc = json.loads(self._path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                # Only the error's type: a message could quote the file, secrets included.
                log.warning("docker config %s unreadable: %s", self._path, type(exc).__name__)
                doc = {}
            self._doc = doc if isinstance(doc, dict) else {}
            self._stamp = stamp
        return self._doc


def _normalize(key: str) -> str:
    """A config key (`https://index.docker.io/v1/`, `http://h:5000`, `h:5000`) as a host."""
    rest = key.partition("://")[2] if "://" in key else key
    host = rest.partition("/")[0]
    if host in ("index.docker.io", "registry-1.docker.io", "docker.io"):
        return DOCKER_HUB
    return host


def _server_url(host: str) -> str:
    return _HUB_KEY if host == DOCKER_HUB else host


def _from_auths_entry(entry: dict[str, object], host: str, path: Path) -> Credential | None:
    username = entry.get("username") if isinstance(entry.get("username"), str) else ""
    password = entry.get("password") if isinstance(entry.get("password"), str) else ""
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            log.warning("docker config %s: 'auth' for %s is not base64 user:password", path, host)
            return None
        username, sep, password = decoded.partition(":")
        if not sep:
            log.warning("docker config %s: 'auth' for %s has no ':'", path, host)
            return None
    token = entry.get("identitytoken")
    token = token if isinstance(token, str) else ""
    if not (username or password or token):
        return None
    return Credential(str(username), str(password), token)


async def _run_helper(name: str, server_url: str) -> Credential | None:
    program = f"docker-credential-{name}"
    path = shutil.which(program)
    if path is None:
        log.warning("credential helper %s not found on PATH", program)
        return None
    try:
        with trio.fail_after(_HELPER_TIMEOUT):
            proc = await trio.run_process(
                [path, "get"],
                stdin=server_url.encode(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        log.warning("credential helper %s timed out for %s", program, server_url)
        return None
    except OSError as exc:
        log.warning("credential helper %s failed to start: %s", program, exc.strerror)
        return None
    if proc.returncode != 0:
        # "credentials not found" is the helper protocol's normal miss; stderr and stdout
        # are not logged since a broken helper might echo what it was given.
        if b"credentials not found" not in proc.stdout + proc.stderr:
            log.warning(
                "credential helper %s exited %d for %s", program, proc.returncode, server_url
            )
        return None
    try:
        reply = json.loads(proc.stdout)
        username, secret = reply["Username"], reply["Secret"]
        if not isinstance(username, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        log.warning("credential helper %s gave an unreadable reply for %s", program, server_url)
        return None
    if username == _HELPER_TOKEN_USER:
        return Credential(identity_token=secret)
    return Credential(username, secret)
