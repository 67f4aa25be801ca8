"""Mounting a snapshotter's Mount list with mount(8), the way containerd's `mount.All` would.

Test-only: it shells out to mount/umount so the kernel, not our code, judges the options.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from snapshotter.core.types import Mount

# mount(2) copies at most one page of option data; overlay rejects anything longer.
PAGE_SIZE = 4096

_TIMEOUT = 30


def _run(args: list[str], cwd: str | None = None) -> None:
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=_TIMEOUT, check=False, cwd=cwd
    )
    if proc.returncode != 0:
        raise OSError(f"{' '.join(args)!r} failed ({proc.returncode}): {proc.stderr.strip()}")


def mount_one(m: Mount, target: Path) -> None:
    """Mount one entry; bind mounts get a second remount pass because `-o ro` on a bind is
    silently ignored by the first mount(2) call."""
    options = list(m.options)
    if m.type == "bind":
        recursive = "rbind" in options
        _run(["mount", "--rbind" if recursive else "--bind", m.source, str(target)])
        if "ro" in options:
            _run(["mount", "-o", "remount,bind,ro", str(target)])
        return
    chdir = None
    if m.type == "overlay" and sum(len(o) + 1 for o in options) >= PAGE_SIZE - 512:
        chdir, options = compact_lowerdir(options)
    data = ",".join(options)
    if len(data.encode()) > PAGE_SIZE:
        raise OSError(f"mount options of {m.type} mount are {len(data)} bytes, over one page")
    _run(["mount", "-t", m.type, m.source, "-o", data, str(target)], cwd=chdir)


def compact_lowerdir(options: Sequence[str]) -> tuple[str | None, list[str]]:
    """containerd's mount_linux.go trick for deep stacks: mount from inside the directory
    the lower dirs share, naming them relative to it. Returns (cwd, options); cwd is None
    when nothing could be shortened."""
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if index < 0:
        return None, list(options)
    dirs = options[index].removeprefix("lowerdir=").split(":")
    if len(dirs) == 1:
        return None, list(options)
    # Whole components: ".../12/fs" and ".../13/fs" share ".../snapshots", not ".../1".
    common = os.path.commonpath(dirs)
    if common in ("", "/"):
        return None, list(options)
    common += "/"
    rest = [o for i, o in enumerate(options) if i != index]
    return common, [*rest, "lowerdir=" + ":".join(d[len(common) :] for d in dirs)]


def mount_all(mounts: Sequence[Mount], target: Path) -> None:
    """Mount every entry on `target` in order (containerd stacks them the same way)."""
    if not mounts:
        raise ValueError("no mounts to mount")
    done = 0
    try:
        for m in mounts:
            mount_one(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: Path) -> None:
    """Detach like containerd's testsuite (MNT_DETACH) so a busy file cannot wedge teardown."""
    _run(["umount", "--lazy", str(target)])


@contextmanager
def mounted(mounts: Sequence[Mount], target: Path) -> Iterator[Path]:
    """Mount for the duration of a block; the target directory is created if missing."""
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount(target)


def _decode(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first (the order to unmount them in)."""
    base = path.resolve()
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = Path(_decode(line.split()[4]))
            if point == base or base in point.parents:
                found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(path: Path) -> list[Path]:
    """Teardown safety net: detach whatever a failed check left mounted below `path`."""
    left = mounts_under(path)
    for point in left:
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True, timeout=_TIMEOUT)
    return left
