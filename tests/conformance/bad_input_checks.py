"""Bad input and bookkeeping: each refused call raises containerd's errdefs category
(storage/bolt.go, labels/validate.go, filters/parser.go) and leaves no partial state;
usage, cleanup, removal of chains and parallel callers keep the store consistent.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from suite_base import (
    assert_consistent,
    mount_source_dir,
    opt,
    root_of,
    snapshot_dirs,
    unchanged,
)

from snapshotter.core.metastore import check_consistency
from snapshotter.core.types import Kind, Usage
from snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

# containerd labels.Validate: len(key) + len(value) may not exceed 4096 bytes.
MAX_LABEL = 4096


def _population(sn: Any) -> None:
    """c1 <- c2 committed; a active on c2; v view on c2; lone active alone."""
    sn.prepare("c1-a", "", labels=opt())
    sn.commit("c1", "c1-a", labels=opt())
    sn.prepare("c2-a", "c1", labels=opt())
    sn.commit("c2", "c2-a", labels=opt())
    sn.prepare("a", "c2", labels=opt())
    sn.view("v", "c2", labels=opt())
    sn.prepare("lone", "", labels=opt())


def check_prepare_existing_key(sn: Any, work: Path) -> None:
    """Active keys, view keys and committed names share one namespace."""
    _population(sn)
    for key in ("a", "v", "c1", "lone"):
        for create in (sn.prepare, sn.view):
            for parent in ("", "c2"):
                with unchanged(sn, work), pytest.raises(AlreadyExists):
                    create(key, parent, labels=opt())


def check_unknown_parent(sn: Any, work: Path) -> None:
    _population(sn)
    for create in (sn.prepare, sn.view):
        with unchanged(sn, work), pytest.raises(NotFound):
            create("new", "no-such-parent", labels=opt())


def check_parent_not_committed(sn: Any, work: Path) -> None:
    """bolt.go CreateSnapshot: a parent that is active or a view is InvalidArgument."""
    _population(sn)
    for create in (sn.prepare, sn.view):
        for parent in ("a", "v", "lone"):
            with unchanged(sn, work), pytest.raises(InvalidArgument):
                create("new", parent, labels=opt())


def check_commit_not_active(sn: Any, work: Path) -> None:
    """bolt.go CommitActive: committing a view or a committed snapshot is
    FailedPrecondition; a missing key is NotFound; a taken name is AlreadyExists."""
    _population(sn)
    for key in ("v", "c2"):
        with unchanged(sn, work), pytest.raises(FailedPrecondition):
            sn.commit("new-name", key, labels=opt())
    with unchanged(sn, work), pytest.raises(NotFound):
        sn.commit("new-name", "no-such-key", labels=opt())
    for name in ("c1", "a", "v", "lone"):
        with unchanged(sn, work), pytest.raises(AlreadyExists):
            sn.commit(name, "a" if name != "a" else "lone", labels=opt())
    with unchanged(sn, work), pytest.raises(AlreadyExists):
        sn.commit("a", "a", labels=opt())
    sn.commit("c3", "a", labels=opt())
    assert sn.stat("c3").parent == "c2"


def check_unknown_key(sn: Any, work: Path) -> None:
    _population(sn)
    calls = [
        lambda: sn.stat("nope"),
        lambda: sn.mounts("nope"),
        lambda: sn.usage("nope"),
        lambda: sn.remove("nope"),
        lambda: sn.update(dataclasses.replace(sn.stat("c1"), name="nope", labels=opt())),
        lambda: sn.update(
            dataclasses.replace(sn.stat("c1"), name="nope", labels={"x": "y"}), ["labels.x"]
        ),
    ]
    for call in calls:
        with unchanged(sn, work), pytest.raises(NotFound):
            call()


def check_mounts_of_committed(sn: Any, work: Path) -> None:
    """bolt.go GetSnapshot: only active and view snapshots have mounts."""
    _population(sn)
    with unchanged(sn, work), pytest.raises(FailedPrecondition):
        sn.mounts("c2")


def check_remove_with_children(sn: Any, work: Path) -> None:
    """A parent goes only after all its children: active, view or committed."""
    _population(sn)
    sn.prepare("c3-a", "c2", labels=opt())
    sn.commit("c3", "c3-a", labels=opt())
    for child in ("a", "v", "c3", None):
        for parent in ("c1", "c2"):
            if child is None and parent == "c2":
                continue
            with unchanged(sn, work), pytest.raises(FailedPrecondition):
                sn.remove(parent)
        if child:
            sn.remove(child)
    sn.remove("c2")
    sn.remove("c1")
    assert [i.name for i in sn.walk()] == ["lone"]


def check_remove_chain(sn: Any, work: Path) -> None:
    """Top-down removal of a chain leaves neither rows nor directories behind."""
    parent = ""
    for i in range(5):
        sn.prepare(f"l{i}-a", parent, labels=opt())
        sn.commit(f"l{i}", f"l{i}-a", labels=opt())
        parent = f"l{i}"
    sn.view("top", parent, labels=opt())
    for key in ["top", *(f"l{i}" for i in reversed(range(5)))]:
        sn.remove(key)
        assert_consistent(work)
    assert sn.walk() == []
    assert snapshot_dirs(work) == []


def check_labels_limit(sn: Any, work: Path) -> None:
    """labels.Validate: key + value of exactly 4096 bytes passes, one more byte fails."""
    _population(sn)
    fits = {"k": "v" * (MAX_LABEL - 1)}
    over = {"k": "v" * MAX_LABEL}
    sn.prepare("fits", "c2", labels=opt(**fits))
    assert sn.stat("fits").labels == opt(**fits)
    calls = [
        lambda: sn.prepare("new", "c2", labels=opt(**over)),
        lambda: sn.view("new", "c2", labels=opt(**over)),
        lambda: sn.commit("new", "a", labels=opt(**over)),
        lambda: sn.update(dataclasses.replace(sn.stat("c1"), labels=opt(**over))),
        lambda: sn.update(dataclasses.replace(sn.stat("c1"), labels=over), ["labels.k"]),
    ]
    for call in calls:
        with unchanged(sn, work), pytest.raises(InvalidArgument):
            call()


def check_update_field_paths(sn: Any, work: Path) -> None:
    """Only labels are mutable; any other path, known or not, is InvalidArgument and
    nothing of the request is applied, not even its valid paths."""
    _population(sn)
    for name in ("c1", "a", "v"):
        st = sn.stat(name)
        changed = dataclasses.replace(st, labels={"x": "1"})
        for paths in (["name"], ["parent"], ["kind"], ["labels.x", "nosuch"], ["created"]):
            with unchanged(sn, work), pytest.raises(InvalidArgument):
                sn.update(changed, paths)
        # Empty values delete, on both the map and the per-key path.
        st = sn.update(dataclasses.replace(st, labels={"x": "1", "y": "2", **opt()}))
        st = sn.update(dataclasses.replace(st, labels={"x": ""}), ["labels.x"])
        assert st.labels == {"y": "2", **opt()}
        st = sn.update(dataclasses.replace(st, labels={"y": "", **opt()}))
        assert st.labels == opt() == sn.stat(name).labels
        # A dotted key after "labels." is one key, not a path into it.
        st = sn.update(dataclasses.replace(st, labels={"a.b/c": "d"}), ["labels.a.b/c"])
        assert st.labels == {"a.b/c": "d", **opt()}
        assert (st.kind, st.name) == (sn.stat(name).kind, name)


def check_empty_label_values(sn: Any, work: Path) -> None:
    """containerd stores no label with an empty value (boltutil writeMap skips them), so
    "" on create, commit or update means absent."""
    sn.prepare("a", "", labels=opt(e=""))
    sn.view("v", "", labels=opt(e=""))
    sn.commit("c", "a", labels=opt(e=""))
    for key in ("v", "c"):
        assert sn.stat(key).labels == opt()
    st = sn.update(dataclasses.replace(sn.stat("c"), labels=opt(e="1")))
    assert st.labels == opt(e="1")
    for paths in ((), ("labels",)):
        st = sn.update(dataclasses.replace(st, labels=opt(e="")), paths)
        assert st.labels == opt() == sn.stat("c").labels
        assert [i.name for i in sn.walk(["labels.e"])] == []


MALFORMED = ["==x", "name==", "name==a,", "name==a,,kind==view", 'labels."open==x', "name=x"]


def check_walk_malformed_filters(sn: Any, work: Path) -> None:
    _population(sn)
    for bad in MALFORMED:
        for filters in ([bad], ["name==c1", bad]):
            with pytest.raises(InvalidArgument):
                sn.walk(filters)


def check_usage(sn: Any, work: Path) -> None:
    """Usage of an active snapshot is du of its own dir (each inode once, blocks * 512,
    the dir itself included); commit freezes it; a child starts from one empty dir."""
    fs = mount_source_dir(sn.prepare("u-a", "", labels=opt()))
    empty = sn.usage("u-a")
    assert empty.inodes == 1
    (fs / "big").write_bytes(b"x" * 3 * 4096)
    (fs / "dir").mkdir()
    (fs / "dir" / "small").write_bytes(b"y" * 100)
    os.link(fs / "big", fs / "dir" / "big-link")  # counted once
    expected = _du(fs)
    assert expected.inodes == 4 and expected.size >= 3 * 4096 + 100
    assert sn.usage("u-a") == expected
    sn.commit("u", "u-a", labels=opt())
    assert sn.usage("u") == expected
    sn.prepare("child", "u", labels=opt())
    assert sn.usage("child").inodes == 1
    assert sn.usage("child").size == empty.size
    # overlay.go computes du for active snapshots only; a view reports what was stored
    # for it at creation, which is nothing.
    sn.view("view", "u", labels=opt())
    assert sn.usage("view") == Usage()


def _du(path: Path) -> Usage:
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for p in [Path(dirpath)] + [Path(dirpath, n) for n in [*dirnames, *filenames]]:
            st = p.lstat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return Usage(size=size, inodes=len(seen))


def check_cleanup(sn: Any, work: Path) -> None:
    """Cleanup removes directories no snapshot owns (left by a crash) and nothing else;
    the consistency check must notice them first."""
    _population(sn)
    kept = snapshot_dirs(work)
    snapshots = root_of(work) / "snapshots"
    (snapshots / "9999" / "fs" / "deep").mkdir(parents=True)
    (snapshots / "9999" / "fs" / "deep" / "file").write_bytes(b"orphan")
    (snapshots / "new-123").mkdir()
    assert check_consistency(root_of(work)) != []
    rows = sn.walk()
    sn.cleanup()
    assert snapshot_dirs(work) == kept
    assert sn.walk() == rows
    assert_consistent(work)
    sn.cleanup()
    assert snapshot_dirs(work) == kept


def check_concurrent_callers(sn: Any, work: Path) -> None:
    """containerd unpacks layers in parallel: concurrent chains must not collide."""
    errors: list[BaseException] = []

    def chain(t: int) -> None:
        try:
            parent = ""
            for i in range(8):
                sn.prepare(f"t{t}-{i}-a", parent, labels=opt())
                sn.stat(f"t{t}-{i}-a")
                sn.walk([f"parent=={parent}"] if parent else [])
                sn.commit(f"t{t}-{i}", f"t{t}-{i}-a", labels=opt())
                parent = f"t{t}-{i}"
            sn.view(f"t{t}-view", parent, labels=opt())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=chain, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    infos = sn.walk()
    assert len(infos) == 6 * 9
    assert sum(i.kind == Kind.VIEW for i in infos) == 6
    assert_consistent(work)
