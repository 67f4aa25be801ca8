"""A trivial in-memory pyfuse3 tree with the shape of a directory: the metadata floor.

`find` over any pyfuse3 file system pays a trip into Python per `readdir` (pyfuse3 cannot
let the kernel cache directory listings), so the metadata part compares lazysnap with this
file system too: everything is in a dict, attributes are cached as long as lazysnap's, and
there is nothing to fetch. Whatever lazysnap costs above it is lazysnap's own.

    python -m tests.bench.trivialfs SRC MOUNTPOINT   # prints "ready"; `fusermount3 -u` ends it
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from snapshotter.fs.ops import ATTR_TIMEOUT

_OPTIONS = {"fsname=trivialfs", "allow_other", "default_permissions", "ro"}


class TrivialOperations(pyfuse3.Operations):
    """A read-only tree of names and attributes (no file contents) loaded at start."""

    def __init__(self, src: Path) -> None:
        super().__init__()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self.links: dict[int, bytes] = {}
        self._load(src, pyfuse3.ROOT_INODE)

    def _load(self, path: Path, ino: int) -> None:
        st = path.lstat()
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_nlink = ino, st.st_mode, st.st_nlink
        a.st_uid, a.st_gid, a.st_size = st.st_uid, st.st_gid, st.st_size
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = st.st_mtime_ns
        a.st_blksize, a.st_blocks = 4096, (st.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT
        self.attrs[ino] = a
        if stat.S_ISLNK(st.st_mode):
            self.links[ino] = os.fsencode(os.readlink(path))
        if stat.S_ISDIR(st.st_mode):
            kids = []
            for child in sorted(path.iterdir(), key=lambda p: p.name):
                child_ino = len(self.attrs) + pyfuse3.ROOT_INODE
                kids.append((os.fsencode(child.name), child_ino))
                self._load(child, child_ino)
            self.children[ino] = kids

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        for child_name, ino in self.children.get(parent_inode, []):
            if child_name == name:
                return self.attrs[ino]
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.links[inode]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        kids = self.children[fh]
        for pos in range(start_id, len(kids)):
            name, ino = kids[pos]
            if not pyfuse3.readdir_reply(token, name, self.attrs[ino], pos + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None


def main(src: str, mountpoint: str) -> None:
    ops = TrivialOperations(Path(src))
    pyfuse3.init(ops, mountpoint, _OPTIONS)
    print("ready", flush=True)
    try:
        # Returns when someone unmounts the mountpoint: that is how the caller stops us.
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
