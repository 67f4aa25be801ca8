"""What a container sees, listed from inside it with busybox, compared with the image's tree.

The listing runs in the container (so it goes through exactly the mounts the container gets)
and prints one line per path; `compare` reports every difference from `images.merged_tree`
as a readable line, so a failing test shows all mismatches at once.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.images import FileInfo

__all__ = ["LISTING_SCRIPT", "Seen", "compare", "host_xattrs", "parse_listing"]

# -xdev keeps find on the root filesystem: /proc, /sys and /dev are the runtime's mounts.
LISTING_SCRIPT = r"""
echo '#stat'
find / -xdev -exec stat -c '%n|%f|%u|%g|%s|%h|%i|%t|%T|%Y' {} +
echo '#sha256'
find / -xdev -type f -exec sha256sum {} +
echo '#links'
find / -xdev -type l | while IFS= read -r p; do echo "$p|$(readlink "$p")"; done
echo '#end'
"""

# Paths the runtime creates or mounts over; they are not part of the image's tree.
RUNTIME_PATHS = frozenset({"/", "/run", "/proc", "/sys", "/dev"})

_KINDS = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass
class Seen:
    """One path as the container saw it."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    inode: int
    device: tuple[int, int]
    mtime: int
    sha256: str = ""
    link: str = ""


def parse_listing(text: str) -> dict[str, Seen]:
    seen: dict[str, Seen] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line[1:]
            continue
        if not line:
            continue
        if section == "stat":
            path, raw, uid, gid, size, nlink, ino, major, minor, mtime = line.rsplit("|", 9)
            mode = int(raw, 16)
            seen[path] = Seen(
                kind=_KINDS.get(stat.S_IFMT(mode), f"unknown {mode:o}"),
                mode=stat.S_IMODE(mode),
                uid=int(uid),
                gid=int(gid),
                size=int(size),
                nlink=int(nlink),
                inode=int(ino),
                device=(int(major, 16), int(minor, 16)),
                mtime=int(mtime),
            )
        elif section == "sha256":
            digest, path = line.split(maxsplit=1)
            seen[path].sha256 = digest
        elif section == "links":
            path, target = line.split("|", 1)
            seen[path].link = target
    if section != "end":
        raise ValueError(f"listing is incomplete (last section {section!r}):\n{text[-2000:]}")
    return seen


def compare(
    expected: dict[str, FileInfo], seen: dict[str, Seen], ignore: frozenset[str] = RUNTIME_PATHS
) -> list[str]:
    """Every difference between the image's tree and the container's view, one per line."""
    problems = []
    for path in sorted(set(expected) | set(seen)):
        if path in ignore:
            continue
        want, got = expected.get(path), seen.get(path)
        if want is None:
            problems.append(f"{path}: unexpected ({got.kind if got else '?'})")
            continue
        if got is None:
            problems.append(f"{path}: missing ({want.kind})")
            continue
        fields = {
            "kind": (want.kind if want.kind != "hardlink" else "reg", got.kind),
            "uid": (want.uid, got.uid),
            "gid": (want.gid, got.gid),
        }
        if want.kind != "symlink":
            fields["mode"] = (oct(want.mode), oct(got.mode))
        if want.kind == "reg":
            fields["size"] = (want.size, got.size)
            fields["sha256"] = (want.sha256, got.sha256)
        if want.kind == "symlink":
            fields["link"] = (want.link, got.link)
        if want.kind in ("char", "block"):
            fields["device"] = (want.device, got.device)
        if want.kind != "dir":
            fields["mtime"] = (want.mtime, got.mtime)
        for name, (w, g) in fields.items():
            if w != g:
                problems.append(f"{path}: {name} is {g!r}, expected {w!r}")
    problems += _compare_hardlinks(expected, seen)
    return problems


def _compare_hardlinks(expected: dict[str, FileInfo], seen: dict[str, Seen]) -> list[str]:
    # merged_tree gives hardlinked paths the very same FileInfo object.
    groups: dict[int, list[str]] = defaultdict(list)
    for path, info in expected.items():
        if info.kind == "reg":
            groups[id(info)].append(path)
    problems = []
    for paths in groups.values():
        present = [p for p in paths if p in seen]
        inodes = {seen[p].inode for p in present}
        if len(inodes) > 1:
            problems.append(f"{', '.join(present)}: hardlinks with different inodes {inodes}")
        for p in present:
            if seen[p].nlink != len(paths):
                problems.append(f"{p}: nlink is {seen[p].nlink}, expected {len(paths)}")
    return problems


def host_xattrs(rootfs: Path, expected: dict[str, FileInfo]) -> list[str]:
    """Compare extended attributes through a container's rootfs mount, seen from the host.

    busybox has no getfattr, so this reads the same overlay mount the container uses.
    """
    problems = []
    for path, info in sorted(expected.items()):
        if path in RUNTIME_PATHS or info.kind == "symlink":
            continue
        target = rootfs / path.lstrip("/")
        try:
            names = os.listxattr(target, follow_symlinks=False)
            got = tuple(sorted((n, os.getxattr(target, n, follow_symlinks=False)) for n in names))
        except OSError as exc:
            problems.append(f"{path}: cannot read xattrs: {exc}")
            continue
        if got != info.xattrs:
            problems.append(f"{path}: xattrs are {got!r}, expected {info.xattrs!r}")
    return problems
