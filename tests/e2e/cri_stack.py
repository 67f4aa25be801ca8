"""containerd with its CRI plugin on, wired to lazysnap, plus lazysnap's CRI image proxy.

Extends the harness (which runs containerd with CRI off): the same private root, state and
sockets, and the CRI settings a node would use — `snapshotter = "lazysnap"`,
`disable_snapshot_annotations = false`, a locally built sandbox image, plain-HTTP test
registries through a `config_path` hosts directory, and an empty CNI config dir (pods use
host networking, for which containerd 1.6 never calls CNI).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.cri_client import CriClient
from tests.e2e.harness import Containerd, Lazysnap, remove_tree, unmount_under
from tests.e2e.stack import Stack

__all__ = ["CriContainerd", "CriStack", "start_cri_stack", "write_plain_http_hosts"]

SNAPSHOTTER = "lazysnap"


def write_plain_http_hosts(hosts_dir: Path, host: str) -> None:
    """containerd's hosts.toml for a plain-HTTP registry `host` (127.0.0.1:<port>)."""
    path = hosts_dir / host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'server = "http://{host}"\n\n[host."http://{host}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


class CriContainerd(Containerd):
    """containerd whose CRI plugin serves kubelet's API on the same socket."""

    name = "containerd"
    namespace = "k8s.io"  # where CRI keeps its images and containers; `ctr()` looks there
    DISABLED_PLUGINS = tuple(p for p in Containerd.DISABLED_PLUGINS
                             if p != "io.containerd.grpc.v1.cri")

    def __init__(self, workdir: Path, sockdir: Path, proxy_plugins: dict[str, str],
                 sandbox_image: str) -> None:
        super().__init__(workdir, sockdir, proxy_plugins)
        self.sandbox_image = sandbox_image
        self.hosts_dir = workdir / "certs.d"

    def config_text(self) -> str:
        cni = self.workdir / "cni"
        for d in (cni / "bin", cni / "net.d", self.hosts_dir):
            d.mkdir(parents=True, exist_ok=True)
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        lines = [
            f"{cri}]",
            f'  sandbox_image = "{self.sandbox_image}"',
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  disable_apparmor = true",
            # The sandbox gets oom_score_adj -998, which needs CAP_SYS_RESOURCE; test machines
            # that are themselves containers may lack it (runc then dies before reporting).
            "  restrict_oom_score_adj = true",
            f"{cri}.containerd]",
            f'  snapshotter = "{SNAPSHOTTER}"',
            "  disable_snapshot_annotations = false",
            '  default_runtime_name = "runc"',
            f"{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"{cri}.cni]",
            f'  bin_dir = "{cni / "bin"}"',
            f'  conf_dir = "{cni / "net.d"}"',
            f"{cri}.registry]",
            f'  config_path = "{self.hosts_dir}"',
        ]
        return super().config_text() + "\n".join(lines) + "\n"


@dataclass
class CriStack:
    stack: Stack
    cri: CriClient
    proxy_address: str
    sockdir: Path

    @property
    def lazysnap(self) -> Lazysnap:
        assert self.stack.lazysnap is not None
        return self.stack.lazysnap

    @property
    def containerd(self) -> Containerd:
        return self.stack.containerd


@contextlib.contextmanager
def start_cri_stack(
    workdir: Path,
    sandbox_image: str,
    registries: Sequence[str],
    lazysnap_args: Sequence[str] = (),
) -> Iterator[CriStack]:
    """lazysnap (with its CRI proxy on) + CRI containerd; torn down like `start_stack`.

    The CRI client's image calls go through lazysnap's proxy, as kubelet's would with
    `--image-service-endpoint`.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="lzc", dir="/tmp"))
    proxy_address = str(sockdir / "cri-proxy.sock")
    lazysnap = containerd = client = None
    try:
        containerd_address = str(sockdir / "containerd.sock")
        lazysnap = Lazysnap(
            workdir / "lazysnap", str(sockdir / "lazysnap.sock"),
            extra_args=["--cri-proxy-address", proxy_address,
                        "--containerd-address", containerd_address, *lazysnap_args],
        ).start()
        lazysnap.wait_listening(proxy_address)
        containerd = CriContainerd(workdir / "containerd", sockdir,
                                   {SNAPSHOTTER: lazysnap.address}, sandbox_image)
        for host in registries:
            write_plain_http_hosts(containerd.hosts_dir, host)
        containerd.start()
        stack = Stack(SNAPSHOTTER, containerd, lazysnap, lazysnap.root)
        stack.wait_ready()
        client = CriClient(containerd.address, image_address=proxy_address)
        yield CriStack(stack, client, proxy_address, sockdir)
    finally:
        started = time.monotonic()
        if client is not None:
            client.close()
        if containerd is not None:
            containerd.stop()
        if lazysnap is not None:
            lazysnap.stop()
        leftovers = unmount_under(workdir)
        remove_tree(sockdir)
        for svc in (lazysnap, containerd):
            if svc is not None:
                print(f"----- {svc.name} log (tail) -----\n{svc.log_tail()}")
        print(f"teardown took {time.monotonic() - started:.1f}s")
        if leftovers:
            raise AssertionError(f"mounts left behind after teardown: {leftovers}")
