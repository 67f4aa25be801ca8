"""The repository mount outlives its daemon: a holder keeps the FUSE connection, the next
daemon takes it over, and readers only wait.

Daemons run as child processes (pyfuse3 serves one mount per process, and SIGKILL must
hit a real process); the test process is only a reader, so it may block on the mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fslayers import BIG, lower_layer

from snapshotter.fs import handoff
from snapshotter.fs.mount import mounted, overlays_using

REPO_ROOT = Path(__file__).resolve().parents[2]
_ENV = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests' / 'fs'}"}

_DAEMON = """
import signal, sys, trio
from functools import partial
from pathlib import Path
from fslayers import FakeChunkReader, lower_layer, upper_layer
from snapshotter.fs.mount import run_repository
from snapshotter.fs.repository import Repository

class Reader(FakeChunkReader):
    async def read_chunk(self, chunk):
        if self.mode == "hang":
            print("hung", chunk.digest, flush=True)
        return await super().read_chunk(chunk)

async def main():
    mountpoint, holder, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    repo = Repository()
    if mode == "other":  # another layer under the same id, as after a reused dir id
        layer = upper_layer()
        repo.attach("5", layer.toc(), Reader(layer.chunks), generation=8)
    elif mode != "empty":
        layer = lower_layer()
        reader = Reader(layer.chunks)
        reader.set_mode(mode)
        repo.attach("5", layer.toc(), reader, generation=7)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_repository, mountpoint, repo, holder=holder))
            print("serving", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()

trio.run(main)
print("stopped", flush=True)
"""


# Daemons are started by a launcher forked before anything opens a file on the mount:
# fork+exec closes the parent's descriptors, and closing a file on a FUSE mount waits for
# the daemon (FLUSH) - the very daemon being started.
_LAUNCHER = """
import json, subprocess, sys
for line in sys.stdin:
    argv, out, env = json.loads(line)
    with open(out, "wb") as f:
        print(subprocess.Popen(argv, stdout=f, env=env, cwd="/").pid, flush=True)
"""


@dataclass
class Daemon:
    pid: int
    out: Path

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_line(self, prefix: str, timeout: float = 20.0) -> None:
        _wait(lambda: any(line.startswith(prefix) for line in self.lines()), timeout,
              f"{prefix!r} from daemon {self.pid}")

    def stop(self, sig: int) -> None:
        os.kill(self.pid, sig)
        _wait(lambda: not _alive(self.pid), 10, f"daemon {self.pid} to exit")


@dataclass
class Site:
    base: Path
    launcher: subprocess.Popen[str]
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def mountpoint(self) -> Path:
        return self.base / "repo"

    @property
    def holder(self) -> Path:
        return self.base / "holder.sock"

    def daemon(self, mode: str = "ok") -> Daemon:
        argv = [sys.executable, "-c", _DAEMON, str(self.mountpoint), str(self.holder), mode]
        out = self.base / f"daemon-{len(self.daemons)}.out"
        assert self.launcher.stdin is not None and self.launcher.stdout is not None
        self.launcher.stdin.write(json.dumps([argv, str(out), _ENV]) + "\n")
        self.launcher.stdin.flush()
        d = Daemon(int(self.launcher.stdout.readline()), out)
        self.daemons.append(d)
        d.wait_line("serving")
        return d


@pytest.fixture
def site() -> Iterator[Site]:
    # not under tmp_path: other users must be able to reach the mount (pytest's is 0700),
    # and the holder's socket path must fit in sun_path
    base = Path(tempfile.mkdtemp(prefix="lz-handoff-", dir="/tmp"))
    base.chmod(0o755)
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    s = Site(base, launcher)
    try:
        yield s
    finally:
        for d in s.daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.pid, signal.SIGKILL)
        pid = handoff.holder_pid(s.holder)
        for _ in range(5):
            if not mounted(s.mountpoint):
                break
            subprocess.run(["umount", "-l", str(s.mountpoint)], check=False)
        with contextlib.suppress(FileNotFoundError):
            s.holder.unlink()  # the holder exits when its socket goes
        if pid is not None:
            _wait(lambda: not _alive(pid), 5, "the holder to exit")
        launcher.communicate(timeout=10)
        shutil.rmtree(base)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _Read(threading.Thread):
    """A read(2) that may block on the mount while no daemon serves it."""

    def __init__(self, fn: Callable[[], bytes]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: bytes | BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.result = exc

    def outcome(self, timeout: float = 20.0) -> bytes | BaseException | None:
        self.join(timeout)
        return self.result


# -- the holder alone ---------------------------------------------------------------------


def test_holder_gives_out_duplicates_and_exits_when_the_connection_ends(site: Site) -> None:
    pid = handoff.ensure_holder(site.holder)
    assert handoff.ensure_holder(site.holder) == pid  # one holder per socket
    assert handoff.fetch(site.holder) is None  # holds nothing yet
    r, w = os.pipe()
    handoff.deposit(site.holder, handoff.Held(r, b"init-bytes", "0:99"))
    os.close(r)  # only the holder's duplicate keeps the pipe's read end now
    held = handoff.fetch(site.holder)
    assert held is not None and (held.init, held.device) == (b"init-bytes", "0:99")
    os.write(w, b"through the holder")
    assert os.read(held.fd, 100) == b"through the holder"
    os.close(held.fd)

    os.close(w)  # the pipe reports POLLHUP, as /dev/fuse reports POLLERR once aborted
    _wait(lambda: not _alive(pid), 5, "the holder to exit")
    assert handoff.holder_pid(site.holder) is None


def test_holder_exits_when_its_socket_is_removed(site: Site) -> None:
    pid = handoff.ensure_holder(site.holder)
    site.holder.unlink()
    _wait(lambda: not _alive(pid), 5, "the holder to exit")


def test_tree_inodes_are_the_same_in_every_process() -> None:
    """A takeover answers the kernel's old inode numbers only if trees number alike."""
    script = (
        "import json; from fslayers import lower_layer; "
        "from snapshotter.fs.tree import LayerTree; "
        "t = LayerTree.from_toc(lower_layer().toc()); "
        "print(json.dumps([[i, t.entry(i).name] for i in range(1, len(t) + 1)]))"
    )
    seen = [
        json.loads(subprocess.run([sys.executable, "-c", script], check=True, text=True,
                                  capture_output=True, env={**_ENV, "PYTHONHASHSEED": seed},
                                  ).stdout)
        for seed in ("1", "2")
    ]
    assert seen[0] == seen[1]
    assert len(seen[0]) == len(lower_layer().entries)


# -- real mounts ------------------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.root
def test_sigkill_pauses_readers_and_the_next_daemon_answers_them(site: Site) -> None:
    first = site.daemon(mode="hang")
    layer = site.mountpoint / "5"
    before = os.stat(layer / "data/big").st_ino
    big = open(layer / "data/big", "rb", buffering=0)  # noqa: SIM115  opened by the first daemon
    try:
        in_flight = _Read((layer / "etc/passwd").read_bytes)
        first.wait_line("hung ")  # the daemon has read the request

        first.stop(signal.SIGKILL)
        assert mounted(site.mountpoint) == ["fuse.lazysnap"]  # the holder keeps it
        waiting = _Read(lambda: os.pread(big.fileno(), 10, len(BIG) - 10))
        assert in_flight.outcome(timeout=1.0) is None and waiting.outcome(0.5) is None

        site.daemon(mode="ok")
        assert in_flight.outcome() == b"root:x:0:0::/root:/bin/sh\n"  # resent by the kernel
        assert waiting.outcome() == BIG[-10:]  # a handle the new daemon never gave out
        assert os.pread(big.fileno(), len(BIG), 0) == BIG
        assert os.stat(layer / "data/big").st_ino == before
        assert sorted(os.listdir(site.mountpoint)) == ["5"]
    finally:
        big.close()


@pytest.mark.fuse
@pytest.mark.root
def test_a_reused_layer_id_with_another_generation_shows_the_new_layer(site: Site) -> None:
    """Dir ids may come back after a restart with another layer; the kernel's cached
    names and inodes for the old one must not leak into it."""
    first = site.daemon()
    hostname = site.mountpoint / "5/etc/hostname"
    assert hostname.read_bytes() == b"lower\n"  # etc and etc/hostname now cached for a day
    first.stop(signal.SIGKILL)
    site.daemon(mode="other")
    assert hostname.read_bytes() == b"upper\n"
    assert sorted(os.listdir(site.mountpoint / "5/opq")) == ["kept-by-upper", "new"]


@contextlib.contextmanager
def _overlay(site: Site) -> Iterator[Path]:
    """A container's root: an overlay whose lower layer is in the repository."""
    merged, upper, work = (site.base / name for name in ("merged", "upper", "work"))
    for d in (merged, upper, work):
        d.mkdir()
    options = f"lowerdir={site.mountpoint / '5'},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
                   check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


@pytest.mark.fuse
@pytest.mark.root
def test_sigterm_keeps_the_mount_while_an_overlay_uses_it(site: Site) -> None:
    first = site.daemon()
    with _overlay(site) as merged:
        assert overlays_using(site.mountpoint) == 1
        with open(merged / "data/big", "rb", buffering=0) as f:
            assert f.read(100) == BIG[:100]
            first.stop(signal.SIGTERM)
            assert first.lines()[-1] == "stopped"
            assert mounted(site.mountpoint) == ["fuse.lazysnap"]
            paused = _Read(lambda: os.pread(f.fileno(), 100, 500000))
            assert paused.outcome(timeout=1.0) is None
            site.daemon()
            assert paused.outcome() == BIG[500000:500100]
        assert (merged / "data/big").read_bytes() == BIG


@pytest.mark.fuse
@pytest.mark.root
def test_a_daemon_unmounts_when_it_stops_and_no_overlay_uses_the_mount(site: Site) -> None:
    daemon = site.daemon()
    assert (site.mountpoint / "5/etc/passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    pid = handoff.holder_pid(site.holder)
    assert pid is not None and mounted(site.mountpoint) == ["fuse.lazysnap"]
    daemon.stop(signal.SIGTERM)
    assert daemon.lines()[-1] == "stopped"
    assert mounted(site.mountpoint) == []
    _wait(lambda: not _alive(pid), 5, "the holder to exit")


def test_lazysnap_hold_listens_where_the_daemon_looks(site: Site) -> None:
    """What lazysnap-fuse-holder.service runs: a holder at <root>/fuse-holder.sock."""
    root = site.base / "root"
    proc = subprocess.Popen([sys.executable, "-m", "snapshotter", "hold", "--root", str(root)],
                            env=_ENV, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: handoff.holder_pid(root / handoff.HOLDER_SOCKET) == proc.pid, 20,
              "lazysnap hold to listen")
    finally:
        proc.terminate()
        proc.wait(10)


def test_units_keep_the_holder_out_of_the_daemons_cgroup() -> None:
    """lazysnap.service may be killed whole (control-group) because the holder has a unit
    of its own, which a restart of lazysnap does not touch."""
    import configparser

    def unit(name: str) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read(REPO_ROOT / "packaging" / name)
        return parser

    daemon, holder = unit("lazysnap.service"), unit("lazysnap-fuse-holder.service")
    holder_name = "lazysnap-fuse-holder.service"
    assert holder_name in daemon["Unit"]["Wants"].split()
    assert holder_name in daemon["Unit"]["After"].split()
    for key in ("Requires", "BindsTo", "PartOf"):  # a restart of lazysnap would reach it
        assert holder_name not in daemon["Unit"].get(key, "")
        assert "lazysnap.service" not in holder["Unit"].get(key, "")
    assert daemon["Service"].get("KillMode", "control-group") == "control-group"
    assert holder["Service"]["Type"] == "notify"  # lazysnap starts once the socket listens
    assert holder["Service"]["ExecStart"].split()[:2] == ["/usr/local/bin/lazysnap", "hold"]
