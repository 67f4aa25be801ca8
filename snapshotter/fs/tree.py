"""One layer's read-only tree as the kernel should see it: inodes, names, attributes.

Pure data built once from a `Toc`; no FUSE, no I/O. `fs/ops.py` turns a `Node` into
pyfuse3 attributes and `fs/repository.py` gives each tree a slot in the global inode space.
"""

from __future__ import annotations

import os
import stat
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass

from snapshotter.errors import InvalidArgument
from snapshotter.format.toc import Entry, Toc
from snapshotter.format.whiteout import OVERLAY_OPAQUE_XATTR, OVERLAY_OPAQUE_YES, WhiteoutKind
from snapshotter.format.whiteout import classify as classify_name

__all__ = ["ROOT", "InvalidTree", "LayerTree", "Node"]

ROOT = 1  # local inode of the layer's top directory; local inodes are 1..len(tree)

_HIDDEN = 0  # in the build's path -> inode map: not shown, nor anything below it

_IFMT = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


class InvalidTree(InvalidArgument):
    """The TOC cannot be presented as a tree (missing parent, dangling hardlink, ...)."""


@dataclass(frozen=True, slots=True)
class Node:
    """What stat(2), readlink(2) and getxattr(2) report for one inode, made on demand."""

    ino: int  # local inode
    name: str  # base name (of the first path naming it, for hardlinked files)
    mode: int  # file type | permission bits
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    target: str  # symlink target, verbatim; "" otherwise
    entry: Entry  # for regular files: the chunks to read

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class LayerTree:
    """The inodes of one layer, with OCI whiteouts translated for overlayfs.

    Each TOC path gets a local inode `1..len(tree)` (`ROOT` is the layer's top dir), except:

    - a hardlink names its target's inode, whose `nlink` counts every name;
    - `.wh.NAME` becomes `NAME`, a character device 0/0 with mode 0 (overlayfs's whiteout),
      unless the layer also has a real `NAME` there, which hides the lower one anyway;
    - `.wh..wh..opq` is not shown; its directory reports `trusted.overlay.opaque=y`;
    - other reserved names (`.wh..wh.*`, AUFS metadata) are not shown, nor anything
      below them (`format/whiteout.py` classifies the names).

    Layout, for 100k-entry layers: entries in a list indexed by inode (the `Entry`
    objects are the TOC's own, not copies); per-inode numbers in `array`s; every
    directory's children are one sorted slice of a shared name list, so `lookup` is a
    bisection and `children` a slice walk whose positions are stable readdir offsets.

        tree = LayerTree.from_toc(toc)
        ino = tree.lookup(ROOT, "etc")
        node = tree.node(tree.lookup(ino, "passwd"))  # node.mode, node.size, ...
        for pos, name, child in tree.children(ino): ...
    """

    __slots__ = (
        "_dir_end",
        "_dir_start",
        "_entries",
        "_kids",
        "_names",
        "_nlink",
        "_opaque",
        "_parent",
        "total_size",
    )

    def __init__(self) -> None:
        self._entries: list[Entry] = []  # [ino - 1]
        self._nlink = array("I")  # [ino - 1]
        self._parent = array("I")  # [ino - 1]; directories only (0 otherwise, ROOT's is 0)
        self._dir_start = array("I")  # [ino - 1]; children slice of a directory
        self._dir_end = array("I")
        self._names: list[str] = []  # child base names, sorted within each directory
        self._kids = array("I")  # child inode, parallel to _names
        self._opaque: frozenset[int] = frozenset()
        self.total_size = 0  # bytes of regular file content, counting hardlinks once

    @classmethod
    def from_toc(cls, toc: Toc) -> LayerTree:
        """Build the tree; raises InvalidTree if the TOC breaks the `Toc` invariants."""
        tree = cls()
        entries = tree._entries
        ino_of: dict[str, int] = {}  # path -> inode; dropped after the build
        kids: dict[int, dict[str, int]] = {ROOT: {}}  # dir inode -> name -> inode
        parent = [0]
        hardlinks: list[tuple[int, str, Entry]] = []
        whiteouts: list[tuple[int, str, Entry]] = []
        opaque: set[int] = set()

        entries.append(Entry(name="", type="dir", mode=0o755))
        ino_of[""] = ROOT
        for e in toc.entries:
            if e.name == "":
                if e.type != "dir":
                    raise InvalidTree(f"layer root {e.name!r} is a {e.type}, not a dir")
                entries[0] = e
                continue
            dirname, _, base = e.name.rpartition("/")
            pino = ino_of.get(dirname)
            if pino == _HIDDEN:
                ino_of[e.name] = _HIDDEN
                continue
            if pino is None or pino not in kids:
                raise InvalidTree(f"entry {e.name!r}: parent {dirname!r} is not a directory")
            kind, target = classify_name(base)
            if kind is WhiteoutKind.OPAQUE:
                opaque.add(pino)
            elif kind is WhiteoutKind.META:
                ino_of[e.name] = _HIDDEN
            elif kind is WhiteoutKind.WHITEOUT:
                whiteouts.append((pino, target, e))
            elif e.type == "hardlink":
                hardlinks.append((pino, base, e))
            elif e.type not in _IFMT:
                raise InvalidTree(f"entry {e.name!r}: unknown type {e.type!r}")
            elif base in kids[pino]:
                raise InvalidTree(f"entry {e.name!r} appears twice")
            else:
                entries.append(e)
                ino = len(entries)
                parent.append(pino if e.type == "dir" else 0)
                ino_of[e.name] = kids[pino][base] = ino
                if e.type == "dir":
                    kids[ino] = {}
                elif e.type == "reg":
                    tree.total_size += e.size

        nlink = [2 if e.type == "dir" else 1 for e in entries]
        pending = hardlinks
        while pending:  # a hardlink may name another hardlink (tar allows it)
            later = []
            for pino, base, e in pending:
                target = ino_of.get(e.link_name)
                if not target:  # unknown, hidden, or a hardlink not resolved yet
                    later.append((pino, base, e))
                    continue
                if entries[target - 1].type == "dir":
                    raise InvalidTree(f"hardlink {e.name!r}: target {e.link_name!r} is a dir")
                if base in kids[pino]:
                    raise InvalidTree(f"entry {e.name!r} appears twice")
                ino_of[e.name] = kids[pino][base] = target
                nlink[target - 1] += 1
            if len(later) == len(pending):
                e = later[0][2]
                raise InvalidTree(f"hardlink {e.name!r}: target {e.link_name!r} does not exist")
            pending = later
        for pino, base, e in whiteouts:
            if base in kids[pino]:
                continue
            dirname = e.name.rpartition("/")[0]
            shown = f"{dirname}/{base}" if dirname else base
            entries.append(
                Entry(name=shown, type="char", uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns)
            )
            nlink.append(1)
            parent.append(0)
            kids[pino][base] = len(entries)

        n = len(entries)
        tree._nlink = array("I", nlink)
        tree._parent = array("I", parent)
        tree._dir_start = array("I", bytes(4 * n))
        tree._dir_end = array("I", bytes(4 * n))
        for dino, names in kids.items():
            tree._dir_start[dino - 1] = len(tree._names)
            for base in sorted(names):
                child = names[base]
                tree._names.append(base)
                tree._kids.append(child)
                if entries[child - 1].type == "dir":
                    tree._nlink[dino - 1] += 1
            tree._dir_end[dino - 1] = len(tree._names)
        tree._opaque = frozenset(opaque)
        return tree

    def __len__(self) -> int:
        return len(self._entries)

    def _check(self, ino: int) -> Entry:
        if not 1 <= ino <= len(self._entries):
            raise KeyError(ino)
        return self._entries[ino - 1]

    def lookup(self, dir_ino: int, name: str) -> int | None:
        """The inode named `name` in directory `dir_ino`, or None."""
        self._check(dir_ino)
        lo, hi = self._dir_start[dir_ino - 1], self._dir_end[dir_ino - 1]
        i = bisect_left(self._names, name, lo, hi)
        if i < hi and self._names[i] == name:
            return self._kids[i]
        return None

    def children(self, dir_ino: int, start: int = 0) -> Iterator[tuple[int, str, int]]:
        """`(position, name, inode)` in name order, from position `start` (0 = first).

        Positions are stable for the life of the tree, so `position + 1` is a valid
        readdir offset to continue from.
        """
        self._check(dir_ino)
        lo, hi = self._dir_start[dir_ino - 1], self._dir_end[dir_ino - 1]
        for i in range(lo + max(start, 0), hi):
            yield i - lo, self._names[i], self._kids[i]

    def parent(self, dir_ino: int) -> int:
        """The parent directory's inode; 0 for ROOT (its parent is outside the layer)."""
        self._check(dir_ino)
        return self._parent[dir_ino - 1]

    def entry(self, ino: int) -> Entry:
        return self._check(ino)

    def node(self, ino: int) -> Node:
        e = self._check(ino)
        if e.type == "symlink":
            size = len(os.fsencode(e.link_name))
        elif e.type == "reg":
            size = e.size
        else:
            size = 0
        return Node(
            ino=ino,
            name=e.name.rpartition("/")[2],
            mode=_IFMT[e.type] | (e.mode & 0o7777),
            nlink=self._nlink[ino - 1],
            uid=e.uid,
            gid=e.gid,
            size=size,
            mtime_ns=e.mtime_ns,
            rdev=os.makedev(e.dev_major, e.dev_minor) if e.type in ("char", "block") else 0,
            target=e.link_name if e.type == "symlink" else "",
            entry=e,
        )

    def xattrs(self, ino: int) -> dict[str, bytes]:
        """Extended attributes: the TOC's, plus overlayfs's opaque marker where due."""
        e = self._check(ino)
        found = dict(e.xattrs)
        if ino in self._opaque:
            found[OVERLAY_OPAQUE_XATTR] = OVERLAY_OPAQUE_YES
        return found
