"""Per-registry endpoints from containerd's `certs.d/<host>/hosts.toml` convention.

Pure: reads TOML files and returns frozen `Endpoint` lists; knows nothing of HTTP clients.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from snapshotter.registry.errors import HostsConfigInvalid
from snapshotter.registry.reference import DOCKER_HUB, is_loopback

__all__ = ["ALL_CAPABILITIES", "DEFAULT_HOSTS_DIR", "Endpoint", "load_endpoints"]

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
_HUB_SERVER = "https://registry-1.docker.io"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place to send requests for a registry: a mirror or the upstream server.

    `path` is the API root (`/v2` unless `override_path`); requests append
    `/<repository>/manifests/<ref>` to it. `http_fallback` marks a loopback registry
    without hosts.toml: try HTTPS, and if the server does not speak TLS, plain HTTP.
    `upstream` is the host named in the image reference; it differs from `netloc`
    for mirrors, which then get the `ns=<upstream>` query like containerd sends.
    """

    scheme: str
    netloc: str
    path: str
    upstream: str
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client_certs: tuple[tuple[Path, Path | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    http_fallback: bool = False
    is_mirror: bool = field(default=False)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"

    def as_plain_http(self) -> Endpoint:
        return replace(self, scheme="http", http_fallback=False)

    def describe(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def load_endpoints(hosts_dir: Path | None, host: str) -> list[Endpoint]:
    """The endpoints to try for `host`, in order: mirrors from hosts.toml, then the server.

    Looks for `<hosts_dir>/<host>/hosts.toml`, then `<hosts_dir>/_default/hosts.toml`.
    Without either, the registry itself over HTTPS (loopback: HTTPS, then HTTP).
    """
    default_server = _HUB_SERVER if host == DOCKER_HUB else f"https://{host}"
    if hosts_dir is not None:
        for name in (host, "_default"):
            path = hosts_dir / name / "hosts.toml"
            if path.is_file():
                return _parse_file(path, host, default_server)
    scheme, _, netloc = default_server.partition("://")
    return [
        Endpoint(scheme, netloc, "/v2", upstream=host, http_fallback=is_loopback(host)),
    ]


def _parse_file(path: Path, host: str, default_server: str) -> list[Endpoint]:
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HostsConfigInvalid(f"hosts config {str(path)!r}: {exc}") from exc
    base = path.parent
    endpoints = []
    hosts = doc.get("host", {})
    if not isinstance(hosts, Mapping):
        raise HostsConfigInvalid(f"hosts config {str(path)!r}: 'host' must be a table")
    for url, table in hosts.items():
        if not isinstance(table, Mapping):
            raise HostsConfigInvalid(f"hosts config {str(path)!r}: host {url!r} must be a table")
        endpoints.append(_endpoint(path, base, url, table, host, mirror=True))
    server = doc.get("server", default_server)
    if not isinstance(server, str):
        raise HostsConfigInvalid(f"hosts config {str(path)!r}: 'server' must be a string")
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    # The server keeps every capability unless the file restricts it explicitly.
    endpoints.append(_endpoint(path, base, server, top, host, mirror=False))
    return endpoints


def _endpoint(
    path: Path, base: Path, url: str, table: Mapping[str, Any], upstream: str, *, mirror: bool
) -> Endpoint:
    where = f"hosts config {str(path)!r}, host {url!r}"
    if "://" not in url:
        url = f"https://{url}"
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https"):
        raise HostsConfigInvalid(f"{where}: scheme must be http or https")
    netloc, slash, api_path = rest.partition("/")
    if not netloc:
        raise HostsConfigInvalid(f"{where}: no host")
    api_path = ("/" + api_path).rstrip("/") if slash else ""
    if not table.get("override_path", False) and not api_path.endswith("/v2"):
        api_path += "/v2"
    caps = table.get("capabilities", sorted(ALL_CAPABILITIES))
    if not isinstance(caps, list) or not set(caps) <= ALL_CAPABILITIES:
        raise HostsConfigInvalid(f"{where}: capabilities must be a subset of {ALL_CAPABILITIES}")
    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise HostsConfigInvalid(f"{where}: skip_verify must be true or false")
    headers = table.get("header", {})
    if not isinstance(headers, Mapping):
        raise HostsConfigInvalid(f"{where}: header must be a table")
    header_pairs = []
    for key, value in headers.items():
        for v in value if isinstance(value, list) else [value]:
            header_pairs.append((str(key), str(v)))
    return Endpoint(
        scheme=scheme,
        netloc=netloc,
        path=api_path,
        upstream=upstream,
        capabilities=frozenset(caps),
        skip_verify=skip_verify,
        ca=tuple(base / p for p in _strings(table.get("ca", []), where, "ca")),
        client_certs=_client_certs(table.get("client", []), base, where),
        headers=tuple(header_pairs),
        is_mirror=mirror,
    )


def _strings(value: object, where: str, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigInvalid(f"{where}: {key} must be a path or a list of paths")


def _client_certs(value: object, base: Path, where: str) -> tuple[tuple[Path, Path | None], ...]:
    # Accepted shapes, as in containerd: "c.pem", ["a.pem", ...], [["c.cert", "c.key"], ...].
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigInvalid(f"{where}: client must be a path or a list")
    pairs: list[tuple[Path, Path | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((base / item, None))
        elif (
            isinstance(item, list) and len(item) in (1, 2) and all(isinstance(p, str) for p in item)
        ):
            key = base / item[1] if len(item) == 2 and item[1] else None
            pairs.append((base / item[0], key))
        else:
            raise HostsConfigInvalid(f"{where}: client entry {item!r} is not [cert, key]")
    return tuple(pairs)
