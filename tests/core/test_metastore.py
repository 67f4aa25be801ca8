"""Storage-level suite on the metastore: a fixed population, then error categories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.core.filters import parse_filters
from snapshotter.core.metastore import SqliteMetaStore
from snapshotter.core.types import Info, Kind, Usage
from snapshotter.errors import (
    AlreadyExists,
    ClosedError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteMetaStore]:
    """committed-1 <- committed-2 <- active-3; committed-1 <- view-1; active-4 (no parent)."""
    s = SqliteMetaStore(tmp_path / "m.db")
    with s.transaction() as tx:
        tx.create(Kind.ACTIVE, "a1", "", {"l": "1"})
        tx.commit("a1", "committed-1", Usage(10, 1), {"c": "1"})
        tx.create(Kind.ACTIVE, "a2", "committed-1", {})
        tx.commit("a2", "committed-2", Usage(), {})
        tx.create(Kind.ACTIVE, "active-3", "committed-2", {})
        tx.create(Kind.VIEW, "view-1", "committed-1", {})
        tx.create(Kind.ACTIVE, "active-4", "", {})
    yield s
    s.close()


def test_population(store: SqliteMetaStore) -> None:
    with store.transaction() as tx:
        snap = tx.get("active-3")
        assert snap.kind == Kind.ACTIVE
        assert [p for p, _ in snap.parents] == [tx.get("committed-2").id, tx.get("committed-1").id]
        info = tx.stat("committed-1")
        assert (info.kind, info.parent, info.labels) == (Kind.COMMITTED, "", {"c": "1"})
        assert tx.stat("view-1").parent == "committed-1"
        _, usage = tx.usage("committed-1")
        assert usage == Usage(10, 1)


@pytest.mark.parametrize(
    ("op", "category"),
    [
        (lambda tx: tx.get("missing"), NotFound),
        (lambda tx: tx.stat("missing"), NotFound),
        (lambda tx: tx.create(Kind.ACTIVE, "active-3", "", {}), AlreadyExists),
        (lambda tx: tx.create(Kind.ACTIVE, "new", "missing", {}), NotFound),
        (lambda tx: tx.create(Kind.ACTIVE, "new", "active-3", {}), InvalidArgument),
        (lambda tx: tx.create(Kind.VIEW, "new", "view-1", {}), InvalidArgument),
        (lambda tx: tx.create(Kind.COMMITTED, "new", "", {}), InvalidArgument),
        (lambda tx: tx.create(Kind.ACTIVE, "", "", {}), InvalidArgument),
        (lambda tx: tx.create(Kind.ACTIVE, "new", "", {"k": "x" * 5000}), InvalidArgument),
        (lambda tx: tx.commit("view-1", "c", Usage(), {}), FailedPrecondition),
        (lambda tx: tx.commit("committed-2", "c", Usage(), {}), FailedPrecondition),
        (lambda tx: tx.commit("active-3", "committed-1", Usage(), {}), AlreadyExists),
        (lambda tx: tx.commit("missing", "c", Usage(), {}), NotFound),
        (lambda tx: tx.remove("committed-1"), FailedPrecondition),
        (lambda tx: tx.remove("missing"), NotFound),
        (lambda tx: tx.update(Info(Kind.ACTIVE, "missing"), ()), NotFound),
        (lambda tx: tx.update(Info(Kind.ACTIVE, "active-3"), ["name"]), InvalidArgument),
        (lambda tx: tx.update(Info(Kind.ACTIVE, "active-3"), ["kind"]), InvalidArgument),
    ],
)
def test_errors_leave_state_unchanged(store: SqliteMetaStore, op, category) -> None:
    with store.transaction() as tx:
        before = tx.walk(parse_filters([]))
    with pytest.raises(category), store.transaction() as tx:
        op(tx)
    with store.transaction() as tx:
        assert tx.walk(parse_filters([])) == before


def test_update_labels(store: SqliteMetaStore) -> None:
    with store.transaction() as tx:
        info = tx.update(Info(Kind.COMMITTED, "committed-1", labels={"c": "", "d": "4"}),
                         ["labels.c", "labels.d"])
        assert info.labels == {"d": "4"}
        info = tx.update(Info(Kind.COMMITTED, "committed-1", labels={"x": "y"}), ())
        assert info.labels == {"x": "y"}
        info = tx.update(Info(Kind.COMMITTED, "committed-1", labels={"z": "1"}), ["labels"])
        assert info.labels == {"z": "1"}
        assert info.updated is not None and info.created is not None
        assert info.updated >= info.created


def test_remove_then_reuse(store: SqliteMetaStore) -> None:
    with store.transaction() as tx:
        old = tx.remove("active-3").id
        tx.remove("committed-2")
        new = tx.create(Kind.ACTIVE, "active-3", "committed-1", {}).id
    assert new != old, "ids are never reused, so a stale directory can't be adopted"


def test_walk_filters(store: SqliteMetaStore) -> None:
    with store.transaction() as tx:
        def names(*f: str) -> list[str]:
            return [i.name for i in tx.walk(parse_filters(list(f)))]

        assert names("kind==committed") == ["committed-1", "committed-2"]
        assert names("parent==committed-1") == ["committed-2", "view-1"]
        assert names('labels."c"==1') == ["committed-1"]
        assert names("kind==view", "kind==active") == ["active-3", "view-1", "active-4"]
        assert names("kind==active,parent==committed-2") == ["active-3"]


def test_closed(tmp_path: Path) -> None:
    s = SqliteMetaStore(tmp_path / "m.db")
    s.close()
    s.close()
    with pytest.raises(ClosedError), s.transaction():
        pass
