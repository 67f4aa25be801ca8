"""Lazy pulling from registries that require credentials: htpasswd (Basic) and a token
server (Bearer JWTs), with lazysnap reading the credentials from a docker config.json.

containerd gets the same credentials through `rpull --user`; lazysnap must find its own,
and a layer it cannot fetch silently falls back to a full download, so each test asks the
daemon's status whether the layers really are lazy. The registries start from a copy of
the session registry's storage (no push needed); one stack serves the module.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import daemon_log_problems, data_sha256
from tests.e2e.daemon_status import layer_rows, status_after, status_cli
from tests.e2e.estargz import EstargzImage
from tests.e2e.harness import Registry
from tests.e2e.stack import Stack, start_stack
from tests.registry.fixtures import RegistryServer, run_registry

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

AUTHS = ("htpasswd", "token")


@pytest.fixture(scope="module")
def secure_registries(
    registry: Registry,
    esgz_data: tuple[EstargzImage, EstargzImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, RegistryServer]]:
    """An htpasswd and a token registry holding the session registry's images, and an
    htpasswd one whose credentials lazysnap is not given ("unknown")."""
    servers: dict[str, RegistryServer] = {}
    with contextlib.ExitStack() as stack:
        for name, auth in (*((a, a) for a in AUTHS), ("unknown", "htpasswd")):
            work = tmp_path_factory.mktemp(f"registry-{name}")
            shutil.copytree(registry.workdir / "storage", work / "storage")
            servers[name] = stack.enter_context(run_registry(work, auth=auth))
        yield servers


@pytest.fixture(scope="module")
def docker_config(
    secure_registries: dict[str, RegistryServer], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    auths = {}
    for name in AUTHS:
        server = secure_registries[name]
        token = base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
        auths[server.host] = {"auth": token}
    path = tmp_path_factory.mktemp("docker") / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


@pytest.fixture(scope="module")
def stack(docker_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = ["--docker-config", str(docker_config)]
    with start_stack(tmp_path_factory.mktemp("auth-stack"), lazysnap_args=args) as stack:
        yield stack
    assert stack.lazysnap is not None
    assert daemon_log_problems(stack.lazysnap.log_path) == []


def _rpull(stack: Stack, ref: str, server: RegistryServer) -> None:
    # ctr-remote fetches the manifest and config itself, with its own credentials.
    user = f"{server.username}:{server.password}"
    stack.containerd.ctr(
        "images", "rpull", "--plain-http", "--user", user, "--snapshotter", stack.snapshotter,
        ref, tool="ctr-remote",
    )


def _secrets(server: RegistryServer) -> list[str]:
    user = f"{server.username}:{server.password}"
    return [server.password, base64.b64encode(user.encode()).decode()]


@pytest.mark.parametrize("auth", AUTHS)
def test_lazy_pull_with_credentials_from_docker_config(
    stack: Stack,
    secure_registries: dict[str, RegistryServer],
    esgz_data: tuple[EstargzImage, EstargzImage],
    auth: str,
) -> None:
    assert stack.lazysnap is not None
    server = secure_registries[auth]
    image = esgz_data[0]
    ref = image.ref(server.host)
    _rpull(stack, ref, server)
    out = stack.run(ref, f"authed-{auth}", "sha256sum", "/data/big-2.bin")
    read = time.time()
    assert out.split()[0] == data_sha256("data/big-2.bin")

    doc = status_after(stack.lazysnap.root, read)
    digests = [str(layer["digest"]) for layer in image.layers]
    assert [fb for fb in doc["fallbacks"] if fb["layer_digest"] in digests] == []
    rows = layer_rows(doc, digests)
    assert {row["mode"] for row in rows.values()} == {"lazy"}
    assert set(rows) == set(digests)
    data = rows[digests[-1]]
    assert 0 < data["bytes_fetched"] < int(image.layers[-1]["size"])  # type: ignore[call-overload]
    if auth == "token":
        assert server.token_server is not None
        assert any(i["user"] == server.username for i in server.token_server.issued)

    log = stack.lazysnap.log_path.read_text()
    for secret in _secrets(server):
        assert secret not in log
    assert "Authorization" not in log and "eyJ" not in log  # no header, no JWT


def test_missing_credentials_fall_back_as_unauthorized(
    stack: Stack,
    secure_registries: dict[str, RegistryServer],
    esgz_data: tuple[EstargzImage, EstargzImage],
) -> None:
    """containerd has credentials, lazysnap does not: a full download, and status says why."""
    assert stack.lazysnap is not None
    server = secure_registries["unknown"]
    image = esgz_data[1]
    ref = image.ref(server.host)
    _rpull(stack, ref, server)
    out = stack.run(ref, "full-download", "sha256sum", "/data/b.txt")
    assert out.split()[0] == hashlib.sha256(b"b").hexdigest()  # esgz_data's image b

    doc = status_after(stack.lazysnap.root, time.time())
    # Only the data layer is new: image b shares its base layer with image a, which an
    # earlier test may have pulled already (containerd then does not prepare it again).
    data = str(image.layers[-1]["digest"])
    reasons = {fb["layer_digest"]: fb["reason"] for fb in doc["fallbacks"]}
    assert reasons.get(data) == "unauthorized"
    assert doc["fallback_counts"].get("unauthorized", 0) >= 1
    assert data not in layer_rows(doc, [data])
    for secret in _secrets(server):
        assert secret not in stack.lazysnap.log_path.read_text()


def test_status_cli_shows_lazy_layers_and_why_others_are_not(
    stack: Stack,
    secure_registries: dict[str, RegistryServer],
    esgz_data: tuple[EstargzImage, EstargzImage],
) -> None:
    """`lazysnap status` against this daemon: a line per lazy layer, a line per fallback."""
    assert stack.lazysnap is not None
    lazy, fell = secure_registries["htpasswd"], secure_registries["unknown"]
    a, b = esgz_data
    for image, server in ((a, lazy), (b, fell)):  # already there if the tests above ran
        _rpull(stack, image.ref(server.host), server)
    stack.run(a.ref(lazy.host), "status-read", "sha256sum", "/data/big-0.bin")
    status_after(stack.lazysnap.root, time.time())

    done = status_cli(stack.lazysnap.root)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "LAYER", "MODE", "SIZE", "FETCHED", "%", "HITS"]
    for layer in a.layers:
        digest = str(layer["digest"])
        [line] = [ln for ln in lines if f" {digest[:19]} " in ln and " lazy " in ln]
        ref, _, mode, size, fetched, percent, hits = line.split()
        assert ref.endswith(f"/{a.repo}:{a.tag}") and mode == "lazy"
        assert size.endswith("iB") and fetched[0].isdigit()
        assert 0 <= float(percent) <= 100 and int(hits) >= 0
    data = str(b.layers[-1]["digest"])
    [line] = [ln for ln in lines if f" {data[:19]} " in ln]
    assert line.split()[0].endswith(f"/{b.repo}:{b.tag}")
    assert "fallback: unauthorized" in line and data in line  # the detail names the layer
    assert lines[-1].startswith("cache: ")
    # TOCs were parsed by the daemon's worker process, not in the daemon itself.
    assert lines[-2].startswith("toc parser: worker pid "), lines[-2]

    done = status_cli(stack.lazysnap.root, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    row = layer_rows(doc, [str(a.layers[-1]["digest"])])[str(a.layers[-1]["digest"])]
    assert row["size"] == int(a.layers[-1]["size"])  # type: ignore[call-overload]
    assert 0 < row["bytes_fetched"] < row["size"]
    percent = 100 * row["bytes_fetched"] / row["size"]
    assert row["percent_fetched"] == pytest.approx(percent, abs=0.1)
    assert doc["fallback_counts"]["unauthorized"] >= 1
    assert doc["pid"] == stack.lazysnap.proc.pid  # type: ignore[union-attr]
    parser = doc["toc_parser"]
    assert parser["parsed_in_worker"] >= 1 and parser["parsed_in_daemon"] == 0
    stat = Path(f"/proc/{parser['worker_pid']}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) == doc["pid"]  # the daemon's child
    for server in (lazy, fell):
        for secret in _secrets(server):
            assert secret not in done.stdout
