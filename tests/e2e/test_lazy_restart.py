"""Lazily pulled images across daemon restarts: graceful (SIGTERM), with the registry down
while the daemon starts, and after `kill -9` left the repository mount behind.

Each test reads a file that no earlier test read, so its bytes must come from the registry
through layers the restarted daemon restored, not from the chunk cache. One registry (a
copy of the session registry's storage, so it can be stopped and started again on the
same port) and one containerd + lazysnap stack serve the whole module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.cli import EXIT_CODES
from snapshotter.errors import NotFound, Unavailable
from snapshotter.fs.mount import mounted
from tests.e2e.conftest import daemon_log_problems, data_sha256
from tests.e2e.daemon_status import layer_rows, status_after, status_cli
from tests.e2e.estargz import EstargzImage
from tests.e2e.harness import Registry
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]


@pytest.fixture(scope="module")
def own_registry(
    registry: Registry,
    esgz_data: tuple[EstargzImage, EstargzImage],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("restart-registry")
    shutil.copytree(registry.workdir / "storage", work / "storage")
    reg = Registry(work).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("restart-stack")) as stack:
        yield stack
    assert stack.lazysnap is not None
    assert daemon_log_problems(stack.lazysnap.log_path) == []


@pytest.fixture
def stack(module_stack: Stack, own_registry: Registry) -> Stack:
    """The module's stack with the daemon and the registry up, whatever a failed test left."""
    assert module_stack.lazysnap is not None
    if not own_registry.running():
        own_registry.start()
    if not module_stack.lazysnap.running():
        module_stack.lazysnap.start()
        module_stack.wait_ready()
    return module_stack


@pytest.fixture
def ref(stack: Stack, own_registry: Registry, esgz_data: tuple[EstargzImage, EstargzImage]) -> str:
    """The data image, pulled lazily (again, if an earlier test pulled it already)."""
    ref = esgz_data[0].ref(own_registry.host)
    stack.pull(ref, tool="ctr-remote", verb="rpull")
    return ref


def _lazy_layers(stack: Stack, image: EstargzImage, since: float) -> dict[str, str]:
    """mode of each of the image's layers in the daemon's status; no fallbacks allowed."""
    assert stack.lazysnap is not None
    doc = status_after(stack.lazysnap.root, since)
    assert doc["fallback_counts"] == {}, doc["fallbacks"]
    digests = [str(layer["digest"]) for layer in image.layers]
    return {d: row["mode"] for d, row in layer_rows(doc, digests).items()}


def _sha256(stack: Stack, ref: str, cid: str, path: str) -> str:
    return stack.run(ref, cid, "sha256sum", path).split()[0]


def test_graceful_restart_keeps_layers_lazy_and_unread_files_readable(
    stack: Stack, ref: str, esgz_data: tuple[EstargzImage, EstargzImage]
) -> None:
    assert stack.lazysnap is not None
    image = esgz_data[0]
    assert stack.run(ref, "before-restart") == "ready\n"

    assert stack.lazysnap.stop() == 0
    # A clean stop takes its status file along: `lazysnap status` says no daemon runs.
    assert not (stack.lazysnap.root / "status.json").exists()
    done = status_cli(stack.lazysnap.root)
    assert done.returncode == EXIT_CODES[NotFound] and "lazysnap serve" in done.stderr
    stack.lazysnap.start()
    stack.wait_ready()
    restarted = time.time()

    assert _sha256(stack, ref, "after-restart", "/data/big-1.bin") == data_sha256("data/big-1.bin")
    assert set(_lazy_layers(stack, image, restarted).values()) == {"lazy"}


def test_daemon_starts_with_the_registry_down_and_reads_once_it_is_back(
    stack: Stack, ref: str, own_registry: Registry, esgz_data: tuple[EstargzImage, EstargzImage]
) -> None:
    assert stack.lazysnap is not None
    own_registry.stop()
    started = time.monotonic()
    stack.lazysnap.restart()
    stack.wait_ready()
    took = time.monotonic() - started
    print(f"daemon restarted with the registry down in {took:.1f}s")
    assert took < 20, "the daemon waited for the registry while starting"
    # The trees came back from the TOCs stored on disk, not from the registry.
    restored = _lazy_layers(stack, esgz_data[0], time.time())
    assert set(restored.values()) == {"lazy"}, restored

    own_registry.start()
    assert _sha256(stack, ref, "after-outage", "/data/big-2.bin") == data_sha256("data/big-2.bin")


def _kill_all(stack: Stack) -> None:
    """SIGKILL the daemon and every process started for its root (a helper that keeps
    the FUSE connection open across restarts, if there is one): a crash of everything."""
    assert stack.lazysnap is not None and stack.lazysnap.proc is not None
    root = os.fsencode(stack.lazysnap.root)
    pids = {stack.lazysnap.proc.pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if root in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    stack.lazysnap.stop()  # reaps the daemon


def _stat_error(path: Path) -> str:
    """stat(1)'s complaint about `path`, in a child with a deadline: a FUSE mount with no
    server left may also make callers wait, and the test must not hang with them."""
    done = subprocess.run(["stat", str(path)], capture_output=True, text=True, timeout=20)
    return done.stderr


def test_start_after_kill_9_clears_the_dead_repository_mount(stack: Stack, ref: str) -> None:
    assert stack.lazysnap is not None
    repo = stack.lazysnap.root / "repo"
    assert stack.run(ref, "before-kill") == "ready\n"

    _kill_all(stack)
    assert os.strerror(errno.ENOTCONN) in _stat_error(repo / "1")
    assert mounted(repo) == ["fuse.lazysnap"]
    # The dead daemon's status file is still there; status must not present it as live.
    done = status_cli(stack.lazysnap.root)
    assert done.returncode == EXIT_CODES[Unavailable] and "not running" in done.stderr

    stack.lazysnap.start()
    stack.wait_ready()
    assert mounted(repo) == ["fuse.lazysnap"], "the dead mount was not replaced"
    assert _sha256(stack, ref, "after-kill", "/data/big-0.bin") == data_sha256("data/big-0.bin")


def test_silent_registry_and_no_stored_toc_do_not_hold_up_the_start(
    stack: Stack, own_registry: Registry, esgz_data: tuple[EstargzImage, EstargzImage]
) -> None:
    """Without stored TOCs (lost, or from an older version) a restart needs the registry
    for the trees; a registry that accepts connections and never answers must not keep
    the daemon from serving containerd: the layer is restored on first use."""
    assert stack.lazysnap is not None
    with TcpProxy(("127.0.0.1", own_registry.port)) as proxy:
        ref = esgz_data[1].ref(proxy.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        for stored in (stack.lazysnap.root / "tocs").iterdir():
            stored.unlink()
        proxy.set_mode("blackhole")
        started = time.monotonic()
        stack.lazysnap.restart()
        stack.wait_ready()
        took = time.monotonic() - started
        print(f"daemon restarted with a silent registry in {took:.1f}s")
        assert took < 20

        proxy.set_mode("forward")
        out = stack.run(ref, "restored-on-use", "cat", "/data/b.txt")
        assert out == "b"
