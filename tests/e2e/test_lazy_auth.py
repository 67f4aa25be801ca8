"""Lazy pulling from registries that require credentials: htpasswd (Basic) and a token
server (Bearer JWTs), with lazysnap reading the credentials from a docker config.json.

containerd gets the same credentials through `rpull --user`; lazysnap must find its own,
and a layer it could not fetch would silently fall back to a full download, so each test
counts the bytes at a proxy to prove the layers really were served lazily.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DATA_FILES, data_sha256
from tests.e2e.estargz import EstargzImage, copy_image
from tests.e2e.harness import Registry
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import start_stack
from tests.registry.fixtures import RegistryServer, run_registry

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]


@pytest.fixture(params=["htpasswd", "token"])
def secure_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryServer]:
    with run_registry(tmp_path / "secure", auth=request.param) as server:
        yield server


def test_lazy_pull_with_credentials_from_docker_config(
    tmp_path: Path,
    registry: Registry,
    esgz_data: tuple[EstargzImage, EstargzImage],
    secure_registry: RegistryServer,
) -> None:
    image = esgz_data[0]
    user = f"{secure_registry.username}:{secure_registry.password}"
    copy_image(tmp_path / "copy", image.ref(registry.host), image.ref(secure_registry.host), user)
    host, port = secure_registry.host.split(":")

    with TcpProxy((host, int(port))) as proxy:
        docker_config = tmp_path / "docker-config.json"
        auth = base64.b64encode(user.encode()).decode()
        docker_config.write_text(json.dumps({"auths": {proxy.host: {"auth": auth}}}))
        args = ["--docker-config", str(docker_config)]
        with start_stack(tmp_path / "stack", lazysnap_args=args) as stack:
            ref = image.ref(proxy.host)
            stack.pull(ref, "--user", user, tool="ctr-remote", verb="rpull")
            out = stack.run(ref, "authed", "sha256sum", "/data/big-2.bin")

            fetched = proxy.counts().down
            assert out.split()[0] == data_sha256("data/big-2.bin")
            # big-2 is the smallest file; a fallback would have fetched all of them.
            assert fetched < DATA_FILES["data/big-2.bin"] + 3 * 1024 * 1024
            assert stack.lazysnap is not None
            assert secure_registry.password not in stack.lazysnap.log_path.read_text()
