"""The repository mount's lifecycle: clear a stale mount, mount, serve, unmount.

pyfuse3 keeps its session in module globals, so a process serves at most one mount at
a time; `run_repository` refuses a second one. It may mount again after the first has
ended (tests do this).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
from pathlib import Path

import pyfuse3
import trio

from snapshotter.errors import FailedPrecondition, Unavailable
from snapshotter.fs.ops import RepositoryOperations
from snapshotter.fs.repository import Repository

__all__ = ["FSNAME", "MountBusy", "StaleMount", "clear_stale_mount", "mounted", "run_repository"]

log = logging.getLogger(__name__)

FSNAME = "lazysnap"  # /proc/mounts shows "lazysnap <mountpoint> fuse.lazysnap ..."

# allow_other: overlayfs, containerd and container processes of any uid read the layers.
# default_permissions: the kernel checks mode/uid/gid itself, so allow_other does not
#   let every user read every file (the handlers do no permission checks of their own).
# ro: the kernel refuses writes before they reach Python.
_OPTIONS = frozenset(
    {f"fsname={FSNAME}", f"subtype={FSNAME}", "allow_other", "default_permissions", "ro"}
)
_MNT_DETACH = 2
_active = False


class MountBusy(FailedPrecondition):
    """This process serves a pyfuse3 mount already, or the mountpoint holds a non-FUSE mount."""


class StaleMount(Unavailable):
    """A mount left behind at the mountpoint could not be removed."""


def mounted(mountpoint: Path) -> list[str]:
    """Filesystem types mounted exactly at `mountpoint` (stacked mounts: several)."""
    want = os.path.abspath(mountpoint)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            # mount point is field 5 (octal escapes for space etc.); fstype follows " - "
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            if point == want:
                found.append(fields[fields.index("-") + 1])
    return found


async def clear_stale_mount(mountpoint: Path) -> None:
    """Lazily unmount FUSE mounts left at `mountpoint` by a crashed daemon.

    Only FUSE mounts are removed: anything else there is not ours, and unmounting it
    could hide data (MountBusy). Overlays still using the old layers keep failing with
    ENOTCONN until they are remounted; restoring them is the daemon's job.
    """
    for _ in range(8):  # stacked mounts come off one per unmount
        types = mounted(mountpoint)
        if not types:
            return
        if not types[-1].startswith("fuse"):
            raise MountBusy(f"mountpoint {str(mountpoint)!r} holds a {types[-1]} mount")
        log.info("removing stale %s mount at %s", types[-1], mountpoint)
        await _lazy_unmount(mountpoint)
    raise StaleMount(f"mountpoint {str(mountpoint)!r}: mounts keep reappearing")


async def _lazy_unmount(mountpoint: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(os.path.abspath(mountpoint)), _MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    if err != errno.EPERM or shutil.which("fusermount3") is None:
        raise StaleMount(f"mountpoint {str(mountpoint)!r}: umount: {os.strerror(err)}")
    with trio.fail_after(30):  # unprivileged: the setuid helper may unmount our own mounts
        done = await trio.run_process(
            ["fusermount3", "-u", "-z", os.path.abspath(mountpoint)],
            check=False,
            capture_stderr=True,
        )
    if done.returncode != 0:
        raise StaleMount(
            f"mountpoint {str(mountpoint)!r}: fusermount3: {done.stderr.decode().strip()}"
        )


async def run_repository(
    mountpoint: Path,
    repository: Repository,
    *,
    read_timeout: float = 30.0,
    max_tasks: int = 64,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount `repository` at `mountpoint` and serve it until cancelled, then unmount.

    Run it in the trio thread that owns `repository`; `task_status.started()` reports
    the mountpoint once the kernel has the mount (requests are answered from then on).
    Returns early if someone unmounts the mountpoint from outside. Up to `max_tasks`
    requests are served concurrently; a read still waiting after `read_timeout`
    seconds answers EIO.

        async with trio.open_nursery() as nursery:
            await nursery.start(run_repository, root / "repo", repo)
            ...  # repo.attach(...) from this thread, or trio.from_thread.run_sync
            nursery.cancel_scope.cancel()  # unmounts
    """
    global _active
    if _active:
        raise MountBusy("this process serves a FUSE mount already (pyfuse3 allows one)")
    await clear_stale_mount(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    ops = RepositoryOperations(repository, read_timeout=read_timeout)
    _active = True
    try:
        pyfuse3.init(ops, os.fspath(mountpoint), set(_OPTIONS))
    except BaseException:
        _active = False
        raise
    try:
        log.info("serving repository at %s", mountpoint)
        task_status.started(mountpoint)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        log.info("repository at %s was unmounted from outside", mountpoint)
    finally:
        # Lazy unmount (libfuse does MNT_DETACH as root), then closing the device fails
        # every request still pending, so no thread stays blocked on the mount.
        try:
            pyfuse3.close(unmount=True)
        finally:
            _active = False
            log.info("repository at %s closed", mountpoint)
