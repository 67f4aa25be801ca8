"""The containerd snapshotter method set, with overlayfs semantics and remote layers.

`Snapshotter` orchestrates three things per call: a metastore transaction (the rules),
directories under `<root>/snapshots/<id>/{fs,work}` (built in a temp dir and renamed into
place inside the transaction, deleted only after it commits), and remote layers through
the `RemoteLayers` Protocol. Every method is safe to call from many threads at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from snapshotter import labels as L
from snapshotter.core.filters import parse_filters
from snapshotter.core.metastore import Snapshot, SqliteMetaStore
from snapshotter.core.mounts import snapshot_mounts
from snapshotter.core.remote import RemoteLayers, RemoteRequired
from snapshotter.core.types import Info, Kind, Mount, Usage
from snapshotter.errors import (
    AlreadyExists,
    ClosedError,
    FailedPrecondition,
    NotFound,
    Unavailable,
)

__all__ = ["Snapshotter"]

log = logging.getLogger(__name__)


class NotMountable(FailedPrecondition):
    pass


def _index_off_supported() -> bool:
    try:
        return Path("/sys/module/overlay/parameters/index").read_text().strip() in ("Y", "N")
    except OSError:
        return False


def disk_usage(path: Path) -> Usage:
    """Bytes in allocated blocks and inodes under `path`, hardlinks counted once (as
    containerd's fs.DiskUsage does)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            try:
                st = os.lstat(name)
            except FileNotFoundError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            size += st.st_blocks * 512
    return Usage(size=size, inodes=len(seen))


class Snapshotter:
    """containerd's Snapshotter contract (core/snapshots/snapshotter.go), in Python.

    Vocabulary: `key` names an active or view snapshot, `name` a committed one; `parent`
    is a committed name. Lifecycle: prepare(key, parent) -> mounts; the caller mounts,
    writes, unmounts; commit(name, key) freezes it so it can parent others; view(key,
    parent) gives a read-only look; remove(key) refuses while children exist.
    """

    def __init__(self, root: Path, *, remote: RemoteLayers | None = None) -> None:
        self.root = Path(root)
        self._snapdir = self.root / "snapshots"
        self._snapdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._store = SqliteMetaStore(self.root / "metadata.db")
        self._remote = remote
        self._index_off = _index_off_supported()
        self._closed = False
        self._recover()

    # -- paths ----------------------------------------------------------------
    def _upper(self, sid: int) -> str:
        return str(self._snapdir / str(sid) / "fs")

    def _work(self, sid: int) -> str:
        return str(self._snapdir / str(sid) / "work")

    def _lower(self, sid: int, remote: str | None) -> str:
        if remote is not None and self._remote is not None:
            return self._remote.lowerdir(remote)
        return self._upper(sid)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        if self._remote is not None:
            for _, handle in snap.parents:
                if handle is not None:
                    self._remote.check(handle)
        lowers = [self._lower(pid, handle) for pid, handle in snap.parents]
        return snapshot_mounts(
            snap.kind, self._upper(snap.id), self._work(snap.id), lowers,
            index_off=self._index_off,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("snapshotter is closed")

    # -- the containerd method set ---------------------------------------------
    def stat(self, key: str) -> Info:
        self._check_open()
        with self._store.transaction() as tx:
            return tx.stat(key)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        self._check_open()
        with self._store.transaction() as tx:
            return tx.update(info, fieldpaths)

    def usage(self, key: str) -> Usage:
        self._check_open()
        with self._store.transaction() as tx:
            snap, usage = tx.usage(key)
        if snap.kind == Kind.ACTIVE:
            return disk_usage(Path(self._upper(snap.id)))
        return usage

    def mounts(self, key: str) -> list[Mount]:
        self._check_open()
        with self._store.transaction() as tx:
            snap = tx.get(key)
        if snap.kind == Kind.COMMITTED:
            raise NotMountable(f"snapshot {key!r}: is committed; only active and view "
                               "snapshots have mounts")
        return self._mounts(snap)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        self._check_open()
        labels = dict(labels or {})
        target = labels.get(L.SNAPSHOT_REF, "")
        if target and self._remote is not None:
            self._prepare_remote(key, parent, labels, target)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        self._check_open()
        return self._create(Kind.VIEW, key, parent, dict(labels or {}))

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self._check_open()
        with self._store.transaction() as tx:
            snap = tx.get(key)
        # Measured outside the lock: a large layer takes long to walk. Kind is checked
        # again inside the transaction.
        usage = disk_usage(Path(self._upper(snap.id))) if snap.kind == Kind.ACTIVE else Usage()
        with self._store.transaction() as tx:
            tx.commit(key, name, usage, dict(labels or {}))

    def remove(self, key: str) -> None:
        self._check_open()
        with self._store.transaction() as tx:
            snap = tx.remove(key)
            src = self._snapdir / str(snap.id)
            trash = self._snapdir / f"rm-{snap.id}"
            if src.exists():
                os.rename(src, trash)
        # After commit: a crash here leaves rm-<id>, which _recover deletes.
        shutil.rmtree(trash, ignore_errors=True)
        if snap.remote is not None and self._remote is not None:
            try:
                self._remote.release(snap.remote)
            except Exception:
                log.exception("snapshot %r: releasing its remote layer failed", key)

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        self._check_open()
        match = parse_filters(filters)
        with self._store.transaction() as tx:
            return tx.walk(match)

    def cleanup(self) -> None:
        """Remove directories that no row references (and unfinished creations/removals)."""
        self._check_open()
        with self._store.transaction() as tx:
            ids = tx.ids()
            doomed = [
                p for p in self._snapdir.iterdir()
                if not (p.name.isdigit() and int(p.name) in ids)
            ]
            for p in doomed:
                os.rename(p, p.with_name(f"cleanup-{p.name}"))
        for p in doomed:
            shutil.rmtree(p.with_name(f"cleanup-{p.name}"), ignore_errors=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store.close()

    # -- internals --------------------------------------------------------------
    def _check_remote_parents(self, parent: str) -> None:
        """Raise Unavailable before anything is created if a remote ancestor is broken."""
        if not parent or self._remote is None:
            return
        with self._store.transaction() as tx:
            try:
                psnap = tx.get(parent)
            except NotFound:
                return  # tx.create names the missing parent
        for handle in (psnap.remote, *(h for _, h in psnap.parents)):
            if handle is not None:
                self._remote.check(handle)

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        self._check_remote_parents(parent)
        # The temp dir is made inside the transaction so that cleanup(), which holds the
        # same lock, never sees a half-built snapshot.
        with self._store.transaction() as tx:
            td = Path(tempfile.mkdtemp(prefix="new-", dir=self._snapdir))
            try:
                snap = tx.create(kind, key, parent, labels)
                (td / "fs").mkdir(mode=0o755)
                os.chmod(td / "fs", 0o755)
                if kind == Kind.ACTIVE:
                    (td / "work").mkdir(mode=0o711)
                if snap.parents:
                    # Like containerd: the new upper dir takes its parent's root owner, so
                    # a non-root image root stays non-root.
                    st = os.stat(self._lower(*snap.parents[0]))
                    os.lchown(td / "fs", st.st_uid, st.st_gid)
                os.rename(td, self._snapdir / str(snap.id))
            except BaseException:
                shutil.rmtree(td, ignore_errors=True)
                raise
        return self._mounts(snap)

    def _prepare_remote(
        self, key: str, parent: str, labels: dict[str, str], target: str
    ) -> None:
        """Raise AlreadyExists when the layer is now provided remotely; return to fall back."""
        assert self._remote is not None
        with self._store.transaction() as tx:
            try:
                tx.stat(target)
            except NotFound:
                pass
            else:
                raise AlreadyExists(f"target snapshot {target!r}: already exists")
        try:
            handle = self._remote.prepare(key, parent, labels)
        except RemoteRequired:
            raise
        except Exception:
            log.exception("snapshot %r: remote prepare failed; falling back to a plain "
                          "snapshot", key)
            return
        if handle is None:
            return
        commit_labels = {**labels, L.REMOTE: L.REMOTE_VALUE}
        try:
            with self._store.transaction() as tx:
                td = Path(tempfile.mkdtemp(prefix="new-", dir=self._snapdir))
                try:
                    snap = tx.create(Kind.ACTIVE, key, parent, labels)
                    tx.commit(key, target, Usage(), commit_labels, remote=handle)
                    (td / "fs").mkdir(mode=0o755)
                    os.rename(td, self._snapdir / str(snap.id))
                except BaseException:
                    shutil.rmtree(td, ignore_errors=True)
                    raise
        except BaseException:
            self._remote.release(handle)
            raise
        log.info("snapshot %r: remote-snapshot-prepared=true as %r", key, target)
        raise AlreadyExists(f"target snapshot {target!r}: already exists (remote)")

    def _recover(self) -> None:
        """Finish what a crash interrupted: undo half-done removals whose row survived,
        drop everything no row references, and re-attach remote layers."""
        with self._store.transaction() as tx:
            ids = tx.ids()
            for p in list(self._snapdir.iterdir()):
                if p.name.startswith("rm-") and p.name[3:].isdigit() and int(p.name[3:]) in ids:
                    log.warning("snapshot dir %s: rolled back an unfinished removal", p)
                    os.rename(p, self._snapdir / p.name[3:])
            remotes = tx.remote_snapshots()
        self.cleanup()
        if self._remote is not None:
            for _, key, handle in remotes:
                try:
                    self._remote.restore(handle)
                except Exception:
                    log.exception("snapshot %r: restoring its remote layer failed", key)
        missing = [
            i for i in ids if not (self._snapdir / str(i) / "fs").is_dir()
        ]
        if missing:
            raise Unavailable(
                f"metadata store at {self.root}: snapshot dirs missing for ids {missing}"
            )
