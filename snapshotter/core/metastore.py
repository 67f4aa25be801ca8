"""Snapshot metadata in SQLite: the state machine of containerd's snapshot storage.

What may be created, committed, removed or used as a parent is decided here, inside one
SQLite transaction per call (WAL, synchronous=FULL), so a crash leaves either the old or
the new state. Directories are the caller's business, with one rule the recovery code
relies on: every row has `<root>/snapshots/<id>`; dirs named `new-*` are unfinished
creations and `rm-<id>` unfinished removals.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from snapshotter.core.filters import Filter
from snapshotter.core.types import Info, Kind, Usage
from snapshotter.errors import (
    AlreadyExists,
    ClosedError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from snapshotter.labels import validate_labels

__all__ = [
    "ParentNotCommitted",
    "Snapshot",
    "SnapshotExists",
    "SnapshotNotFound",
    "SqliteMetaStore",
    "Transaction",
    "check_consistency",
]


class SnapshotNotFound(NotFound):
    pass


class SnapshotExists(AlreadyExists):
    pass


class ParentNotCommitted(InvalidArgument):
    pass


class NotActive(FailedPrecondition):
    pass


class HasChildren(FailedPrecondition):
    pass


class InvalidFieldPath(InvalidArgument):
    pass


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A row plus its ancestry: `parents` are (id, remote) nearest parent first."""

    id: int
    kind: Kind
    key: str
    parents: tuple[tuple[int, str | None], ...] = ()
    remote: str | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

_COLUMNS = "id, key, parent_id, kind, labels, created_ns, updated_ns, size, inodes, remote"


def _nonempty(labels: Mapping[str, str]) -> dict[str, str]:
    """containerd never stores a label whose value is empty: empty means "absent"."""
    return {k: v for k, v in labels.items() if v}


def _now_ns() -> int:
    return time.time_ns()


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


class Transaction:
    """Operations valid inside one `SqliteMetaStore.transaction()`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def _row(self, key: str) -> sqlite3.Row:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise SnapshotNotFound(f"snapshot {key!r}: not found")
        return row

    def _parents(self, parent_id: int | None) -> tuple[tuple[int, str | None], ...]:
        out: list[tuple[int, str | None]] = []
        while parent_id is not None:
            row = self._db.execute(
                "SELECT id, parent_id, remote FROM snapshots WHERE id = ?", (parent_id,)
            ).fetchone()
            out.append((row["id"], row["remote"]))
            parent_id = row["parent_id"]
        return tuple(out)

    def _info(self, row: sqlite3.Row) -> Info:
        parent = ""
        if row["parent_id"] is not None:
            parent = self._db.execute(
                "SELECT key FROM snapshots WHERE id = ?", (row["parent_id"],)
            ).fetchone()["key"]
        return Info(
            kind=Kind(row["kind"]),
            name=row["key"],
            parent=parent,
            labels=json.loads(row["labels"]),
            created=_dt(row["created_ns"]),
            updated=_dt(row["updated_ns"]),
        )

    def get(self, key: str) -> Snapshot:
        row = self._row(key)
        return Snapshot(
            row["id"], Kind(row["kind"]), key, self._parents(row["parent_id"]), row["remote"]
        )

    def stat(self, key: str) -> Info:
        return self._info(self._row(key))

    def usage(self, key: str) -> tuple[Snapshot, Usage]:
        row = self._row(key)
        snap = Snapshot(row["id"], Kind(row["kind"]), key, (), row["remote"])
        return snap, Usage(size=row["size"], inodes=row["inodes"])

    def create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> Snapshot:
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"snapshot {key!r}: cannot create a {kind.name} snapshot")
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        validate_labels(labels)
        if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise SnapshotExists(f"snapshot {key!r}: already exists")
        parent_id = None
        if parent:
            prow = self._db.execute(
                "SELECT id, kind FROM snapshots WHERE key = ?", (parent,)
            ).fetchone()
            if prow is None:
                raise SnapshotNotFound(f"snapshot {key!r}: parent {parent!r} not found")
            if prow["kind"] != Kind.COMMITTED:
                raise ParentNotCommitted(
                    f"snapshot {key!r}: parent {parent!r} is not a committed snapshot"
                )
            parent_id = prow["id"]
        now = _now_ns()
        cur = self._db.execute(
            "INSERT INTO snapshots (key, parent_id, kind, labels, created_ns, updated_ns)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), json.dumps(_nonempty(labels)), now, now),
        )
        assert cur.lastrowid is not None
        return Snapshot(cur.lastrowid, kind, key, self._parents(parent_id))

    def commit(
        self,
        key: str,
        name: str,
        usage: Usage,
        labels: Mapping[str, str],
        remote: str | None = None,
    ) -> Snapshot:
        """Turn active `key` into committed `name`, keeping its id (and directory)."""
        if not name:
            raise InvalidArgument(f"snapshot {key!r}: commit name must not be empty")
        validate_labels(labels)
        if self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
            raise SnapshotExists(f"snapshot {name!r}: already exists")
        row = self._row(key)
        if row["kind"] != Kind.ACTIVE:
            raise NotActive(f"snapshot {key!r}: is not active ({Kind(row['kind']).name.lower()})")
        now = _now_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?,"
            " size = ?, inodes = ?, remote = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), json.dumps(_nonempty(labels)), now, now,
             usage.size, usage.inodes, remote, row["id"]),
        )
        return Snapshot(row["id"], Kind.COMMITTED, name, self._parents(row["parent_id"]), remote)

    def remove(self, key: str) -> Snapshot:
        row = self._row(key)
        if self._db.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)
        ).fetchone():
            raise HasChildren(f"snapshot {key!r}: cannot remove snapshot with child")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        return Snapshot(row["id"], Kind(row["kind"]), key, (), row["remote"])

    def update(self, info: Info, fieldpaths: Sequence[str]) -> Info:
        row = self._row(info.name)
        labels: dict[str, str] = json.loads(row["labels"])
        if not fieldpaths:
            labels = _nonempty(info.labels)
        for path in fieldpaths:
            if path == "labels":
                labels = _nonempty(info.labels)
            elif path.startswith("labels."):
                lkey = path[len("labels.") :]
                value = info.labels.get(lkey, "")
                if value:
                    labels[lkey] = value
                else:
                    labels.pop(lkey, None)
            else:
                raise InvalidFieldPath(
                    f"snapshot {info.name!r}: cannot update field {path!r}"
                )
        validate_labels(labels)
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(labels), _now_ns(), row["id"]),
        )
        return self._info(self._row(info.name))

    def walk(self, match: Filter) -> list[Info]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
        infos = (self._info(r) for r in rows)
        return [i for i in infos if match(i)]

    def ids(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def remote_snapshots(self) -> list[tuple[int, str, str]]:
        """(id, key, remote) of every snapshot a remote layer provides."""
        return [
            (r["id"], r["key"], r["remote"])
            for r in self._db.execute(
                "SELECT id, key, remote FROM snapshots WHERE remote IS NOT NULL ORDER BY id"
            )
        ]


class SqliteMetaStore:
    """One SQLite database; transactions are serialised by a lock (containerd calls in
    parallel from many threads, and SQLite would otherwise answer SQLITE_BUSY)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """BEGIN IMMEDIATE … COMMIT; any exception rolls back and propagates."""
        with self._lock:
            if self._db is None:
                raise ClosedError("metadata store is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def check_consistency(root: Path) -> list[str]:
    """Problems between rows and `<root>/snapshots/*` directories; [] when consistent."""
    db = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    try:
        ids = {r[0] for r in db.execute("SELECT id FROM snapshots")}
        dangling = [
            r[0]
            for r in db.execute(
                "SELECT s.key FROM snapshots s LEFT JOIN snapshots p ON s.parent_id = p.id"
                " WHERE s.parent_id IS NOT NULL AND p.id IS NULL"
            )
        ]
    finally:
        db.close()
    problems = [f"snapshot {k!r}: parent row missing" for k in dangling]
    snapdir = root / "snapshots"
    names = {p.name for p in snapdir.iterdir()} if snapdir.exists() else set()
    for i in sorted(ids):
        if str(i) not in names or not (snapdir / str(i) / "fs").is_dir():
            problems.append(f"row {i}: directory {snapdir / str(i) / 'fs'} missing")
    for name in sorted(names):
        if not name.isdigit() or int(name) not in ids:
            problems.append(f"directory {snapdir / name}: no row references it")
    return problems
