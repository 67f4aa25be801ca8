"""`LayerTree.from_toc`: the one pass that lays a `Toc` out as inodes. Kept apart from
`fs/tree.py` only for size; it fills the tree's arrays, which are that module's."""

from __future__ import annotations

import ctypes
import itertools
from array import array
from collections.abc import Callable

from snapshotter.format.toc import NO_PARENT, OTHER_TYPE, TYPE_MASK
from snapshotter.format.whiteout import WHITEOUT_PREFIX, WhiteoutKind
from snapshotter.format.whiteout import classify as classify_name
from snapshotter.fs.tree import (
    _DIR,
    _HARDLINK,
    _REG,
    _ROW,
    _WH_LEN,
    _WHITEOUT,
    ROOT,
    InvalidTree,
    LayerTree,
)

__all__ = ["build"]

_WH = WHITEOUT_PREFIX.encode()
_HIDDEN = 0  # in the build's row -> inode map: not shown, nor anything below it
_NOT_A_NODE = 0xFFFF_FFFF  # hardlinks, whiteouts, the opaque marker: no inode of their own


def build(tree: LayerTree) -> LayerTree:
    """Fill the empty `tree` from its `toc`; raises InvalidTree."""
    _Build(tree).run()
    _return_freed_memory()
    return tree


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
