"""Lazy pulling end to end: eStargz images made by `ctr-remote image convert`, pulled with
`ctr-remote image rpull --snapshotter lazysnap`, read through lazysnap's FUSE repository.

If lazysnap falls back to a full download, rpull and run still work, so the tests that only
check what the container sees would pass; the byte counts and the EIO expectations are what
prove the lazy path. Fetched bytes are counted at a `TcpProxy` in front of the registry: image
references go through the proxy, so every byte the daemon fetches passes it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DATA_FILES, PushedImage, daemon_log_problems, data_sha256
from tests.e2e.estargz import (
    LANDMARKS,
    EstargzImage,
    blob_data_path,
    convert_and_push,
    read_toc,
)
from tests.e2e.harness import ContainerdError, Registry
from tests.e2e.images import data_image, merged_tree, push_image
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import Stack, start_stack
from tests.e2e.tree import LISTING_SCRIPT, RUNTIME_PATHS, compare, host_xattrs, parse_listing

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

# What busybox (strerror) prints for EIO inside the container.
EIO_MESSAGE = re.compile(r"Input/output error", re.IGNORECASE)
MiB = 1024 * 1024


@pytest.fixture
def proxy(registry: Registry) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", registry.port)) as p:
        yield p


def _rpull(stack: Stack, ref: str) -> None:
    stack.pull(ref, tool="ctr-remote", verb="rpull")


def test_lazy_start_fetches_a_small_fraction_of_the_image(
    stack: Stack, esgz_data: tuple[EstargzImage, EstargzImage], proxy: TcpProxy
) -> None:
    image = esgz_data[0]
    ref = image.ref(proxy.host)

    started = time.monotonic()
    _rpull(stack, ref)
    after_pull = proxy.counts().down
    out = stack.run(ref, "lazy-start")
    elapsed = time.monotonic() - started
    at_first_output = proxy.counts().down

    assert out == "ready\n"
    print(
        f"image {image.size():,} bytes; fetched {after_pull:,} by rpull, {at_first_output:,} "
        f"by first output ({100 * at_first_output / image.size():.1f}%), in {elapsed:.2f}s"
    )
    assert after_pull < 0.05 * image.size()
    assert at_first_output < 0.15 * image.size()


def test_lazy_container_sees_the_original_tree(
    stack: Stack, sample: PushedImage, esgz_sample: EstargzImage, proxy: TcpProxy
) -> None:
    """Content, mode, owner, link targets, devices, hardlinks, mtimes, xattrs, whiteouts."""
    ref = esgz_sample.ref(proxy.host)
    _rpull(stack, ref)
    fetched_by_rpull = proxy.counts().down

    seen = parse_listing(stack.run(ref, "listing", "sh", "-c", LISTING_SCRIPT))

    expected = merged_tree(sample.image)
    assert compare(expected, seen, ignore=RUNTIME_PATHS | LANDMARKS) == []
    stack.run(ref, "xattrs", "sleep", "60", rm=False, detach=True)
    try:
        assert host_xattrs(stack.task_rootfs("xattrs"), expected) == []
    finally:
        stack.ctr("tasks", "rm", "-f", "xattrs")
        stack.ctr("containers", "rm", "xattrs")
    # Last, so a full download (fallback) still shows whether the tree itself is right.
    assert fetched_by_rpull < 0.2 * esgz_sample.size(), "rpull downloaded the layers: not lazy"


def test_lazy_files_shared_by_two_images_are_fetched_once(
    stack: Stack, esgz_data: tuple[EstargzImage, EstargzImage], proxy: TcpProxy
) -> None:
    a, b = (image.ref(proxy.host) for image in esgz_data)
    paths = sorted(f"/{p}" for p in DATA_FILES)
    shared = sum(DATA_FILES.values())
    _rpull(stack, a)
    stack.run(a, "read-a", "sha256sum", *paths)
    assert proxy.counts().down > shared, "image a's files were not read through the proxy"

    proxy.reset()
    _rpull(stack, b)
    out = stack.run(b, "read-b", "sha256sum", *paths)

    fetched = proxy.counts().down
    print(f"second image: fetched {fetched:,} bytes for {shared:,} bytes of shared files")
    assert fetched < 0.1 * shared
    for path in paths:
        assert f"{data_sha256(path.lstrip('/'))}  {path}" in out


def test_lazy_layers_survive_a_daemon_restart(
    stack: Stack, esgz_data: tuple[EstargzImage, EstargzImage], proxy: TcpProxy
) -> None:
    assert stack.lazysnap is not None
    ref = esgz_data[0].ref(proxy.host)
    _rpull(stack, ref)
    assert stack.run(ref, "before") == "ready\n"

    stack.lazysnap.restart()
    stack.wait_ready()

    out = stack.run(ref, "after", "sha256sum", "/data/big-1.bin")
    assert out.split()[0] == data_sha256("data/big-1.bin")


@pytest.mark.allow_log_errors
def test_lazy_corrupt_registry_bytes_give_eio_not_wrong_data(tmp_path: Path) -> None:
    """The registry serves blobs from disk unchecked, so damage there reaches the daemon."""
    files = {"data/victim.bin": 6 * MiB}
    registry = Registry(tmp_path / "registry").start()
    try:
        push_image(registry.url, "e2e/victim", "v1", data_image(files, seed=11))
        image = convert_and_push(tmp_path / "conv", registry, "e2e/victim", "v1", "esgz")
        data_layer = image.layers[1]
        blob_path = blob_data_path(registry, str(data_layer["digest"]))
        offset = _payload_offset(blob_path.read_bytes(), "data/victim.bin")

        with start_stack(tmp_path / "stack") as stack:
            ref = image.ref(registry.host)
            _rpull(stack, ref)
            _flip_bytes(blob_path, offset + 200, 64)

            with pytest.raises(ContainerdError) as failed:
                stack.run(ref, "victim", "sha256sum", "/data/victim.bin")

            message = str(failed.value)
            assert EIO_MESSAGE.search(message)
            assert data_sha256("data/victim.bin", files, seed=11) not in message
            # The cache must not have kept anything bad: still EIO, never other bytes.
            with pytest.raises(ContainerdError, match=EIO_MESSAGE):
                stack.run(ref, "victim-again", "sha256sum", "/data/victim.bin")
    finally:
        registry.stop()


@pytest.mark.allow_log_errors
def test_lazy_registry_gone_mid_read_gives_eio_in_time_then_recovers(
    tmp_path: Path, esgz_data: tuple[EstargzImage, EstargzImage], proxy: TcpProxy
) -> None:
    read_timeout = 5.0
    args = ["--read-timeout", str(read_timeout), "--fetch-timeout", "2"]
    with start_stack(tmp_path, lazysnap_args=args) as stack:
        ref = esgz_data[0].ref(proxy.host)
        _rpull(stack, ref)
        # containerd itself reads /etc/passwd and /etc/group to create a container, and runc
        # needs busybox: fetch those first, so that the stall hits the container's own read.
        assert stack.run(ref, "warm-up") == "ready\n"
        proxy.set_mode("blackhole")

        started = time.monotonic()
        with pytest.raises(ContainerdError, match=EIO_MESSAGE):
            stack.run(ref, "stalled", "sha256sum", "/data/big-0.bin")
        waited = time.monotonic() - started
        print(f"EIO after {waited:.1f}s with read_timeout {read_timeout}s")
        assert waited < read_timeout + 15

        proxy.set_mode("forward")
        out = stack.run(ref, "recovered", "sha256sum", "/data/big-0.bin")
        assert out.split()[0] == data_sha256("data/big-0.bin")
    assert stack.lazysnap is not None
    assert not any("Traceback" in line for line in daemon_log_problems(stack.lazysnap.log_path))


def _payload_offset(blob: bytes, name: str) -> int:
    """Compressed offset of the gzip member holding the first chunk of `name`."""
    for entry in read_toc(blob)["entries"]:  # type: ignore[union-attr]
        if entry.get("name") == name and entry.get("type") == "reg":
            return int(entry["offset"])
    raise AssertionError(f"{name!r} not in the layer's TOC")


def _flip_bytes(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
