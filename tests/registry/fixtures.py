"""Real `docker-registry` processes for tests: plain, htpasswd (Basic), token auth, TLS.

Import the pytest fixtures by name into a conftest (or test module)::

    from tests.registry.fixtures import htpasswd_registry, plain_registry, token_registry

(and `tls_registry`: HTTPS with a test CA that requires client certificates).
Each yields a `RegistryServer`:

- `host` ("127.0.0.1:<port>"; plain HTTP needs no hosts.toml, as the client falls back
  from HTTPS on loopback), `url`, `root` (storage), `log_path`;
- `username`/`password` (empty for the plain one), `credentials()` for
  `RegistryClient(extra_credentials=...)`, `docker_config(path)` to write a docker
  config.json for other clients (ctr, containerd);
- `.token_server` for the token registry; `.pki` and `hosts_toml(dir)` for TLS.

Processes stop at fixture teardown; `run_registry()` is the context manager underneath,
for other lifetimes (e.g. stop and restart on the same port and storage).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from snapshotter.registry.credentials import Credential, StaticCredentials
from tests.registry.certs import TestPKI, make_pki
from tests.registry.tokenserver import ISSUER, SERVICE, TokenServer

USERNAME = "lazysnap"
PASSWORD = "s3cret-Pa55word"
REGISTRY_BIN = "/usr/bin/docker-registry"
_START_TIMEOUT = 20.0


@dataclass
class RegistryServer:
    host: str
    root: Path
    log_path: Path
    username: str = ""
    password: str = ""
    token_server: TokenServer | None = None
    pki: TestPKI | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.pki else 'http'}://{self.host}"

    def hosts_toml(self, hosts_dir: Path, *, ca: bool = True, client: bool = True) -> Path:
        """Write `<hosts_dir>/<host>/hosts.toml` naming this server (and its TLS files)."""
        lines = [f'server = "{self.url}"']
        if self.pki is not None and ca:
            lines.append(f'ca = "{self.pki.ca}"')
        if self.pki is not None and client:
            lines.append(f'client = [["{self.pki.client_cert}", "{self.pki.client_key}"]]')
        path = hosts_dir / self.host / "hosts.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    def credentials(self) -> StaticCredentials:
        table = {self.host: Credential(self.username, self.password)} if self.username else {}
        return StaticCredentials(table)

    def docker_config(self, path: Path) -> Path:
        auths = {}
        if self.username:
            auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            auths[self.host] = {"auth": auth}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"auths": auths}))
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_registry(
    workdir: Path, auth: str | None = None, port: int | None = None, tls: str | None = None
) -> Iterator[RegistryServer]:
    """A docker-registry on 127.0.0.1 with filesystem storage under `workdir`.

    `auth`: None, "htpasswd" or "token". `tls`: None (plain HTTP), "server" (HTTPS with
    a test CA: `server.pki`), or "mutual" (clients must also present the client cert).
    Run it again with the same `workdir` and `port` to bring a stopped registry back
    with its content.
    """
    if shutil.which(REGISTRY_BIN) is None and shutil.which("docker-registry") is None:
        pytest.skip("needs docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server = RegistryServer(f"127.0.0.1:{port}", workdir / "storage", workdir / "registry.log")
    auth_lines: list[str] = []
    token_server = None
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        line = subprocess.run(
            ["htpasswd", "-Bbn", USERNAME, PASSWORD], check=True, capture_output=True, text=True
        ).stdout.strip()
        htpasswd.write_text(line + "\n")
        auth_lines = ["auth:", "  htpasswd:", "    realm: lazysnap-test", f"    path: {htpasswd}"]
        server.username, server.password = USERNAME, PASSWORD
    elif auth == "token":
        token_server = TokenServer(workdir, users={USERNAME: PASSWORD}).start()
        auth_lines = [
            "auth:",
            "  token:",
            f"    realm: {token_server.realm}",
            f"    service: {SERVICE}",
            f"    issuer: {ISSUER}",
            f"    rootcertbundle: {token_server.cert_path}",
        ]
        server.username, server.password = USERNAME, PASSWORD
        server.token_server = token_server
    elif auth is not None:
        raise ValueError(f"unknown registry auth {auth!r}")
    tls_lines: list[str] = []
    if tls is not None:
        server.pki = make_pki(workdir / "pki")
        tls_lines = [
            "  tls:",
            f"    certificate: {server.pki.server_cert}",
            f"    key: {server.pki.server_key}",
        ]
        if tls == "mutual":
            tls_lines += ["    clientcas:", f"      - {server.pki.ca}"]
    config = workdir / "config.yml"
    config.write_text(
        "\n".join(
            [
                "version: 0.1",
                "log:",
                "  level: info",
                "  accesslog:",
                "    disabled: true",
                "storage:",
                "  filesystem:",
                f"    rootdirectory: {server.root}",
                "  delete:",
                "    enabled: true",
                "http:",
                f"  addr: {server.host}",
                "  secret: lazysnap-test-secret",
                *tls_lines,
                *auth_lines,
                "",
            ]
        )
    )
    binary = REGISTRY_BIN if Path(REGISTRY_BIN).exists() else "docker-registry"
    with server.log_path.open("wb") as log:
        # If pytest itself is killed (SIGKILL, CI timeout), no finally runs: the kernel stops
        # the registry instead (parent-death signal). setpriv sets it in the child, because a
        # Python preexec_fn forces a plain fork(), and grpcio's fork handlers can abort the
        # child of a process that has gRPC channels open (seen: exit -6 before exec).
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", "--", binary, "serve", str(config)],
            stdout=log, stderr=log,
        )
    try:
        _wait_ready(server, proc)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if token_server is not None:
            token_server.stop()


def _wait_ready(server: RegistryServer, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"docker-registry exited {proc.returncode}: {server.log_path.read_text()[-2000:]}"
            )
        if server.pki is not None:
            # A TLS handshake may need the client certificate: a TCP connect will do.
            try:
                socket.create_connection(
                    ("127.0.0.1", int(server.host.rpartition(":")[2])), 1.0
                ).close()
                return
            except OSError:
                pass
        else:
            try:
                status = httpx.get(f"{server.url}/v2/", timeout=1.0).status_code
            except httpx.HTTPError:
                status = None
            if status in (200, 401):
                return
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry not ready in {_START_TIMEOUT}s")


@pytest.fixture
def plain_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with run_registry(tmp_path / "registry") as server:
        yield server


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with run_registry(tmp_path / "registry-htpasswd", auth="htpasswd") as server:
        yield server


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """HTTPS with a test CA and client certificates required (`server.pki`)."""
    with run_registry(tmp_path / "registry-tls", tls="mutual") as server:
        yield server


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with run_registry(tmp_path / "registry-token", auth="token") as server:
        yield server
