"""One layer's read-only tree as the kernel should see it: inodes, names, attributes.

Pure data built once from a `Toc`; no FUSE, no I/O. `fs/ops.py` turns a `Stat` into
pyfuse3 attributes and `fs/repository.py` gives each tree a slot in the global inode space.
"""

from __future__ import annotations

import os
import stat
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import NamedTuple

from snapshotter.errors import InvalidArgument
from snapshotter.format.toc import ENTRY_TYPES, TYPE_MASK, Entry, Toc
from snapshotter.format.whiteout import (
    OVERLAY_OPAQUE_XATTR,
    OVERLAY_OPAQUE_YES,
    WHITEOUT_PREFIX,
)

__all__ = ["ROOT", "InvalidTree", "LayerTree", "Node", "Stat"]

ROOT = 1  # local inode of the layer's top directory; local inodes are 1..len(tree)

_DIR, _REG, _SYMLINK, _HARDLINK, _CHAR, _BLOCK = range(6)
# file type bits by ENTRY_TYPES index (hardlinks never become inodes of their own)
_IFMT = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, 0, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO)
assert ENTRY_TYPES[_BLOCK] == "block" and len(_IFMT) == len(ENTRY_TYPES)

# In `LayerTree._row` (inode -> TOC row) and in child name references:
_WHITEOUT = 1 << 31  # the char 0/0 shown for the `.wh.NAME` entry of this row, named NAME
_ROW = _WHITEOUT - 1
_IMPLICIT_ROOT = 0xFFFF_FFFF  # the TOC has no "" entry: a 0o755 root owned by 0:0
_WH_LEN = len(WHITEOUT_PREFIX)


class InvalidTree(InvalidArgument):
    """The TOC cannot be presented as a tree (missing parent, dangling hardlink, ...)."""


# What `LayerTree.stat` returns: (mode, nlink, uid, gid, size, mtime_ns, rdev)
Stat = tuple[int, int, int, int, int, int, int]


class Node(NamedTuple):
    """What stat(2), readlink(2) and getxattr(2) report for one inode, made on demand
    (a NamedTuple: every getattr and lookup makes one, and a tuple is the cheapest)."""

    ino: int  # local inode
    name: str  # base name (of the first path naming it, for hardlinked files)
    type: str  # one of ENTRY_TYPES except "hardlink"
    mode: int  # file type | permission bits
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    target: str  # symlink target, verbatim; "" otherwise

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

    Layout, for 100k-entry layers (about 24 bytes per inode on top of the `Toc`, which
    the tree keeps and reads its names and attributes from): per-inode numbers in
    `array`s; every directory's children are one slice of two shared arrays (name, as
    a reference to a TOC row's base name, and inode), sorted by name, so `lookup` is a
    bisection and `children` a slice walk whose positions are stable readdir offsets.
    Nothing per inode is a Python object; `node` and `entry` make theirs on demand.

        tree = LayerTree.from_toc(toc)
        ino = tree.lookup(ROOT, "etc")
        node = tree.node(tree.lookup(ino, "passwd"))  # node.mode, node.size, ...
        for pos, name, child in tree.children(ino): ...
        for pos, name, child, st in tree.listing(ino): ...  # name bytes, `Stat` tuples
    """

    __slots__ = (
        "_cols",
        "_kid_ino",
        "_kid_ref",
        "_kids_at",
        "_name",
        "_nlink",
        "_odd",
        "_opaque",
        "_parent",
        "_row",
        "toc",
        "total_size",
    )

    def __init__(self, toc: Toc) -> None:
        self.toc = toc
        self._cols = toc.columns
        self._name = _name_of(toc.columns.names, toc.columns.name_at)  # name ref -> bytes
        self._row = array("I", [_IMPLICIT_ROOT])  # [ino - 1]: TOC row, | _WHITEOUT
        self._parent = array("I", [0])  # [ino - 1]; directories only (0 otherwise, ROOT's is 0)
        self._nlink = array("I", [2])  # [ino - 1]
        self._kids_at = array("I", [0, 0])  # [ino - 1], [ino]: bound the children of ino
        self._kid_ref = array("I")  # a child's name: TOC row whose base name it is, | _WHITEOUT
        self._kid_ino = array("I")  # parallel to _kid_ref
        self._opaque: frozenset[int] = frozenset()
        self._odd = toc.odd_rows  # rows whose attributes only toc.entry() has right
        self.total_size = 0  # bytes of regular file content, counting hardlinks once

    def __getstate__(self) -> dict[str, object]:
        # The TOC parser's worker process builds trees too (remote/tocparse.py); the name
        # function is a closure over the TOC's columns, made again on load.
        return {k: getattr(self, k) for k in self.__slots__ if k != "_name"}

    def __setstate__(self, state: dict[str, object]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._name = _name_of(self._cols.names, self._cols.name_at)

    @classmethod
    def from_toc(cls, toc: Toc) -> LayerTree:
        """Build the tree; raises InvalidTree if the TOC breaks the `Toc` invariants."""
        from snapshotter.fs._treebuild import build  # it imports this module

        return build(cls(toc))

    def __len__(self) -> int:
        return len(self._row)

    def _check(self, ino: int) -> int:
        if not 1 <= ino <= len(self._row):
            raise KeyError(ino)
        return self._row[ino - 1]

    def lookup(self, dir_ino: int, name: str | bytes) -> int | None:
        """The inode named `name` in directory `dir_ino`, or None."""
        if not 1 <= dir_ino <= len(self._row):
            raise KeyError(dir_ino)
        key = os.fsencode(name)
        lo, hi = self._kids_at[dir_ino - 1], self._kids_at[dir_ino]
        refs = self._kid_ref
        i = bisect_left(refs, key, lo, hi, key=self._name)
        if i < hi and self._name(refs[i]) == key:
            return self._kid_ino[i]
        return None

    def children(self, dir_ino: int, start: int = 0) -> Iterator[tuple[int, str, int]]:
        """`(position, name, inode)` in name order, from position `start` (0 = first).

        Positions are stable for the life of the tree, so `position + 1` is a valid
        readdir offset to continue from.
        """
        self._check(dir_ino)
        lo, hi = self._kids_at[dir_ino - 1], self._kids_at[dir_ino]
        for i in range(lo + max(start, 0), hi):
            yield i - lo, self._name(self._kid_ref[i]).decode(), self._kid_ino[i]

    def listing(self, dir_ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int, Stat]]:
        """`(position, name, inode, stat(inode))` from position `start`: `children` for
        readdir, which wants name bytes and attributes for every entry.

        `stat` inlined for the common rows: a `find` over a layer spends most of its
        daemon time here (a microsecond per entry counts against the kernel's own cost).
        """
        self._check(dir_ino)
        lo, hi = self._kids_at[dir_ino - 1], self._kids_at[dir_ino]
        c = self._cols
        names, name_at, kind, size = c.names, c.name_at, c.kind, c.size
        mode, uid, gid, mtime_ns = c.mode, c.uid, c.gid, c.mtime_ns
        refs, inos, rows, nlinks, odd = (
            self._kid_ref, self._kid_ino, self._row, self._nlink, self._odd
        )
        for i in range(lo + max(start, 0), hi):
            ino, ref = inos[i], refs[i]
            row = rows[ino - 1]
            # rare rows (whiteouts, odd values, links, devices) take stat's long way
            if (ref | row) & _WHITEOUT or row in odd or (code := kind[row] & TYPE_MASK) > _REG:
                yield i - lo, self._name(ref), ino, self.stat(ino)
                continue
            yield (
                i - lo,
                names[name_at[ref] : name_at[ref + 1]],
                ino,
                (_IFMT[code] | (mode[row] & 0o7777), nlinks[ino - 1], uid[row], gid[row],
                 size[row] if code == _REG else 0, mtime_ns[row], 0),
            )

    def child_count(self, dir_ino: int) -> int:
        self._check(dir_ino)
        return self._kids_at[dir_ino] - self._kids_at[dir_ino - 1]

    def parent(self, dir_ino: int) -> int:
        """The parent directory's inode; 0 for ROOT (its parent is outside the layer)."""
        self._check(dir_ino)
        return self._parent[dir_ino - 1]

    def is_dir(self, ino: int) -> bool:
        row = self._check(ino)
        return row == _IMPLICIT_ROOT or (
            not row & _WHITEOUT and self.toc.columns.kind[row] & TYPE_MASK == _DIR
        )

    def entry(self, ino: int) -> Entry:
        """The TOC entry behind an inode (for files: the chunks to read), made now."""
        row = self._check(ino)
        if row == _IMPLICIT_ROOT:
            return Entry(name="", type="dir", mode=0o755)
        if row & _WHITEOUT:
            e = self.toc.entry(row & _ROW)
            dirname, _, base = e.name.rpartition("/")
            shown = base[_WH_LEN:] if not dirname else f"{dirname}/{base[_WH_LEN:]}"
            return Entry(name=shown, type="char", uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns)
        return self.toc.entry(row)

    def node(self, ino: int) -> Node:
        row = self._check(ino)
        if row & _WHITEOUT or row in self._odd:  # rare: whiteouts, out-of-range values
            return self._node_of(ino, self.entry(ino))
        c = self._cols
        code = c.kind[row] & TYPE_MASK
        target = ""
        if code == _REG:
            size = c.size[row]
        elif code == _SYMLINK:
            target = self.toc.link_name(row)
            size = len(target.encode(errors="surrogateescape"))
        else:
            size = 0
        rdev = os.makedev(*self.toc.device(row)) if code in (_CHAR, _BLOCK) else 0
        return Node(
            ino=ino,
            name=c.names[c.name_at[row] : c.name_at[row + 1]].decode(),
            type=ENTRY_TYPES[code],
            mode=_IFMT[code] | (c.mode[row] & 0o7777),
            nlink=self._nlink[ino - 1],
            uid=c.uid[row],
            gid=c.gid[row],
            size=size,
            mtime_ns=c.mtime_ns[row],
            rdev=rdev,
            target=target,
        )

    def stat(self, ino: int) -> Stat:
        """`(mode, nlink, uid, gid, size, mtime_ns, rdev)` of `node(ino)`: all the kernel's
        attributes need, without the names and objects a `Node` makes. getattr, lookup and
        every readdir entry call it, so the common rows take the shortest path."""
        row = self._check(ino)
        if row & _WHITEOUT or row in self._odd:
            n = self.node(ino)
            return n.mode, n.nlink, n.uid, n.gid, n.size, n.mtime_ns, n.rdev
        c = self._cols
        code = c.kind[row] & TYPE_MASK
        rdev = 0
        if code == _REG:
            size = c.size[row]
        elif code == _SYMLINK:
            size = len(self.toc.link_name(row).encode(errors="surrogateescape"))
        else:
            size = 0
            if code in (_CHAR, _BLOCK):
                rdev = os.makedev(*self.toc.device(row))
        return (_IFMT[code] | (c.mode[row] & 0o7777), self._nlink[ino - 1], c.uid[row],
                c.gid[row], size, c.mtime_ns[row], rdev)

    def _node_of(self, ino: int, e: Entry) -> Node:
        code = ENTRY_TYPES.index(e.type)
        size = e.size if code == _REG else 0
        if code == _SYMLINK:
            size = len(os.fsencode(e.link_name))
        return Node(
            ino=ino,
            name=e.name.rpartition("/")[2],
            type=e.type,
            mode=_IFMT[code] | (e.mode & 0o7777),
            nlink=self._nlink[ino - 1],
            uid=e.uid,
            gid=e.gid,
            size=size,
            mtime_ns=e.mtime_ns,
            rdev=os.makedev(e.dev_major, e.dev_minor) if code in (_CHAR, _BLOCK) else 0,
            target=e.link_name if code == _SYMLINK else "",
        )

    def xattrs(self, ino: int) -> dict[str, bytes]:
        """Extended attributes: the TOC's, plus overlayfs's opaque marker where due."""
        row = self._check(ino)
        found = dict(self.toc.xattrs(row)) if not row & _WHITEOUT and row != _IMPLICIT_ROOT else {}
        if ino in self._opaque:
            found[OVERLAY_OPAQUE_XATTR] = OVERLAY_OPAQUE_YES
        return found


def _name_of(names: bytes, name_at: array[int]) -> Callable[[int], bytes]:
    """The key function for child name references (a closure: lookups call it ~10 times)."""

    def name(ref: int) -> bytes:
        row = ref & _ROW
        return names[name_at[row] + (_WH_LEN if ref & _WHITEOUT else 0) : name_at[row + 1]]

    return name
