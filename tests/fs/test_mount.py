"""fs/mount.py with a real kernel: what stat, readdir, read and overlayfs see.

The mount runs in this process's trio loop, so every syscall on it runs in a worker
thread (or a subprocess); calling it from the trio thread would deadlock.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from fslayers import (
    BIG,
    BIG_CHUNK,
    MTIME_NS,
    FakeChunkReader,
    LayerBuilder,
    lower_layer,
    upper_layer,
)

from snapshotter.fs.mount import FSNAME, MountBusy, mounted, run_repository
from snapshotter.fs.repository import Repository

pytestmark = pytest.mark.fuse

READ_TIMEOUT = 1.5
_T = TypeVar("_T")


@dataclass
class Mounted:
    path: Path
    repo: Repository
    lower: FakeChunkReader
    upper: FakeChunkReader


async def in_thread(fn: Callable[[], _T]) -> _T:
    return await trio.to_thread.run_sync(fn)


def fuse_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if "fuse" in line.split()[2]]


@pytest.fixture
async def mnt() -> AsyncIterator[Mounted]:
    repo = Repository()
    lower, upper = lower_layer(), upper_layer()
    # not under tmp_path: other users must be able to reach the mount (pytest's is 0700)
    base = Path(tempfile.mkdtemp(prefix="lazysnap-fs-"))
    base.chmod(0o755)
    m = Mounted(base / "repo", repo, lower.reader(), upper.reader())
    repo.attach("1", lower.toc(), m.lower)
    repo.attach("2", upper.toc(), m.upper)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_repository, m.path, repo, read_timeout=READ_TIMEOUT))
        try:
            yield m
        finally:
            m.lower.set_mode("ok")
            m.upper.set_mode("ok")
            nursery.cancel_scope.cancel()
    assert mounted(m.path) == []
    # Only ours: other test runs on this machine mount and unmount their own meanwhile.
    assert [line for line in fuse_mounts() if str(base) in line] == []
    shutil.rmtree(base)


async def test_mount_is_listed_with_our_options(mnt: Mounted) -> None:
    line = next(line for line in fuse_mounts() if f" {mnt.path} " in line)
    source, _, fstype, options = line.split()[:4]
    assert (source, fstype) == (FSNAME, f"fuse.{FSNAME}")
    assert {"ro", "allow_other", "default_permissions"} <= set(options.split(","))


async def test_tree_as_the_kernel_sees_it(mnt: Mounted) -> None:
    top = mnt.path / "2"

    def look() -> dict[str, object]:
        return {
            "root": sorted(os.listdir(mnt.path)),
            "top": sorted(os.listdir(top)),
            "opq": sorted(os.listdir(top / "opq")),
            "host": os.lstat(top / "etc/hostname"),
            "link": os.readlink(top / "etc/motd-link"),
            "link_st": os.lstat(top / "etc/motd-link"),
            "null": os.lstat(top / "dev/null"),
            "sda": os.lstat(top / "dev/sda"),
            "pipe": os.lstat(top / "dev/pipe"),
            "victim": os.lstat(top / "victim"),
            "motd": os.lstat(top / "motd"),
            "hard2": os.lstat(top / "bin/hard2"),
            "xattrs": sorted(os.listxattr(top / "motd")),
            "sec": os.getxattr(top / "motd", "security.x"),
            "opaque": os.getxattr(top / "opq", "trusted.overlay.opaque"),
            "top_st": os.lstat(top),
            "root_st": os.lstat(mnt.path),
        }

    seen = await in_thread(look)
    assert seen["root"] == ["1", "2"]
    assert seen["top"] == ["bin", "dev", "etc", "gone", "motd", "motd-hard", "opq", "victim"]
    assert seen["opq"] == ["kept-by-upper", "new"]
    host = seen["host"]
    assert isinstance(host, os.stat_result)
    assert (host.st_mode, host.st_uid, host.st_gid, host.st_size) == (0o100640, 1, 2, 6)
    assert host.st_mtime_ns == MTIME_NS
    assert seen["link"] == "../motd"
    assert stat.S_ISLNK(seen["link_st"].st_mode)  # type: ignore[attr-defined]
    null, sda = seen["null"], seen["sda"]
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)  # type: ignore[attr-defined]
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0)  # type: ignore[attr-defined]
    assert stat.S_ISFIFO(seen["pipe"].st_mode)  # type: ignore[attr-defined]
    victim = seen["victim"]
    assert (victim.st_mode, victim.st_rdev) == (stat.S_IFCHR, 0)  # type: ignore[attr-defined]
    motd, hard2 = seen["motd"], seen["hard2"]
    assert motd.st_nlink == 3 and motd.st_ino == hard2.st_ino  # type: ignore[attr-defined]
    assert seen["xattrs"] == ["security.x", "user.origin"]
    assert seen["sec"] == b"\x00\x01"
    assert seen["opaque"] == b"y"
    assert seen["top_st"].st_nlink == 2 + 4  # type: ignore[attr-defined]  # bin dev etc opq
    assert seen["root_st"].st_nlink == 2 + 2  # type: ignore[attr-defined]


async def test_contents_across_chunk_boundaries(mnt: Mounted) -> None:
    path = mnt.path / "1/data/big"

    def read() -> tuple[bytes, bytes, bytes, bytes]:
        whole = path.read_bytes()
        with open(path, "rb", buffering=0) as f:
            across = os.pread(f.fileno(), 20, BIG_CHUNK - 10)
            tail = os.pread(f.fileno(), 100, len(BIG) - 7)
        empty = (mnt.path / "1/data/empty").read_bytes()
        return whole, across, tail, empty

    whole, across, tail, empty = await in_thread(read)
    assert whole == BIG
    assert across == BIG[BIG_CHUNK - 10 : BIG_CHUNK + 10]
    assert tail == BIG[-7:]
    assert empty == b""
    hello = await in_thread((mnt.path / "2/bin/hard2").read_bytes)
    assert hello == b"hello\n"


async def test_reads_fetch_only_needed_chunks_and_stay_cached(mnt: Mounted) -> None:
    path = mnt.path / "1/data/big"

    def first_byte() -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read(1)

    assert await in_thread(first_byte) == BIG[:1]
    assert len(mnt.lower.calls) == 1  # readahead (128 KiB) stays inside the first chunk
    assert await in_thread(path.read_bytes) == BIG
    read_once = mnt.repo.statistics("1").bytes_read
    assert await in_thread(path.read_bytes) == BIG  # reopened: served by the page cache
    assert mnt.repo.statistics("1").bytes_read == read_once


async def test_writes_are_refused(mnt: Mounted) -> None:
    def attempts() -> list[int]:
        codes = []
        for action in (
            lambda: os.open(mnt.path / "2/motd", os.O_RDWR),
            lambda: os.mkdir(mnt.path / "2/new"),
            lambda: os.unlink(mnt.path / "2/motd"),
            lambda: os.setxattr(mnt.path / "2/motd", "user.a", b"1"),
            lambda: os.mkdir(mnt.path / "3"),
        ):
            try:
                action()
            except OSError as exc:
                codes.append(exc.errno)
        return codes

    assert await in_thread(attempts) == [errno.EROFS] * 5


async def test_permissions_are_the_files_own(mnt: Mounted) -> None:
    """allow_other lets other users in; default_permissions keeps modes meaningful."""
    nobody = partial(trio.run_process, check=False, capture_stdout=True, capture_stderr=True,
                     user=65534, group=65534)  # fmt: skip
    ok = await nobody(["cat", str(mnt.path / "1/etc/passwd")])
    assert ok.returncode == 0 and ok.stdout.startswith(b"root:")
    denied = await nobody(["cat", str(mnt.path / "1/data/secret")])
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


async def test_attach_and_detach_show_at_once(mnt: Mounted) -> None:
    assert await in_thread((mnt.path / "2/motd").read_bytes) == b"hello\n"
    mnt.repo.detach("2")
    assert not await in_thread((mnt.path / "2").exists)
    assert await in_thread(partial(os.listdir, mnt.path)) == ["1"]
    other = LayerBuilder().file("motd", b"other\n")
    mnt.repo.attach("2", other.toc(), other.reader())
    assert await in_thread((mnt.path / "2/motd").read_bytes) == b"other\n"
    assert sorted(await in_thread(partial(os.listdir, mnt.path))) == ["1", "2"]


def _lookups() -> float:
    from snapshotter.metrics import REGISTRY

    value = REGISTRY.get_sample_value(
        "lazysnap_fuse_operation_duration_seconds_count", {"operation": "lookup"})
    return value or 0.0


async def test_missing_names_are_remembered_but_not_past_a_new_layer(mnt: Mounted) -> None:
    ghost = mnt.path / "2/etc/ghost"
    assert not await in_thread(ghost.exists)
    # Relative to an open directory, so that only the missing name is looked up (a
    # layer's own directory is revalidated on every walk through it).
    fd = await in_thread(partial(os.open, mnt.path / "2/etc", os.O_RDONLY | os.O_DIRECTORY))
    try:
        before = _lookups()
        for _ in range(3):
            with pytest.raises(FileNotFoundError):  # the kernel's negative entry answers
                await in_thread(partial(os.stat, "ghost", dir_fd=fd))
        assert _lookups() == before
    finally:
        os.close(fd)
    # The same directory name with another layer behind it: the miss is forgotten.
    mnt.repo.detach("2")
    other = LayerBuilder().dir("etc").file("etc/ghost", b"here now\n")
    mnt.repo.attach("2", other.toc(), other.reader())
    assert await in_thread(ghost.read_bytes) == b"here now\n"


@pytest.mark.allow_log_errors
async def test_failing_reader_gives_eio_then_recovers(mnt: Mounted) -> None:
    mnt.lower.set_mode("fail")
    with pytest.raises(OSError) as info:
        await in_thread((mnt.path / "1/etc/passwd").read_bytes)
    assert info.value.errno == errno.EIO
    mnt.lower.set_mode("ok")
    assert await in_thread((mnt.path / "1/etc/passwd").read_bytes) == b"root:x:0:0::/root:/bin/sh\n"


@pytest.mark.allow_log_errors
async def test_hanging_reader_gives_eio_within_the_timeout(mnt: Mounted) -> None:
    mnt.upper.set_mode("hang")
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        await in_thread((mnt.path / "2/motd").read_bytes)
    elapsed = time.monotonic() - start
    assert info.value.errno == errno.EIO
    # The kernel asks again after a failed readahead, so read(2) may span two requests.
    # Each one is cut off at the timeout (timed inside the loop, so a loaded machine's
    # slow thread hand-offs do not count against it); read(2) waits for no more than those.
    hung = mnt.upper.hung
    assert 1 <= len(hung) <= 2
    assert all(READ_TIMEOUT * 0.9 <= t < READ_TIMEOUT + 1 for t in hung), hung
    assert READ_TIMEOUT * 0.9 <= elapsed < len(hung) * READ_TIMEOUT + 3
    mnt.upper.set_mode("ok")
    assert await in_thread((mnt.path / "2/motd").read_bytes) == b"hello\n"


_CRASHER = """
import sys, trio
from pathlib import Path
from snapshotter.fs.repository import Repository
from snapshotter.fs.mount import run_repository

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(run_repository, Path(sys.argv[1]), Repository())
        print("mounted", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


@pytest.mark.allow_log_errors
async def test_stale_mount_from_a_crash_is_replaced(tmp_path: Path) -> None:
    mp = tmp_path / "repo"
    crasher = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(mp)], stdout=subprocess.PIPE, cwd=os.getcwd()
    )
    try:
        assert crasher.stdout is not None
        assert await in_thread(crasher.stdout.readline) == b"mounted\n"
    finally:
        crasher.send_signal(signal.SIGKILL)
        crasher.wait()
    try:
        assert mounted(mp) != []
        with pytest.raises(OSError) as info:
            await in_thread(partial(os.listdir, mp))
        assert info.value.errno == errno.ENOTCONN
        repo = Repository()
        layer = LayerBuilder().file("f", b"fresh")
        repo.attach("7", layer.toc(), layer.reader())
        async with trio.open_nursery() as nursery:
            await nursery.start(run_repository, mp, repo)
            assert await in_thread((mp / "7/f").read_bytes) == b"fresh"
            nursery.cancel_scope.cancel()
    finally:
        for _ in range(5):  # never leave the dead mount behind, whatever failed
            if not mounted(mp):
                break
            subprocess.run(["umount", "-l", str(mp)], check=False)
    assert mounted(mp) == []


async def test_one_mount_per_process(mnt: Mounted, tmp_path: Path) -> None:
    with pytest.raises(MountBusy):
        await run_repository(tmp_path / "second", Repository())


@pytest.mark.root
async def test_overlay_merges_whiteouts_and_opaque_dirs(mnt: Mounted, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    lowerdir = f"{mnt.path / '2'}:{mnt.path / '1'}"  # upper layer first
    await trio.run_process(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}", str(merged)],
        capture_stderr=True,
    )
    try:

        def look() -> dict[str, object]:
            return {
                "top": sorted(os.listdir(merged)),
                "opq": sorted(os.listdir(merged / "opq")),
                "etc": sorted(os.listdir(merged / "etc")),
                "hostname": (merged / "etc/hostname").read_bytes(),
                "passwd": (merged / "etc/passwd").read_bytes(),
                "kept": (merged / "opq/kept-by-upper").read_bytes(),
                "big": (merged / "data/big").read_bytes(),
                "motd": (merged / "motd").read_bytes(),
                "null": os.lstat(merged / "dev/null").st_rdev,
                "link": os.readlink(merged / "etc/motd-link"),
            }

        seen = await in_thread(look)
    finally:
        await trio.run_process(["umount", str(merged)], check=False)
    assert seen["top"] == ["bin", "data", "dev", "etc", "motd", "motd-hard", "opq"]
    assert seen["opq"] == ["kept-by-upper", "new"]  # "old" hidden by the opaque dir
    assert seen["etc"] == ["hostname", "motd-link", "passwd"]
    assert seen["hostname"] == b"upper\n"
    assert seen["passwd"] == b"root:x:0:0::/root:/bin/sh\n"
    assert seen["kept"] == b"upper version"
    assert seen["big"] == BIG
    assert seen["motd"] == b"hello\n"
    assert seen["null"] == os.makedev(1, 3)
    assert seen["link"] == "../motd"


async def test_unmount_from_outside_ends_the_mount(tmp_path: Path) -> None:
    mp = tmp_path / "repo"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_repository, mp, Repository())
            await trio.run_process(["fusermount3", "-u", str(mp)])
            # run_repository returns by itself; the nursery would hang otherwise
    assert mounted(mp) == []
