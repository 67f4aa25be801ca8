"""pyfuse3 request handlers over a `Repository`: the only place FUSE names are bytes.

Translates tree nodes into kernel attributes and error categories into errno, once,
in `_ERRNO`. Read-only: every modifying request answers EROFS.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from snapshotter import errors, metrics
from snapshotter.format.toc import Entry
from snapshotter.fs.repository import AttachedLayer, Repository
from snapshotter.fs.tree import ROOT, Stat

__all__ = ["ATTR_TIMEOUT", "LISTING_ENTRIES", "RepositoryOperations"]

log = logging.getLogger(__name__)

# Layers are immutable, so the kernel may cache names and attributes inside a layer for
# as long as it likes. Only the repository root changes (attach/detach): its entries are
# revalidated on every path walk (timeout 0), so a detached or re-attached layer id never
# resolves to a stale directory and no invalidation notice is needed (pyfuse3's notify
# calls can block on the very requests this thread serves). That costs one lookup per
# path walk through <mount>/<id>; overlayfs and bind mounts hold their dentries and do
# not walk it. The root's own attributes (nlink, mtime) may lag by a second: the
# kernel's permission check needs them on every such walk.
ATTR_TIMEOUT = 24 * 3600.0
# Directory entries whose readdir answers are kept (see RepositoryOperations): ~9 MiB,
# enough for a 30,000-file tree walked again, small next to a 100k-entry layer's tree.
LISTING_ENTRIES = 32768
_ENTRY_TIMEOUT_ROOT = 0.0
_ATTR_TIMEOUT_ROOT = 1.0

# category -> (errno for metadata requests, errno for reads of file contents).
# A read(2) that fails for any reason outside the caller's control is EIO: ENOENT or
# EACCES from read(2) would send people looking at the wrong file.
_ERRNO: dict[type[errors.LazysnapError], tuple[int, int]] = {
    errors.NotFound: (errno.ENOENT, errno.EIO),
    errors.AlreadyExists: (errno.EEXIST, errno.EIO),
    errors.FailedPrecondition: (errno.EIO, errno.EIO),
    errors.InvalidArgument: (errno.EINVAL, errno.EIO),
    errors.Unavailable: (errno.EIO, errno.EIO),
    errors.NotImplementedYet: (errno.ENOSYS, errno.EIO),
    errors.PermissionDenied: (errno.EACCES, errno.EIO),
    errors.DataLoss: (errno.EIO, errno.EIO),
    errors.ClosedError: (errno.EIO, errno.EIO),
}

_P = ParamSpec("_P")
_T = TypeVar("_T")


def errno_for(exc: BaseException, *, read: bool = False) -> int:
    """The errno a request answers for `exc`; EIO for anything uncategorised."""
    cat = errors.category(exc)
    if cat is None:
        return errno.EIO
    return _ERRNO[cat][1 if read else 0]


def _handler(fn: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """Let only FUSEError out: anything else would end pyfuse3.main for everyone; time it."""
    observe = metrics.fuse_observer(fn.__name__)

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except errors.LazysnapError as exc:
            log.warning("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            observe(time.perf_counter() - started)

    return wrapper


def _layer_attrs(layer: AttachedLayer) -> pyfuse3.EntryAttributes:
    """Attributes with what every inode of `layer` shares; `_fill` adds the inode's own."""
    a = pyfuse3.EntryAttributes()
    a.generation = layer.generation
    a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT
    a.st_blksize = 4096
    return a


def _negative_entry() -> pyfuse3.EntryAttributes:
    """A lookup answer for a name a layer does not have: inode 0 with a timeout makes the
    kernel cache the miss (ENOENT would not), so overlayfs probing the lower layers and
    Python's import system probing sys.path ask each missing name only once. Layers are
    immutable; a layer detached and another attached in its place comes back under a
    new directory inode (its layer root is looked up with no entry timeout), which drops
    what was cached beneath the old one."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = ATTR_TIMEOUT
    return a


_ABSENT = _negative_entry()


def _fill(a: pyfuse3.EntryAttributes, ino: int, st: Stat) -> Stat:
    mode, nlink, uid, gid, size, mtime_ns, rdev = st
    a.st_ino = ino
    a.st_mode = mode
    a.st_nlink = nlink
    a.st_uid = uid
    a.st_gid = gid
    a.st_rdev = rdev
    a.st_size = size
    a.st_blocks = (size + 511) // 512
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
    return st


async def _rofs(self: Any, *args: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


@dataclass(slots=True)
class _OpenFile:
    layer: AttachedLayer
    entry: Entry
    path: str  # for log messages
    opens: int = 1  # 0: opened by a previous daemon (handoff), never released here


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class RepositoryOperations(pyfuse3.Operations):
    """Serves a `Repository` read-only; see `fs.mount.run_repository` for the lifecycle.

    Reads fetch only the chunks a request covers; open files set `keep_cache` so the
    page cache survives close and reopen. A read that has not finished after
    `read_timeout` seconds answers EIO (the fetch behind it may go on for others).
    Lookup counts are not tracked: inodes are derived from immutable trees and never
    reused, so `forget` has nothing to free.

    File and directory handles are the inode numbers, counted per inode: a daemon that
    took the mount over from its predecessor (`fs.mount`) reads files and directories
    the predecessor opened without ever having seen their `open`.

    Directory listings: pyfuse3 cannot let the kernel cache them (FOPEN_CACHE_DIR), so
    every readdir reaches Python. The last `listing_entries` entries listed (names and
    attributes, whole directories, least recently listed dropped first; ~270 bytes
    each) are kept, which makes a repeated walk cost what an in-memory tree costs.
    """

    def __init__(
        self, repository: Repository, *, read_timeout: float = 30.0,
        listing_entries: int = LISTING_ENTRIES,
    ) -> None:
        super().__init__()
        self.repository = repository
        self.read_timeout = read_timeout
        self.listing_entries = listing_entries
        # global directory inode -> (names, attributes); slots are never reused in a
        # process, so an entry of a detached layer is only dead weight until dropped
        self._listings: collections.OrderedDict[
            int, tuple[list[bytes], list[pyfuse3.EntryAttributes]]
        ] = collections.OrderedDict()
        self._listed = 0  # entries in _listings
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, tuple[AttachedLayer | None, int]] = {}
        self._dir_opens: collections.Counter[int] = collections.Counter()

    # -- attributes ------------------------------------------------------------------

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.ROOT_INODE
        a.entry_timeout = _ENTRY_TIMEOUT_ROOT
        a.attr_timeout = _ATTR_TIMEOUT_ROOT
        a.st_mode = 0o40755
        a.st_nlink = 2 + len(self.repository.layers())
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.repository.changed_ns
        return a

    def _attrs(self, layer: AttachedLayer, local: int) -> pyfuse3.EntryAttributes:
        a = _layer_attrs(layer)
        if local == ROOT:
            a.entry_timeout = _ENTRY_TIMEOUT_ROOT
        _fill(a, layer.ino(local), layer.tree.stat(local))
        return a

    def _resolve(self, ino: int) -> tuple[AttachedLayer, int]:
        found = self.repository.resolve(ino)
        if found is None:  # never existed, or its layer was detached
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    def _node_attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == pyfuse3.ROOT_INODE:
            return self._root_attrs()
        layer, local = self._resolve(ino)
        return self._attrs(layer, local)

    # -- names -----------------------------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._node_attrs(parent_inode)
        if parent_inode == pyfuse3.ROOT_INODE:
            if name == b"..":
                return self._root_attrs()
            layer = self.repository.layer(os.fsdecode(name))
            if layer is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(layer, ROOT)
        layer, local = self._resolve(parent_inode)
        if name == b"..":
            up = layer.tree.parent(local)
            return self._attrs(layer, up) if up else self._root_attrs()
        child = layer.tree.lookup(local, name)
        if child is None:
            return _ABSENT  # a layer never changes: the kernel may remember the miss
        return self._attrs(layer, child)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._node_attrs(inode)

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        layer, local = self._resolve(inode)
        node = layer.tree.node(local)
        if node.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    # -- directories -----------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == pyfuse3.ROOT_INODE:
            held: tuple[AttachedLayer | None, int] = (None, 0)
        else:
            layer, local = self._resolve(inode)
            if not layer.tree.is_dir(local):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            held = (layer, local)
        self._dirs.setdefault(inode, held)
        self._dir_opens[inode] += 1
        return inode

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        held = self._dirs.get(fh)
        if held is None:  # opened before a handoff
            held = (None, 0) if fh == pyfuse3.ROOT_INODE else self._resolve(fh)
        layer, local = held
        if layer is None:
            # Offsets are slots: never reused, so attach/detach between calls can
            # neither repeat nor skip a layer that stays attached.
            for attached in self.repository.layers():
                if attached.slot <= start_id:
                    continue
                attrs = self._attrs(attached, ROOT)
                name = os.fsencode(attached.layer_id)
                if not pyfuse3.readdir_reply(token, name, attrs, attached.slot):
                    return
            return
        ino = layer.ino(local)
        cached = self._listings.get(ino)
        if cached is None and layer.tree.child_count(local) <= self.listing_entries // 8:
            cached = self._listing(layer, local)
        if cached is not None:
            self._listings.move_to_end(ino)
            names, attrs = cached
            reply = pyfuse3.readdir_reply
            for pos in range(max(start_id, 0), len(names)):
                if not reply(token, names[pos], attrs[pos], pos + 1):
                    return
            return
        # One EntryAttributes for every entry: readdir_reply copies it into the reply at
        # once. A layer's directories never list its ROOT, so the timeouts stay put.
        # Fields equal to the previous entry's are not set again: neighbours mostly share
        # owner and mtime, and each time field costs a division in pyfuse3's setter.
        a, base, reply = _layer_attrs(layer), layer.ino(0), pyfuse3.readdir_reply
        last: Stat = _fill(a, 0, (0, 0, 0, 0, 0, 0, 0))
        for pos, name, child, st in layer.tree.listing(local, start_id):
            mode, nlink, uid, gid, size, mtime_ns, rdev = st
            a.st_ino = base | child
            a.st_mode = mode
            a.st_nlink = nlink
            if size != last[4]:
                a.st_size = size
                a.st_blocks = (size + 511) // 512
            if mtime_ns != last[5]:
                a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
            if uid != last[2] or gid != last[3] or rdev != last[6]:
                a.st_uid, a.st_gid, a.st_rdev = uid, gid, rdev
            last = st
            if not reply(token, name, a, pos + 1):
                return

    def _listing(
        self, layer: AttachedLayer, local: int
    ) -> tuple[list[bytes], list[pyfuse3.EntryAttributes]]:
        """List a directory of `layer` whole into `_listings`, dropping the stalest."""
        names: list[bytes] = []
        attrs: list[pyfuse3.EntryAttributes] = []
        base, generation, new = layer.ino(0), layer.generation, pyfuse3.EntryAttributes
        # `_fill` without the fields a new EntryAttributes holds already (blksize 4096,
        # nlink 1, zeros): this runs once per entry of every directory first listed.
        for _, name, child, (mode, nlink, uid, gid, size, mtime_ns, rdev) in layer.tree.listing(
            local
        ):
            a = new()
            a.attr_timeout = a.entry_timeout = ATTR_TIMEOUT
            a.st_ino = base | child
            a.st_mode = mode
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
            if generation:
                a.generation = generation
            if nlink != 1:
                a.st_nlink = nlink
            if size:
                a.st_size = size
                a.st_blocks = (size + 511) // 512
            if uid or gid or rdev:
                a.st_uid, a.st_gid, a.st_rdev = uid, gid, rdev
            names.append(name)
            attrs.append(a)
        while self._listings and self._listed + len(names) > self.listing_entries:
            self._listed -= len(self._listings.popitem(last=False)[1][0])
        self._listings[layer.ino(local)] = names, attrs
        self._listed += len(names)
        return names, attrs

    @_handler
    async def releasedir(self, fh: int) -> None:
        if self._dir_opens[fh] > 1:
            self._dir_opens[fh] -= 1
        else:
            self._dir_opens.pop(fh, None)
            self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        layer, local = self._resolve(inode)
        entry = layer.tree.entry(local)
        if entry.type == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        if entry.type != "reg":  # devices and fifos never reach us; be safe anyway
            raise pyfuse3.FUSEError(errno.EINVAL)
        f = self._files.get(inode)
        if f is None:
            self._files[inode] = _OpenFile(layer, entry, f"{layer.layer_id}/{entry.name}")
        else:
            f.opens += 1
        layer.open_files += 1
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _adopt(self, fh: int) -> _OpenFile:
        """A file a previous daemon opened: its handle is its inode."""
        found = self.repository.resolve(fh)
        if found is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        layer, local = found
        entry = layer.tree.entry(local)
        if entry.type != "reg":
            raise pyfuse3.FUSEError(errno.EBADF)
        f = self._files[fh] = _OpenFile(layer, entry, f"{layer.layer_id}/{entry.name}", 0)
        return f

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files.get(fh) or self._adopt(fh)
        try:
            with trio.fail_after(self.read_timeout):
                return await self.repository.read(f.layer, f.entry, off, size)
        except trio.TooSlowError:
            failure, code = f"no data after {self.read_timeout:g} s", errno.EIO
        except errors.LazysnapError as exc:
            failure, code = str(exc), errno_for(exc, read=True)
        f.layer.read_errors += 1
        log.warning("read %s [%d, +%d]: %s", f.path, off, size, failure)
        raise pyfuse3.FUSEError(code)

    @_handler
    async def release(self, fh: int) -> None:
        f = self._files.get(fh)
        if f is None:
            return
        if f.opens > 0:
            f.opens -= 1
            f.layer.open_files -= 1
        if f.opens == 0:
            del self._files[fh]

    # -- extended attributes, statfs -------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, bytes]:
        if inode == pyfuse3.ROOT_INODE:
            return {}
        layer, local = self._resolve(inode)
        return layer.tree.xattrs(local)

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(k) for k in self._xattrs(inode)]

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        layers = self.repository.layers()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum((la.tree.total_size + 4095) // 4096 for la in layers)
        s.f_bfree = s.f_bavail = 0
        s.f_files = 1 + sum(len(la.tree) for la in layers)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- read-only -------------------------------------------------------------------

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _rofs  # type: ignore[assignment]
    write = create = setxattr = removexattr = _rofs  # type: ignore[assignment]
