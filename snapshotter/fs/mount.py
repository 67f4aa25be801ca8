"""The repository mount's lifecycle: clear a stale mount, mount, serve, unmount or hand off.

pyfuse3 keeps its session in module globals, so a process serves at most one mount at
a time; `run_repository` refuses a second one. It may mount again after the first has
ended (tests do this).

Handoff (root only): the daemon mounts `/dev/fuse` itself, reads the kernel's FUSE_INIT
request, gives a duplicate of the descriptor to a holder process (`fs/handoff.py`) and
serves the connection through libfuse's `/dev/fd/N` mountpoint form. After a stop or a
crash the next daemon fetches the descriptor from the holder and serves the same
connection: the kernel kept the mount, and readers only waited.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import select
import shutil
import socket
from pathlib import Path

import pyfuse3
import trio

from snapshotter.errors import FailedPrecondition, Unavailable
from snapshotter.fs import handoff
from snapshotter.fs.ops import LISTING_ENTRIES, RepositoryOperations
from snapshotter.fs.repository import Repository

__all__ = [
    "FSNAME",
    "MountBusy",
    "StaleMount",
    "clear_stale_mount",
    "mounted",
    "overlays_using",
    "run_repository",
]

log = logging.getLogger(__name__)

FSNAME = "lazysnap"  # /proc/mounts shows "lazysnap <mountpoint> fuse.lazysnap ..."

# allow_other: overlayfs, containerd and container processes of any uid read the layers.
# default_permissions: the kernel checks mode/uid/gid itself, so allow_other does not
#   let every user read every file (the handlers do no permission checks of their own).
# ro: the kernel refuses writes before they reach Python.
_OPTIONS = frozenset(
    {f"fsname={FSNAME}", f"subtype={FSNAME}", "allow_other", "default_permissions", "ro"}
)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MNT_DETACH = 2
_INIT_WAIT = 10.0  # seconds for the kernel's FUSE_INIT after mount(2); it is queued at once
_active = False


class MountBusy(FailedPrecondition):
    """This process serves a pyfuse3 mount already, or the mountpoint holds a non-FUSE mount."""


class StaleMount(Unavailable):
    """A mount left behind at the mountpoint could not be removed."""


def _mounts_at(mountpoint: Path) -> list[tuple[str, str]]:
    """(fstype, "major:minor") of the mounts exactly at `mountpoint`, bottom first."""
    want = os.path.abspath(mountpoint)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            # mount point is field 5 (octal escapes for space etc.); fstype follows " - "
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            if point == want:
                found.append((fields[fields.index("-") + 1], fields[2]))
    return found


def overlays_using(mountpoint: Path) -> int:
    """How many overlay mounts (in our mount namespace) may have lower layers under
    `mountpoint`; one whose lowerdir is relative counts, as it may be.

    A plain umount(2) cannot tell: overlayfs uses private clones of its lower mounts,
    so the mount itself never looks busy while containers run on it.
    """
    prefix = os.path.abspath(mountpoint) + "/"
    count = 0
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] != "overlay":
                continue
            for option in fields[sep + 3].split(","):
                name, _, value = option.partition("=")
                if name not in ("lowerdir", "lowerdir+"):
                    continue
                lowers = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), value)
                if any(p.startswith(prefix) or not p.startswith("/")
                       for p in lowers.split(":") if p):
                    count += 1
                    break
    return count


def mounted(mountpoint: Path) -> list[str]:
    """Filesystem types mounted exactly at `mountpoint` (stacked mounts: several)."""
    return [fstype for fstype, _ in _mounts_at(mountpoint)]


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


def _mount(mountpoint: Path) -> handoff.Held:
    """mount(2) a new FUSE connection and read its FUSE_INIT request (blocking)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        # What libfuse would pass as root; fsname/subtype become source and fstype.
        data = (f"fd={fd},rootmode=40000,user_id=0,group_id=0,"
                "allow_other,default_permissions")
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(FSNAME.encode(), os.fsencode(os.path.abspath(mountpoint)),
                      f"fuse.{FSNAME}".encode(), _MS_RDONLY | _MS_NOSUID | _MS_NODEV,
                      data.encode()) != 0:
            err = ctypes.get_errno()
            raise StaleMount(f"mountpoint {str(mountpoint)!r}: mount: {os.strerror(err)}")
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(_INIT_WAIT * 1000):
            raise StaleMount(f"mountpoint {str(mountpoint)!r}: the kernel sent no FUSE_INIT")
        init = os.read(fd, 1 << 20)
        device = next(dev for fstype, dev in reversed(_mounts_at(mountpoint))
                      if fstype.startswith("fuse"))
    except BaseException:
        os.close(fd)
        raise
    return handoff.Held(fd, init, device)


def _take_over(mountpoint: Path, holder: Path) -> handoff.Held | None:
    """The connection a holder keeps, if it is still the mount at `mountpoint` (blocking)."""
    held = handoff.fetch(holder)
    if held is None:
        return None
    at = _mounts_at(mountpoint)
    if at and at[-1] == (f"fuse.{FSNAME}", held.device):
        return held
    log.warning("fuse holder at %s keeps connection %s, but %s shows %s; mounting anew",
                holder, held.device, mountpoint, at[-1] if at else "no mount")
    os.close(held.fd)
    return None


class _HandoffOperations(RepositoryOperations):
    """Switches libfuse from the socket that carried FUSE_INIT to the real device.

    libfuse answers EIO to everything until it has seen a FUSE_INIT, and the kernel sends
    one per mount, so libfuse first reads the recorded INIT from a socketpair; while it
    handles it (before it writes the INIT reply) the socket's descriptor number is made
    to point at `/dev/fuse`. On a fresh mount that reply completes the kernel's INIT;
    after a takeover the kernel finds no such request and drops it (ENOENT, which
    libfuse ignores).
    """

    def __init__(self, repository: Repository, *, read_timeout: float, device_fd: int,
                 libfuse_fd: int, listing_entries: int = LISTING_ENTRIES) -> None:
        super().__init__(repository, read_timeout=read_timeout,
                         listing_entries=listing_entries)
        self.device_fd = device_fd
        self.libfuse_fd = libfuse_fd
        self.switched = trio.Event()

    def init(self) -> None:
        os.dup2(self.device_fd, self.libfuse_fd, inheritable=False)
        os.close(self.device_fd)
        self.device_fd = -1
        self.switched.set()


async def _resend_after_init(ops: _HandoffOperations, took_over: bool) -> None:
    await ops.switched.wait()  # wakes after libfuse has written the INIT reply
    if not took_over:
        return
    if handoff.resend_pending(ops.libfuse_fd):
        log.info("asked the kernel to resend requests the previous daemon left unanswered")
    else:
        log.warning("kernel cannot resend requests (needs Linux 6.9): readers that were "
                    "waiting when the previous daemon died stay blocked")


async def run_repository(
    mountpoint: Path,
    repository: Repository,
    *,
    read_timeout: float = 30.0,
    max_tasks: int = 64,
    listing_entries: int = LISTING_ENTRIES,
    holder: Path | None = None,
    serve_after: trio.Event | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount `repository` at `mountpoint` and serve it until cancelled, then unmount.

    Run it in the trio thread that owns `repository`; `task_status.started()` reports
    the mountpoint once the kernel has the mount (requests are answered from then on, or
    once `serve_after` is set: until then the kernel queues them). Returns early if
    someone unmounts the mountpoint from outside. Up to `max_tasks` requests are served
    concurrently; a read still waiting after `read_timeout` seconds answers EIO. Up to
    `listing_entries` directory entries are kept for readdir (see RepositoryOperations).

    With `holder` (a socket path; needs root) the connection outlives this call: it is
    taken over from a holder there if one keeps the mount at `mountpoint`, else mounted
    and given to a holder (started if none runs), and on return it stays mounted for
    the next caller. Inode numbers and file handles must mean the same across callers
    (`Repository` makes them so), and layers must be attached before `serve_after`.

        async with trio.open_nursery() as nursery:
            await nursery.start(run_repository, root / "repo", repo)
            ...  # repo.attach(...) from this thread, or trio.from_thread.run_sync
            nursery.cancel_scope.cancel()  # unmounts
    """
    global _active
    if _active:
        raise MountBusy("this process serves a FUSE mount already (pyfuse3 allows one)")
    if holder is not None and os.geteuid() != 0:
        log.info("not root: the repository mount ends with this daemon (no handoff)")
        holder = None
    _active = True
    try:
        if holder is None:
            await clear_stale_mount(mountpoint)
            mountpoint.mkdir(parents=True, exist_ok=True)
            ops: RepositoryOperations = RepositoryOperations(
                repository, read_timeout=read_timeout, listing_entries=listing_entries)
            pyfuse3.init(ops, os.fspath(mountpoint), set(_OPTIONS))
            await _serve(mountpoint, ops, None, serve_after, max_tasks, task_status)
        else:
            await _serve_handed_off(mountpoint, repository, holder, read_timeout=read_timeout,
                                    listing_entries=listing_entries,
                                    max_tasks=max_tasks, serve_after=serve_after,
                                    task_status=task_status)
    finally:
        _active = False


async def _serve_handed_off(
    mountpoint: Path, repository: Repository, holder: Path, *, read_timeout: float,
    listing_entries: int, max_tasks: int, serve_after: trio.Event | None,
    task_status: trio.TaskStatus[Path],
) -> None:
    # Nothing may stat the mountpoint before serving starts: a kept mount's requests
    # wait for this very process.
    held = await trio.to_thread.run_sync(_take_over, mountpoint, holder)
    took_over = held is not None
    if held is None:
        await clear_stale_mount(mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        held = await trio.to_thread.run_sync(_mount, mountpoint)
    try:
        # Before serving anything: from here on a crash leaves the mount to the holder.
        await trio.to_thread.run_sync(handoff.ensure_holder, holder)
        await trio.to_thread.run_sync(handoff.deposit, holder, held)
    except BaseException:
        os.close(held.fd)
        if not took_over:
            await _lazy_unmount(mountpoint)
        raise
    log.info("%s the repository at %s (fuse connection %s)",
             "took over" if took_over else "mounted", mountpoint, held.device)
    libfuse_end, init_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with init_end:
        init_end.send(held.init)
    ops = _HandoffOperations(repository, read_timeout=read_timeout, device_fd=held.fd,
                             listing_entries=listing_entries,
                             libfuse_fd=libfuse_end.detach())
    try:
        pyfuse3.init(ops, f"/dev/fd/{ops.libfuse_fd}", set(_OPTIONS))
    except BaseException:
        os.close(ops.libfuse_fd)
        os.close(held.fd)
        raise
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_resend_after_init, ops, took_over)
            await _serve(mountpoint, ops, holder, serve_after, max_tasks, task_status)
            nursery.cancel_scope.cancel()
    finally:
        if ops.device_fd != -1:  # INIT never got handled
            os.close(ops.device_fd)


async def _serve(
    mountpoint: Path, ops: RepositoryOperations, holder: Path | None,
    serve_after: trio.Event | None, max_tasks: int, task_status: trio.TaskStatus[Path],
) -> None:
    """Serve an initialised pyfuse3 session; unmount at the end unless a holder keeps it."""
    served = False
    try:
        task_status.started(mountpoint)
        if serve_after is not None:
            await serve_after.wait()
        served = True
        log.info("serving repository at %s", mountpoint)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        log.info("repository at %s was unmounted from outside", mountpoint)
    finally:
        # Unmount only what surely nobody needs: a daemon that stops before it has
        # restored its layers does not know what the containers use.
        if holder is not None and (not served or overlays_using(mountpoint)):
            # Containers read these layers: keep the mount for the next daemon.
            # Requests this daemon read but did not answer stay with the kernel; the
            # next daemon has them resent. Closing our descriptor leaves the holder's.
            pyfuse3.close(unmount=False)
            log.info("repository at %s left mounted for the next daemon", mountpoint)
        elif holder is not None:
            # Nothing to keep: unmount, so that the holder sees the connection end.
            with trio.CancelScope(shield=True), contextlib.suppress(StaleMount):
                await _lazy_unmount(mountpoint)
            pyfuse3.close(unmount=False)
            log.info("repository at %s closed (no overlay uses it)", mountpoint)
        else:
            # Lazy unmount (libfuse does MNT_DETACH as root), then closing the device
            # fails every request still pending, so no thread stays blocked on the mount.
            pyfuse3.close(unmount=True)
            log.info("repository at %s closed", mountpoint)
