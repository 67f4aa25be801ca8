"""The ways an image gets pulled and run, each on a fresh containerd + snapshotter stack.

- `overlayfs`: containerd's default; `ctr image pull` of the plain gzip image, `ctr run`.
- `lazysnap`: `ctr-remote image rpull` of the eStargz image, on-demand fetches only:
  prefetch, background fetch and profile-driven prefetch switched off (`LAZY_ONLY_ARGS`,
  each passed only if this daemon knows the flag).
- `lazysnap+prefetch`: the same with the daemon's prefetch features at their defaults
  (`PREFETCH_ARGS`); reported as unavailable while the daemon lacks `--prefetch`.
- `lazysnap-gzip`: the plain gzip image through lazysnap (ordinary snapshots): the
  non-lazy overhead.
- `remote`: any proxy-plugin snapshotter given as a command line with `{address}` and
  `{root}` placeholders, pulled with any pull command (default `ctr-remote images rpull`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import REPO_ROOT, Containerd, Service, remove_tree, unmount_under, wait_for
from tests.e2e.stack import REFERENCE, Stack, start_stack

__all__ = [
    "LAZY_ONLY_ARGS",
    "MODES",
    "PREFETCH_ARGS",
    "RPULL",
    "Mode",
    "open_stack",
    "pull",
    "run_workload",
    "serve_knows",
]

# The prefetch mode: the daemon as shipped (startup prefetch, profiles, background fetch).
PREFETCH_ARGS = ("--prefetch",)
# The plain lazy mode: nothing but on-demand fetches, so bytes and times measure them alone.
LAZY_ONLY_ARGS = ("--no-prefetch", "--no-background-fetch", "--no-profile-apply",
                  "--no-profile-lookup", "--no-profile-record", "--no-native-layers")
# Benchmarks run the daemon at INFO: DEBUG logging costs time on every FUSE call.
_DAEMON_ARGS = ("--log-level", "info")
_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Mode:
    name: str
    snapshotter: str  # the name containerd knows it by
    esgz: bool  # pulls the eStargz variant of the image
    pull_cmd: tuple[str, ...] = ("ctr", "images", "pull")
    daemon_args: tuple[str, ...] = ()  # required: the mode is unavailable without them
    optional_args: tuple[str, ...] = ()  # passed when this daemon knows them
    remote_cmd: str = ""  # for `remote`: the snapshotter's command line
    notes: list[str] = field(default_factory=list, compare=False)


RPULL = ("ctr-remote", "images", "rpull")
MODES = {
    "overlayfs": Mode("overlayfs", REFERENCE, esgz=False),
    "lazysnap": Mode("lazysnap", "lazysnap", esgz=True, pull_cmd=RPULL,
                     optional_args=LAZY_ONLY_ARGS),
    "lazysnap+prefetch": Mode("lazysnap+prefetch", "lazysnap", esgz=True, pull_cmd=RPULL,
                              daemon_args=PREFETCH_ARGS),
    "lazysnap-gzip": Mode("lazysnap-gzip", "lazysnap", esgz=False,
                          optional_args=LAZY_ONLY_ARGS),
}


def remote_mode(name: str, command: str, pull: str = "ctr-remote images rpull",
                esgz: bool = True) -> Mode:
    return Mode("remote", name, esgz=esgz, pull_cmd=tuple(shlex.split(pull)),
                remote_cmd=command)


@functools.cache
def _serve_flags() -> frozenset[str]:
    helptext = subprocess.run(
        [sys.executable, "-m", "snapshotter", "serve", "--help"], capture_output=True,
        text=True, cwd=REPO_ROOT, timeout=60,
    ).stdout
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", helptext))


def serve_knows(flag: str) -> bool:
    return flag in _serve_flags()


def unavailable(mode: Mode) -> str | None:
    """Why `mode` cannot run on this machine/checkout, or None."""
    for flag in mode.daemon_args:
        if flag.startswith("--") and flag.split("=")[0] not in _serve_flags():
            return f"`lazysnap serve` has no {flag} flag yet"
    return None


class _RemoteSnapshotter(Service):
    name = "remote-snapshotter"

    def __init__(self, workdir: Path, address: str, template: str) -> None:
        super().__init__(workdir)
        self.address = address
        self.root = workdir / "root"
        self.template = template

    def start(self, timeout: float = 60.0) -> _RemoteSnapshotter:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [a.format(address=self.address, root=self.root, workdir=self.workdir)
                for a in shlex.split(self.template)]
        self._spawn(argv)

        def listening() -> bool:
            self.check_alive()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(self.address)
                except OSError:
                    return False
            return True

        wait_for(listening, timeout, f"remote snapshotter socket {self.address}")
        return self


@contextlib.contextmanager
def _remote_stack(workdir: Path, mode: Mode) -> Iterator[Stack]:
    sockdir = Path(tempfile.mkdtemp(prefix="lzb", dir="/tmp"))
    remote = containerd = None
    try:
        remote = _RemoteSnapshotter(workdir / "remote", str(sockdir / "remote.sock"),
                                    mode.remote_cmd).start()
        containerd = Containerd(workdir / "containerd", sockdir,
                                {mode.snapshotter: remote.address}).start()
        stack = Stack(mode.snapshotter, containerd, None, remote.root)
        stack.wait_ready()
        yield stack
    finally:
        if containerd is not None:
            containerd.stop()
        if remote is not None:
            remote.stop()
        unmount_under(workdir)
        remove_tree(sockdir)


@contextlib.contextmanager
def open_stack(mode: Mode, workdir: Path, extra_daemon_args: Sequence[str] = ()
               ) -> Iterator[Stack]:
    """A fresh stack for `mode` in `workdir` (fresh containerd root, snapshotter root, cache)."""
    if mode.remote_cmd:
        with _remote_stack(workdir, mode) as stack:
            yield stack
        return
    optional = [a for a in mode.optional_args if a.split("=")[0] in _serve_flags()]
    args = (*_DAEMON_ARGS, *mode.daemon_args, *optional, *extra_daemon_args)
    try:
        with start_stack(workdir, mode.snapshotter, show_logs=False,
                         lazysnap_args=args) as stack:
            yield stack
    except AssertionError as exc:
        # A daemon that hands its FUSE repository over to a holder process leaves it
        # mounted on SIGTERM for its successor, by design; start_stack has unmounted it
        # already. Anything else left mounted is still an error.
        if not _only_repository_left(str(exc)):
            raise


def _only_repository_left(message: str) -> bool:
    if "mounts left behind" not in message:
        return False
    points = re.findall(r"'([^']+)'", message)
    return bool(points) and all(p.endswith("/root/repo") for p in points)


def pull(stack: Stack, mode: Mode, ref: str) -> None:
    tool, *verb = mode.pull_cmd
    stack.containerd.ctr(*verb, "--plain-http", "--snapshotter", stack.snapshotter, ref,
                         tool=tool, timeout=_TIMEOUT)


def run_workload(stack: Stack, ref: str, cid: str, cmd: Sequence[str]) -> str:
    return stack.containerd.ctr("run", "--rm", "--snapshotter", stack.snapshotter, ref, cid,
                                *cmd, timeout=_TIMEOUT).stdout


def drop_caches() -> None:
    """Write back dirty pages, then drop page cache, dentries and inodes."""
    subprocess.run(["sync"], check=True, timeout=300)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
