"""File-system appliers and tree comparison for the conformance suite.

An applier is a list of changes that can be run on any directory: once on a plain "flat"
directory and once on a mounted snapshot; the two trees must then compare equal. Trees
compare like containerd's continuity manifests: path, type, permission bits, owner,
content, symlink target and hard-link groups; never times or directory sizes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Change = Callable[[Path], None]


@dataclass(frozen=True)
class Applier:
    """An ordered list of changes; an Applier is itself a change, so they compose."""

    changes: tuple[Change, ...]

    def __call__(self, root: Path) -> None:
        for change in self.changes:
            change(root)


def apply(*changes: Change) -> Applier:
    return Applier(tuple(changes))


def _at(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def create_file(name: str, content: bytes, mode: int) -> Change:
    """Write (truncate) then chmod, so the mode is exact whatever the umask or old mode."""

    def change(root: Path) -> None:
        path = _at(root, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        os.chmod(path, mode)

    return change


def create_dir(name: str, mode: int) -> Change:
    def change(root: Path) -> None:
        path = _at(root, name)
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        os.chmod(path, mode)

    return change


def remove_all(name: str) -> Change:
    def change(root: Path) -> None:
        path = _at(root, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()

    return change


def chown(name: str, uid: int, gid: int) -> Change:
    return lambda root: os.lchown(_at(root, name), uid, gid)


def chmod(name: str, mode: int) -> Change:
    return lambda root: os.chmod(_at(root, name), mode)


def link(old: str, new: str) -> Change:
    return lambda root: os.link(_at(root, old), _at(root, new))


def symlink(target: str, name: str) -> Change:
    return lambda root: os.symlink(target, _at(root, name))


def rename(old: str, new: str) -> Change:
    return lambda root: os.rename(_at(root, old), _at(root, new))


def move(old: str, new: str) -> Change:
    """Rename like mv(1): overlay without redirect_dir answers EXDEV for a directory from a
    lower layer, and every tool then copies and deletes instead."""

    def change(root: Path) -> None:
        src, dst = _at(root, old), _at(root, new)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
            shutil.copystat(src, dst)
            st = src.lstat()
            os.lchown(dst, st.st_uid, st.st_gid)
            shutil.rmtree(src)

    return change


@dataclass(frozen=True)
class Entry:
    """What the comparison sees of one path."""

    kind: str
    mode: int
    uid: int
    gid: int
    content: bytes | str | None = None
    links: tuple[str, ...] = ()


def tree(root: Path) -> dict[str, Entry]:
    """Every path below `root` (not root itself), keyed by its '/'-rooted relative path."""
    entries: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = "/" + str(path.relative_to(root))
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            content: bytes | str | None = None
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISREG(st.st_mode):
                kind = "file"
                content = path.read_bytes()
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                kind, content = "symlink", os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind, content = "device", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                kind = stat.filemode(st.st_mode)[0]
            entries[rel] = Entry(kind, mode, st.st_uid, st.st_gid, content)
    for paths in inodes.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for rel in paths:
                old = entries[rel]
                entries[rel] = Entry(old.kind, old.mode, old.uid, old.gid, old.content, group)
    return entries


def tree_diff(expected: Path, actual: Path) -> list[str]:
    """Human-readable differences; empty when the trees are equal."""
    want, got = tree(expected), tree(actual)
    problems = [f"missing {p}: {want[p]}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {p}: {got[p]}" for p in sorted(got.keys() - want.keys())]
    problems += [
        f"differs {p}: expected {want[p]}, got {got[p]}"
        for p in sorted(want.keys() & got.keys())
        if want[p] != got[p]
    ]
    return problems


def assert_same_tree(expected: Path, actual: Path) -> None:
    problems = tree_diff(expected, actual)
    assert not problems, f"{actual} differs from {expected}:\n" + "\n".join(problems)
