"""Kubernetes nodes end to end: containerd's CRI plugin with `snapshotter = "lazysnap"`, driven
through the CRI socket the way kubelet drives it, with image calls through lazysnap's CRI
image-service proxy (kubelet's `--image-service-endpoint`).

The application image is eStargz (made by `ctr-remote image convert`) in a private, token-auth
registry; lazysnap has no credentials of its own, only those the proxy saw on PullImage. The
sandbox ("pause") image is a plain gzip image in an open registry, so it takes the fallback.
Also here: the nerdctl configuration (the proxy plugin registered as `stargz`), checked with
`ctr-remote`, since nerdctl is not installable on the test machines.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from snapshotter.digest import Digest
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from tests.e2e.conftest import daemon_log_problems
from tests.e2e.cri_client import CriClient, parse_log
from tests.e2e.cri_stack import CriStack, start_cri_stack
from tests.e2e.estargz import EstargzImage, convert_and_push
from tests.e2e.harness import REPO_ROOT, Lazysnap, Registry, wait_for
from tests.e2e.images import MEDIA_MANIFEST, Image, busybox_layer, data_image, push_image
from tests.e2e.stack import Stack
from tests.registry.fixtures import RegistryServer, run_registry

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

MiB = 1024 * 1024
FILES = {"data/a.bin": 3 * MiB + 11, "data/b.bin": 2 * MiB + 5}


@dataclass(frozen=True)
class PrivateImage:
    ref: str  # in the token registry
    public_ref: str  # the same eStargz image in the open registry
    esgz: EstargzImage
    sha256: dict[str, str]  # container path -> hex digest


@pytest.fixture(scope="module")
def pause_ref(registry: Registry) -> str:
    """A pause-like sandbox image: busybox whose only job is to sleep."""
    push_image(registry.url, "e2e/pause", "v1",
               Image((busybox_layer(),), cmd=("/bin/sleep", "3600")))
    return f"{registry.host}/e2e/pause:v1"


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with run_registry(tmp_path_factory.mktemp("token-registry"), auth="token") as server:
        yield server


@pytest.fixture(scope="module")
def private_image(
    registry: Registry, private_registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> PrivateImage:
    image = data_image(FILES, seed=11)
    push_image(registry.url, "e2e/cri-app", "v1", image)
    esgz = convert_and_push(tmp_path_factory.mktemp("conv"), registry, "e2e/cri-app", "v1", "esgz")
    trio.run(_copy, registry, esgz, private_registry, "private/app")
    entries = {e.path: e.data for e in image.layers[1].entries}
    return PrivateImage(
        ref=f"{private_registry.host}/private/app:esgz",
        public_ref=esgz.ref(registry.host),
        esgz=esgz,
        sha256={f"/{p}": hashlib.sha256(entries[p]).hexdigest() for p in FILES},
    )


async def _copy(src: Registry, esgz: EstargzImage, dst: RegistryServer, repo: str) -> None:
    """Copy an image between registries as is (same manifest bytes, so the same digests)."""
    client = RegistryClient(hosts_dir=None, docker_config=Path("/nonexistent/config.json"),
                            extra_credentials=dst.credentials())
    target = Reference.parse(f"{dst.host}/{repo}:{esgz.tag}")
    try:
        async with httpx.AsyncClient(base_url=src.url, timeout=60) as http:
            manifest = await http.get(f"/v2/{esgz.repo}/manifests/{esgz.tag}",
                                      headers={"Accept": MEDIA_MANIFEST})
            manifest.raise_for_status()
            for desc in [esgz.manifest["config"], *esgz.layers]:
                digest = str(desc["digest"])  # type: ignore[index]
                blob = await http.get(f"/v2/{esgz.repo}/blobs/{digest}")
                blob.raise_for_status()
                await client.push_blob(target, blob.content, Digest.parse(digest))
            await client.put_manifest(target, manifest.content, MEDIA_MANIFEST)
    finally:
        await client.aclose()


def _status(lazysnap: Lazysnap) -> dict[str, Any]:
    """`lazysnap status --json`, as an operator would run it, once it describes the present:
    the daemon rewrites it every few seconds."""
    asked = time.time()
    doc: dict[str, Any] = {}

    def fresh() -> bool:
        nonlocal doc
        done = subprocess.run(
            [sys.executable, "-m", "snapshotter", "status", "--root", str(lazysnap.root),
             "--json"],
            capture_output=True, text=True, timeout=30, check=True,
            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        )
        doc = json.loads(done.stdout)
        return doc["time"] >= asked

    wait_for(fresh, 15, "a fresh `lazysnap status`", interval=0.5)
    return doc


def _layers_of(lazysnap: Lazysnap, ref: str) -> list[dict[str, Any]]:
    return [r for r in _status(lazysnap)["layers"] if r["image_ref"] == ref]


def _run(s: CriStack, pod: Any, name: str, image: str, script: str) -> list[str]:
    """Run a container to completion in `pod`; its stdout lines, read from the CRI log file."""
    cid = s.cri.start_container(pod, name, image, ["/bin/sh", "-c", script])
    st = s.cri.wait_exited(cid)
    log = parse_log((pod.log_dir / f"{name}.log").read_text())
    assert st.exit_code == 0, (st.reason, st.message, log)
    assert all(line.stream == "stdout" and not line.partial for line in log)
    return [line.text for line in log]


def test_cri_pull_with_auth_is_lazy_and_the_pod_runs(
    tmp_path: Path, pause_ref: str, private_image: PrivateImage, private_registry: RegistryServer,
    registry: Registry,
) -> None:
    with start_cri_stack(tmp_path, pause_ref, [registry.host, private_registry.host]) as s:
        s.cri.pull(private_image.ref, private_registry.username, private_registry.password)

        layers = _layers_of(s.lazysnap, private_image.ref)
        assert [r["mode"] for r in layers] == ["lazy"] * len(private_image.esgz.layers)
        assert {r["layer_digest"] for r in layers} == {
            str(desc["digest"]) for desc in private_image.esgz.layers  # type: ignore[index]
        }
        status = _status(s.lazysnap)
        assert [fb for fb in status["fallbacks"] if fb["image_ref"] == private_image.ref] == []
        [kept] = status["credentials"]
        assert (kept["image"], kept["username"]) == (private_image.ref, private_registry.username)
        assert private_registry.password not in json.dumps(status)

        pod = s.cri.run_pod("lazy-pod", tmp_path / "pod-logs")
        script = "echo hello from cri; sha256sum /data/a.bin"
        out = _run(s, pod, "reader", private_image.ref, script)
        assert out == ["hello from cri", f"{private_image.sha256['/data/a.bin']}  /data/a.bin"]

        # Lazily: the container read one file of the data layer, not the whole image.
        layers = _layers_of(s.lazysnap, private_image.ref)
        fetched = sum(r["bytes_fetched"] for r in layers)
        assert FILES["data/a.bin"] <= fetched < private_image.esgz.size() - FILES["data/b.bin"]
        # The plain-gzip sandbox image could not be lazy, and says why.
        reasons = {fb["reason"] for fb in _status(s.lazysnap)["fallbacks"]
                   if fb["image_ref"] == pause_ref}
        assert reasons and reasons <= {"no-toc-digest", "not-estargz"}

        s.cri.remove_pod(pod)
        assert s.cri.pod_ids() == []
        s.cri.remove_image(private_image.ref)
        assert private_image.ref not in s.cri.image_ids()
        assert _status(s.lazysnap)["credentials"] == []
    assert not daemon_log_problems(s.lazysnap.log_path)


def test_pull_that_bypasses_the_proxy_falls_back_for_want_of_credentials(
    tmp_path: Path, pause_ref: str, private_image: PrivateImage, private_registry: RegistryServer,
    registry: Registry,
) -> None:
    """Without the proxy (kubelet pointed straight at containerd) lazysnap never sees the
    credentials: every layer is downloaded in full, and `lazysnap status` says why."""
    with start_cri_stack(tmp_path, pause_ref, [registry.host, private_registry.host]) as s:
        direct = CriClient(s.containerd.address)
        try:
            direct.pull(private_image.ref, private_registry.username, private_registry.password)
        finally:
            direct.close()

        status = _status(s.lazysnap)
        assert _layers_of(s.lazysnap, private_image.ref) == []
        reasons = [fb["reason"] for fb in status["fallbacks"]
                   if fb["image_ref"] == private_image.ref]
        assert reasons == ["unauthorized"] * len(private_image.esgz.layers)
        pod = s.cri.run_pod("full-pod", tmp_path / "pod-logs")
        out = _run(s, pod, "reader", private_image.ref, "sha256sum /data/b.bin")
        assert out == [f"{private_image.sha256['/data/b.bin']}  /data/b.bin"]
    assert not daemon_log_problems(s.lazysnap.log_path)


def test_private_layers_stay_readable_after_a_daemon_restart(
    tmp_path: Path, pause_ref: str, private_image: PrivateImage, private_registry: RegistryServer,
    registry: Registry,
) -> None:
    assert private_registry.token_server is not None
    with start_cri_stack(tmp_path, pause_ref, [registry.host, private_registry.host]) as s:
        s.cri.pull(private_image.ref, private_registry.username, private_registry.password)
        pod = s.cri.run_pod("restart-pod", tmp_path / "pod-logs")
        out = _run(s, pod, "first", private_image.ref, "sha256sum /data/a.bin")
        assert out == [f"{private_image.sha256['/data/a.bin']}  /data/a.bin"]

        s.lazysnap.restart()
        s.stack.wait_ready()
        tokens_before = len(private_registry.token_server.issued)

        # b.bin was never read: its bytes can only come from the private registry, now.
        out = _run(s, pod, "second", private_image.ref, "sha256sum /data/b.bin")
        assert out == [f"{private_image.sha256['/data/b.bin']}  /data/b.bin"]
        layers = _layers_of(s.lazysnap, private_image.ref)
        assert sum(r["bytes_fetched"] for r in layers) >= FILES["data/b.bin"]
        assert len(private_registry.token_server.issued) > tokens_before

        store = s.lazysnap.root / "cri"
        secret = private_registry.password.encode()
        assert all(secret not in p.read_bytes() for p in store.iterdir())
        assert (store / "credentials.key").stat().st_mode & 0o077 == 0
    assert private_registry.password not in s.lazysnap.log_path.read_text()
    assert not daemon_log_problems(s.lazysnap.log_path)


@pytest.mark.parametrize("stack", ["stargz"], indirect=True)
def test_nerdctl_configuration_proxy_plugin_named_stargz(
    stack: Stack, private_image: PrivateImage
) -> None:
    """nerdctl passes remote-snapshot labels only to snapshotter names containing `stargz`
    (or soci, nydus, overlaybd, cvmfs-snapshotter) and then pulls into the snapshotter of
    exactly that builtin name; so lazysnap is registered as `stargz`. `ctr-remote image
    rpull` sends the same kind of labels nerdctl's stargz path does."""
    assert stack.snapshotter == "stargz" and stack.lazysnap is not None
    stack.pull(private_image.public_ref, tool="ctr-remote", verb="rpull")

    layers = _layers_of(stack.lazysnap, private_image.public_ref)
    assert [r["mode"] for r in layers] == ["lazy"] * len(private_image.esgz.layers)
    assert _status(stack.lazysnap)["fallbacks"] == []
    out = stack.run(private_image.public_ref, "nerdctl-style", "/bin/sha256sum", "/data/a.bin")
    assert out.split() == [private_image.sha256["/data/a.bin"], "/data/a.bin"]
