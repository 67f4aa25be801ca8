"""Full path -> row while a `TocBuilder` fills a `Toc` (only `format/_tocbuild.py` uses it)."""

from __future__ import annotations

from array import array
from collections.abc import Callable

__all__ = ["PathIndex"]


class PathIndex:
    """An open-addressing table of (hash of path, row) in two arrays.

    A dict of paths would keep every path's str alive until the build ends: ~190 bytes
    per entry at the parse's peak for a 100k-entry TOC, against ~30 here. A slot whose
    hash matches is confirmed by rebuilding that row's path with `path_of`; the last hit
    is remembered, as entries come directory by directory and each asks for its parent.
    """

    __slots__ = ("_count", "_hashes", "_last_path", "_last_row", "_path_of", "_rows")

    def __init__(self, path_of: Callable[[int], str]) -> None:
        self._path_of = path_of
        self._rows = array("I", [0]) * 1024  # row + 1; 0: empty slot
        self._hashes = array("q", [0]) * 1024
        self._count = 0
        self._last_path: str | None = None
        self._last_row = 0

    def get(self, path: str) -> int | None:
        if path == self._last_path:
            return self._last_row
        h = hash(path)
        rows, hashes = self._rows, self._hashes
        mask = len(rows) - 1
        i = h & mask
        while r := rows[i]:
            if hashes[i] == h and self._path_of(r - 1) == path:
                self._last_path, self._last_row = path, r - 1
                return r - 1
            i = (i + 1) & mask
        return None

    def setdefault(self, path: str, row: int) -> None:
        """Index `path` at `row` unless it is indexed already (the first row wins)."""
        if self.get(path) is None:
            self._insert(hash(path), row)
            if 2 * self._count > len(self._rows):
                self._grow()

    def add(self, path: str, row: int) -> None:
        """Index `path`, known not to be indexed yet, at `row`."""
        self._insert(hash(path), row)
        if 2 * self._count > len(self._rows):
            self._grow()

    def _insert(self, h: int, row: int) -> None:
        rows = self._rows
        mask = len(rows) - 1
        i = h & mask
        while rows[i]:
            i = (i + 1) & mask
        rows[i] = row + 1
        self._hashes[i] = h
        self._count += 1

    def _grow(self) -> None:
        rows, hashes = self._rows, self._hashes
        size = 2 * len(rows)
        self._rows, self._hashes = array("I", [0]) * size, array("q", [0]) * size
        self._count = 0
        for k, r in enumerate(rows):
            if r:
                self._insert(hashes[k], r - 1)
