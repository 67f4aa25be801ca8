"""One layer's read-only tree as the kernel should see it: inodes, names, attributes.

Pure data built once from a `Toc`; no FUSE, no I/O. `fs/ops.py` turns a `Node` into
pyfuse3 attributes and `fs/repository.py` gives each tree a slot in the global inode space.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import stat
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import NamedTuple

from snapshotter.errors import InvalidArgument
from snapshotter.format.toc import ENTRY_TYPES, NO_PARENT, OTHER_TYPE, TYPE_MASK, Entry, Toc
from snapshotter.format.whiteout import (
    OVERLAY_OPAQUE_XATTR,
    OVERLAY_OPAQUE_YES,
    WHITEOUT_PREFIX,
    WhiteoutKind,
)
from snapshotter.format.whiteout import classify as classify_name

__all__ = ["ROOT", "InvalidTree", "LayerTree", "Node"]

ROOT = 1  # local inode of the layer's top directory; local inodes are 1..len(tree)

_DIR, _REG, _SYMLINK, _HARDLINK, _CHAR, _BLOCK = range(6)
# file type bits by ENTRY_TYPES index (hardlinks never become inodes of their own)
_IFMT = (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, 0, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO)
assert ENTRY_TYPES[_BLOCK] == "block" and len(_IFMT) == len(ENTRY_TYPES)

# In `LayerTree._row` (inode -> TOC row) and in child name references:
_WHITEOUT = 1 << 31  # the char 0/0 shown for the `.wh.NAME` entry of this row, named NAME
_ROW = _WHITEOUT - 1
_IMPLICIT_ROOT = 0xFFFF_FFFF  # the TOC has no "" entry: a 0o755 root owned by 0:0
# In the build's row -> inode map:
_HIDDEN = 0  # not shown, nor anything below it
_NOT_A_NODE = 0xFFFF_FFFF  # hardlinks, whiteouts, the opaque marker: no inode of their own
_WH_LEN = len(WHITEOUT_PREFIX)
_WH = WHITEOUT_PREFIX.encode()


class InvalidTree(InvalidArgument):
    """The TOC cannot be presented as a tree (missing parent, dangling hardlink, ...)."""


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

    @classmethod
    def from_toc(cls, toc: Toc) -> LayerTree:
        """Build the tree; raises InvalidTree if the TOC breaks the `Toc` invariants."""
        tree = _Build(cls(toc)).run()
        _return_freed_memory()
        return tree

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


def _return_freed_memory() -> None:
    """Hand the pages the parse and the build freed back to the OS (about 1 ms).

    Without this a daemon keeps them: freeing the TOC text (tens of MB, mmap'd) makes
    glibc raise its trim threshold to twice that, so freed heap pages stay resident
    and a 100k-entry layer costs ~50 bytes of RSS per entry more than it holds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


class _Build:
    """`LayerTree.from_toc`, one pass over the TOC's columns and a sort per directory.

    Transient state is arrays too (row -> inode), so building a 100k-entry tree peaks at
    a few MB besides the result; hardlinks and whiteouts (rare) are lists.
    """

    def __init__(self, tree: LayerTree) -> None:
        self.tree = tree
        self.toc = tree.toc
        self.ino_of = array("I", [_NOT_A_NODE]) * len(self.toc)  # row -> inode or _HIDDEN
        self.kid_dir = array("I")  # children so far, unsorted: (dir inode, name ref, inode)
        self.kid_ref = array("I")
        self.kid_ino = array("I")
        self.hardlinks: list[tuple[int, int]] = []  # (dir inode, row)
        self.whiteouts: list[tuple[int, int]] = []
        self.opaque: set[int] = set()

    def run(self) -> LayerTree:
        tree, c = self.tree, self.toc.columns
        names, at, parents, kinds, sizes = c.names, c.name_at, c.parent, c.kind, c.size
        ino_of, row_of, parent_of = self.ino_of, tree._row, tree._parent
        for row in range(len(self.toc)):
            p = parents[row]
            code = kinds[row] & TYPE_MASK
            if p == 0:
                if at[row] == at[row + 1]:  # the "" entry: the layer's root
                    if code != _DIR:
                        raise InvalidTree(f"layer root '' is a {self.toc.type(row)}, not a dir")
                    row_of[0] = row
                    ino_of[row] = ROOT
                    continue
                pino = ROOT
            else:
                pino = ino_of[p - 1] if p != NO_PARENT else _NOT_A_NODE
                if pino == _HIDDEN:
                    ino_of[row] = _HIDDEN
                    continue
                if pino == _NOT_A_NODE or kinds[p - 1] & TYPE_MASK != _DIR:
                    name = self.toc.name(row)
                    raise InvalidTree(
                        f"entry {name!r}: parent {name.rpartition('/')[0]!r} is not a directory"
                    )
            if names.startswith(_WH, at[row], at[row + 1]):
                kind, _ = classify_name(self.toc.base_name(row).decode())
                if kind is WhiteoutKind.OPAQUE:
                    self.opaque.add(pino)
                    continue
                if kind is WhiteoutKind.META:
                    ino_of[row] = _HIDDEN
                    continue
                if kind is WhiteoutKind.WHITEOUT:
                    self.whiteouts.append((pino, row))
                    continue
            if code == _HARDLINK:
                self.hardlinks.append((pino, row))
                continue
            if code == OTHER_TYPE:
                raise InvalidTree(
                    f"entry {self.toc.name(row)!r}: unknown type {self.toc.type(row)!r}"
                )
            row_of.append(row)
            ino = ino_of[row] = len(row_of)
            parent_of.append(pino if code == _DIR else 0)
            self.kid_dir.append(pino)
            self.kid_ref.append(row)
            self.kid_ino.append(ino)
            if code == _REG:
                tree.total_size += sizes[row]
        tree._nlink = array("I", [1]) * len(row_of)
        tree._nlink[0] = 2
        self._index()
        if self.hardlinks or self.whiteouts:
            self._links_and_whiteouts()
            self._index()
        nlink = tree._nlink
        for k in range(1, len(row_of)):
            p = parent_of[k]
            if p:  # a directory: only those record their parent
                nlink[k] += 1  # its "."
                nlink[p - 1] += 1  # its ".."
        tree._opaque = frozenset(self.opaque)
        return tree

    def _index(self) -> None:
        """Lay the children out by directory, each directory's sorted by name."""
        tree, kid_dir = self.tree, self.kid_dir
        n = len(tree._row)
        counts = array("I", [0]) * (n + 1)
        for d in kid_dir:
            counts[d] += 1
        at = array("I", [0]) * (n + 1)
        total = 0
        for ino in range(1, n + 1):
            at[ino - 1] = total
            total += counts[ino]
        at[n] = total
        fill = array("I", at)
        refs, inos = array("I", [0]) * total, array("I", [0]) * total
        for d, ref, ino in zip(kid_dir, self.kid_ref, self.kid_ino, strict=True):
            k = fill[d - 1]
            refs[k], inos[k] = ref, ino
            fill[d - 1] = k + 1
        tree._kids_at, tree._kid_ref, tree._kid_ino = at, refs, inos
        names, name_at = self.toc.columns.names, self.toc.columns.name_at
        for ino in range(1, n + 1):
            lo, hi = at[ino - 1], at[ino]
            if hi - lo < 2:
                continue
            keys = [
                names[name_at[r] : name_at[r + 1]] if r < _WHITEOUT else tree._name(r)
                for r in refs[lo:hi]
            ]
            order = sorted(range(hi - lo), key=keys.__getitem__)
            refs[lo:hi] = array("I", [refs[lo + k] for k in order])
            inos[lo:hi] = array("I", [inos[lo + k] for k in order])
            for a, b in itertools.pairwise(order):
                if keys[a] == keys[b]:
                    raise InvalidTree(f"entry {self.toc.name(refs[lo + b] & _ROW)!r} appears twice")

    def _add(self, dir_ino: int, ref: int, ino: int) -> None:
        self.kid_dir.append(dir_ino)
        self.kid_ref.append(ref)
        self.kid_ino.append(ino)

    def _links_and_whiteouts(self) -> None:
        tree, toc = self.tree, self.toc
        linked: dict[tuple[int, bytes], int] = {}  # hardlink names resolved so far

        def find(dir_ino: int, name: bytes) -> int | None:
            return tree.lookup(dir_ino, name) or linked.get((dir_ino, name))

        pending = self.hardlinks
        while pending:  # a hardlink may name another hardlink (tar allows it)
            later = []
            for pino, row in pending:
                target: int | None = ROOT
                for part in toc.link_name(row).encode().split(b"/"):
                    target = find(target, part) if target and part else target
                if not target:  # unknown, hidden, or a hardlink not resolved yet
                    later.append((pino, row))
                    continue
                if tree.is_dir(target):
                    raise InvalidTree(
                        f"hardlink {toc.name(row)!r}: target {toc.link_name(row)!r} is a dir"
                    )
                base = toc.base_name(row)
                if find(pino, base):
                    raise InvalidTree(f"entry {toc.name(row)!r} appears twice")
                linked[pino, base] = target
                tree._nlink[target - 1] += 1
                self._add(pino, row, target)
            if len(later) == len(pending):
                row = later[0][1]
                raise InvalidTree(
                    f"hardlink {toc.name(row)!r}: target {toc.link_name(row)!r} does not exist"
                )
            pending = later
        for pino, row in self.whiteouts:
            shown = toc.base_name(row)[_WH_LEN:]
            if find(pino, shown):
                continue
            linked[pino, shown] = 0  # a second `.wh.` of one name adds nothing
            tree._row.append(row | _WHITEOUT)
            tree._parent.append(0)
            tree._nlink.append(1)
            self._add(pino, row | _WHITEOUT, len(tree._row))
