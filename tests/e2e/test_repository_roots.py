"""Layers mapped to existing repository paths (config `repository_roots`): a local directory
laid out like CernVM-FS's unpacked.cern.ch `.layers`, `<hex[0:2]>/<hex>/layerfs`, keyed by
the layer digest as Prepare's labels give it (here: the eStargz blob's digest).

A layer found there is used as the overlay lowerdir as it is, so nothing of it may cross
the byte-counting proxy in front of the registry; the other layer is still lazy.
"""

from __future__ import annotations

import gzip
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DATA_FILES, data_sha256
from tests.e2e.daemon_status import layer_rows, status_after
from tests.e2e.estargz import LANDMARKS, EstargzImage, blob_data_path
from tests.e2e.harness import Registry
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

MARKER = "from-repository-root"


def _layerfs(roots: Path, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return roots / hexd[:2] / hexd / "layerfs"


def _unpack(blob: Path, dest: Path) -> None:
    """What an unpacking service stores: the layer's tree, without eStargz's own entries."""
    dest.mkdir(parents=True)
    with gzip.open(blob) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
        for member in tar:
            if "/" + member.name.lstrip("./") in LANDMARKS:
                continue
            tar.extract(member, dest, numeric_owner=True)
    # Proof that the container sees this directory and not the registry's layer.
    (dest / MARKER).write_text("unpacked, not downloaded\n")


@pytest.fixture
def roots(
    tmp_path: Path, registry: Registry, esgz_data: tuple[EstargzImage, EstargzImage]
) -> Path:
    roots = tmp_path / "unpacked"
    data_layer = str(esgz_data[0].layers[-1]["digest"])
    _unpack(blob_data_path(registry, data_layer), _layerfs(roots, data_layer))
    return roots


@pytest.fixture
def stack(tmp_path: Path, roots: Path) -> Iterator[Stack]:
    # The first root has no layers at all: lookups go on to the next one.
    args = ["--repository-roots", f"{tmp_path / 'empty-root'},{roots}"]
    with start_stack(tmp_path / "stack", lazysnap_args=args) as stack:
        yield stack


def test_layer_in_a_repository_root_is_used_without_download(
    stack: Stack,
    roots: Path,
    registry: Registry,
    esgz_data: tuple[EstargzImage, EstargzImage],
) -> None:
    assert stack.lazysnap is not None
    image = esgz_data[0]
    base, data = (str(layer["digest"]) for layer in image.layers)
    with TcpProxy(("127.0.0.1", registry.port)) as proxy:
        ref = image.ref(proxy.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        script = f"cat /{MARKER}; sha256sum /data/big-0.bin /data/big-1.bin"
        out = stack.run(ref, "from-roots", "sh", "-c", script)
        ran = time.time()
        fetched = proxy.counts().down

    lines = out.splitlines()
    assert lines[0] == "unpacked, not downloaded"
    for line, name in zip(lines[1:], ("data/big-0.bin", "data/big-1.bin"), strict=True):
        assert line.split()[0] == data_sha256(name)
    read = DATA_FILES["data/big-0.bin"] + DATA_FILES["data/big-1.bin"]
    print(f"fetched {fetched:,} bytes; the container read {read:,} bytes of the data layer")
    # The base layer (busybox) came lazily; of the data layer, nothing.
    assert fetched < int(image.layers[0]["size"]) + 256 * 1024  # type: ignore[call-overload]

    rows = layer_rows(status_after(stack.lazysnap.root, ran), [base, data])
    assert rows[data]["mode"] == "path" and rows[data]["path"] == str(_layerfs(roots, data))
    assert rows[base]["mode"] == "lazy"

    stack.run(ref, "probe", "sleep", "60", rm=False, detach=True)
    try:
        lowers = stack.mounts("probe")["lowerdir"].split(":")
        assert lowers[0] == str(_layerfs(roots, data))  # nearest parent first
        assert lowers[1].startswith(str(stack.lazysnap.root / "repo"))
    finally:
        stack.ctr("tasks", "rm", "-f", "probe")
        stack.ctr("containers", "rm", "probe")
