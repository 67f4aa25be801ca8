"""containerd's snapshotter conformance checks (core/snapshots/testsuite/testsuite.go),
written as plain `check_<name>(sn, work)` functions named after containerd's.

Every call carries the `containerd.io/gc.root` label, keys are paths under `work` as in
containerd, and checks that mount for real are marked with `needs_mounts`. The checks of
issues.go live in `layer_checks.py`; bad input and categories in `bad_input_checks.py`.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import suite_fstest as ft
from suite_base import assert_consistent, needs_mounts, opt, root_of, slow, snapshot_dirs
from suite_mounting import PAGE_SIZE, compact_lowerdir, mounted

from snapshotter.core.types import Info, Kind
from snapshotter.errors import (
    AlreadyExists,
    ClosedError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)


def _k(work: Path, name: str) -> str:
    return str(work / name)


@needs_mounts
def check_snapshotter_basic(sn: Any, work: Path) -> None:
    initial = ft.apply(
        ft.create_file("/foo", b"foo\n", 0o777),
        ft.create_dir("/a", 0o755),
        ft.create_dir("/a/b", 0o755),
        ft.create_dir("/a/b/c", 0o755),
    )
    diff = ft.apply(
        ft.create_file("/bar", b"bar\n", 0o777),
        ft.create_file("/foo", b"bar\n", 0o777),
        ft.remove_all("/a/b"),
    )
    preparing, committed = _k(work, "preparing"), _k(work, "committed")
    mounts = sn.prepare(preparing, "", labels=opt())
    assert len(mounts) >= 1
    with mounted(mounts, Path(preparing)) as target:
        initial(target)
    sn.commit(committed, preparing, labels=opt())

    si = sn.stat(committed)
    assert (si.parent, si.kind) == ("", Kind.COMMITTED)
    with pytest.raises(NotFound):
        sn.stat(preparing)

    nxt = _k(work, "nextlayer")
    expected = work / "expected-initial"
    expected.mkdir()
    initial(expected)
    with mounted(sn.prepare(nxt, committed, labels=opt()), Path(nxt)) as target:
        ft.assert_same_tree(expected, target)
        diff(target)
    ni = sn.stat(nxt)
    assert (ni.parent, ni.kind) == (committed, Kind.ACTIVE)

    next_committed = _k(work, "committed-next")
    sn.commit(next_committed, nxt, labels=opt())
    si2 = sn.stat(next_committed)
    assert (si2.parent, si2.kind) == (committed, Kind.COMMITTED)
    with pytest.raises(NotFound):
        sn.stat(nxt)

    walked = {i.name: i for i in sn.walk()}
    assert walked[si.name] == si
    assert walked[si2.name] == si2

    diff(expected)
    nextnext = _k(work, "nextnextlayer")
    with mounted(sn.view(nextnext, next_committed, labels=opt()), Path(nextnext)) as target:
        ft.assert_same_tree(expected, target)
    sn.remove(nextnext)
    with pytest.raises(FailedPrecondition):
        sn.remove(committed)
    sn.remove(next_committed)
    sn.remove(committed)
    assert sn.walk() == []
    assert snapshot_dirs(work) == []


def _prepare_with_file(sn: Any, work: Path) -> str:
    preparing = _k(work, "preparing")
    mounts = sn.prepare(preparing, "", labels=opt())
    assert len(mounts) >= 1
    with mounted(mounts, Path(preparing)) as target:
        (target / "foo").write_bytes(b"foo\n")
    return preparing


@needs_mounts
def check_snapshotter_stat_active(sn: Any, work: Path) -> None:
    preparing = _prepare_with_file(sn, work)
    si = sn.stat(preparing)
    assert (si.name, si.kind, si.parent) == (preparing, Kind.ACTIVE, "")


@needs_mounts
def check_snapshotter_stat_committed(sn: Any, work: Path) -> None:
    preparing = _prepare_with_file(sn, work)
    committed = _k(work, "committed")
    sn.commit(committed, preparing, labels=opt())
    si = sn.stat(committed)
    assert (si.name, si.kind, si.parent) == (committed, Kind.COMMITTED, "")


@needs_mounts
def check_snapshotter_transitivity(sn: Any, work: Path) -> None:
    """A <- B: B's parent is A, and A (B's parent, B's transitive root) has none."""
    snap_a, snap_b = _k(work, "snapA"), _k(work, "snapB")
    preparing = _prepare_with_file(sn, work)
    sn.commit(snap_a, preparing, labels=opt())
    nxt = _k(work, "next")
    with mounted(sn.prepare(nxt, snap_a, labels=opt()), Path(nxt)) as target:
        assert (target / "foo").read_bytes() == b"foo\n"
        (target / "foo").write_bytes(b"foo bar\n")
    sn.commit(snap_b, nxt, labels=opt())
    si_a, si_b = sn.stat(snap_a), sn.stat(snap_b)
    assert si_a.parent == ""
    assert si_b.parent == snap_a
    assert sn.stat(si_b.parent).parent == ""


@needs_mounts
def check_snapshotter_prepare_view(sn: Any, work: Path) -> None:
    """A key can be created once, whether by Prepare or View."""
    snap_a = _k(work, "snapA")
    sn.commit(snap_a, _prepare_with_file(sn, work), labels=opt())
    for first, second in ((sn.prepare, sn.view), (sn.prepare, sn.prepare), (sn.view, sn.view)):
        key = _k(work, f"{first.__name__}-{second.__name__}")
        first(key, snap_a, labels=opt())
        with pytest.raises(AlreadyExists):
            second(key, snap_a, labels=opt())
    assert_consistent(work)


@needs_mounts
def check_remove_intermediate_snapshot(sn: Any, work: Path) -> None:
    """base <- inter <- top: the middle goes only after the top, even while the first
    active was still mounted when it was committed."""
    base = _k(work, "base")
    committed_base, inter = _k(work, "committed-base"), _k(work, "intermediate")
    committed_inter, top = _k(work, "committed-inter"), _k(work, "toplayer")
    with mounted(sn.prepare(base, "", labels=opt()), Path(base)):
        sn.commit(committed_base, base, labels=opt())
        sn.prepare(inter, committed_base, labels=opt())
        sn.commit(committed_inter, inter, labels=opt())
        sn.prepare(top, committed_inter, labels=opt())
        with pytest.raises(FailedPrecondition):
            sn.remove(committed_inter)
        sn.remove(top)
        sn.remove(committed_inter)
    sn.remove(committed_base)
    assert sn.walk() == []


def check_commit_labels_and_times(sn: Any, work: Path) -> None:
    """bolt.go CommitActive: the committed snapshot gets the labels passed to Commit only
    ("replace labels, do not inherit") and fresh created == updated times."""
    sn.prepare("a", "", labels=opt(active="1"))
    before = sn.stat("a")
    t1 = datetime.now(UTC)
    sn.commit("c", "a", labels=opt(committed="1"))
    t2 = datetime.now(UTC)
    si = sn.stat("c")
    assert si.labels == opt(committed="1")
    assert si.created is not None and before.created is not None
    assert t1 <= si.created <= t2 and si.updated == si.created
    sn.prepare("a2", "", labels=opt(active="1"))
    sn.commit("c2", "a2")
    assert sn.stat("c2").labels == {}


def _base_snapshots(sn: Any) -> None:
    """c1 <- c2 committed; a1 active on c2, a2 active alone; v1 view on c2, v2 view alone."""
    sn.prepare("c1-a", "", labels=opt())
    sn.commit("c1", "c1-a", labels=opt())
    sn.prepare("c2-a", "c1", labels=opt())
    sn.commit("c2", "c2-a", labels=opt())
    sn.prepare("a1", "c2", labels=opt())
    sn.prepare("a2", "", labels=opt())
    sn.view("v1", "c2", labels=opt())
    sn.view("v2", "", labels=opt())


BASE = {
    "c1": (Kind.COMMITTED, ""),
    "c2": (Kind.COMMITTED, "c1"),
    "a1": (Kind.ACTIVE, "c2"),
    "a2": (Kind.ACTIVE, ""),
    "v1": (Kind.VIEW, "c2"),
    "v2": (Kind.VIEW, ""),
}


def _assert_shape(si: Info, name: str) -> None:
    kind, parent = BASE[name]
    assert (si.name, si.kind, si.parent) == (name, kind, parent)


def check_update(sn: Any, work: Path) -> None:
    t1 = datetime.now(UTC)
    _base_snapshots(sn)
    t2 = datetime.now(UTC)
    for name in BASE:
        st = sn.stat(name)
        _assert_shape(st, name)
        assert st.created is not None and st.created.tzinfo is not None
        assert t1 <= st.created <= t2
        assert st.updated == st.created
        created = st.created

        # Without field paths every mutable field is replaced; parent is silently kept.
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", **opt()}
        u1 = datetime.now(UTC)
        st = sn.update(dataclasses.replace(st, parent="doesnotexist", labels=dict(expected)))
        u2 = datetime.now(UTC)
        assert st.created == created
        assert st.updated is not None and u1 <= st.updated <= u2
        _assert_shape(st, name)
        assert st.labels == expected
        assert sn.stat(name) == st

        # labels.<key> touches only that key; a key missing from the request is deleted.
        request = dataclasses.replace(st, labels={"l1": "updated", "l4": "v4"})
        st = sn.update(request, ["labels.l1", "labels.l2"])
        assert st.labels == {"l1": "updated", "l3": "v3", **opt()}

        # "labels" replaces the whole map.
        expected = {"l4": "v4", **opt()}
        st = sn.update(dataclasses.replace(st, labels=dict(expected)), ["labels"])
        assert st.labels == expected
        assert sn.stat(name).labels == expected

        with pytest.raises(InvalidArgument):
            sn.update(dataclasses.replace(st, parent="doesnotexist"), ["parent"])
        assert sn.stat(name) == st


def check_remove(sn: Any, work: Path) -> None:
    """Removed keys and names can be reused, by either kind."""
    sn.prepare("committed-a", "", labels=opt())
    sn.commit("committed-1", "committed-a", labels=opt())
    sn.prepare("reuse-1", "committed-1", labels=opt())
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1", labels=opt())
    sn.remove("reuse-1")
    sn.prepare("reuse-1", "", labels=opt())
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1", labels=opt())
    assert [(i.name, i.kind) for i in sn.walk()] == [("committed-1", Kind.COMMITTED)]
    assert_consistent(work)


@needs_mounts
def check_snapshotter_view_readonly(sn: Any, work: Path) -> None:
    preparing, committed, view = (_k(work, n) for n in ("preparing", "committed", "view"))
    sn.prepare(preparing, "", labels=opt())
    sn.commit(committed, preparing, labels=opt())
    mounts = sn.view(view, committed, labels=opt())
    # The option string alone proves nothing (containerd #1368): mount and try to write.
    with mounted(mounts, work / "view-mount") as target, pytest.raises(OSError) as err:
        (target / "testfile").write_bytes(b"testcontent")
    assert err.value.errno == 30  # EROFS
    sn.remove(view)
    sn.remove(committed)


def _named_snapshots(sn: Any, prefix: str) -> None:
    sn.prepare(f"{prefix}c1-a", "", labels=opt())
    sn.commit(f"{prefix}c1", f"{prefix}c1-a", labels=opt())
    sn.prepare(f"{prefix}c2-a", f"{prefix}c1", labels=opt())
    sn.commit(f"{prefix}c2", f"{prefix}c2-a", labels=opt())
    sn.prepare(f"{prefix}a1", f"{prefix}c2", labels=opt())
    sn.view(f"{prefix}v1", f"{prefix}c2", labels=opt())


def check_stat_in_walk(sn: Any, work: Path) -> None:
    _named_snapshots(sn, "stats-in-walk-")
    walked = sn.walk()
    assert len(walked) == 4
    for si in walked:
        assert sn.stat(si.name) == si


def check_close_twice(sn: Any, work: Path) -> None:
    sn.prepare("close-twice-prepare", "", labels=opt())
    sn.commit("close-twice", "close-twice-prepare", labels=opt())
    sn.remove("close-twice")
    sn.close()
    sn.close()
    with pytest.raises(ClosedError):
        sn.stat("close-twice")
    with pytest.raises(ClosedError):
        sn.prepare("after-close", "", labels=opt())


@needs_mounts
def check_root_permission(sn: Any, work: Path) -> None:
    preparing = _k(work, "preparing")
    with mounted(sn.prepare(preparing, "", labels=opt()), Path(preparing)) as target:
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755


def _layer(i: int) -> ft.Applier:
    if i == 0:
        return ft.apply(
            ft.create_file("/bottom", b"way at the bottom\n", 0o777),
            ft.create_file("/overwriteme", b"FIRST!\n", 0o777),
            ft.create_dir("/ADDHERE", 0o755),
            ft.create_dir("/ONLYME", 0o755),
            ft.create_file("/ONLYME/bottom", b"bye!\n", 0o777),
        )
    return ft.apply(
        ft.create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
        ft.create_file(f"/ADDHERE/file-{i}", b"same\n", 0o755),
        ft.remove_all("/ONLYME"),
        ft.create_dir("/ONLYME", 0o755),
        ft.create_file(f"/ONLYME/file-{i}", b"only me!\n", 0o777),
    )


@slow
@needs_mounts
def check_128_layers_mount(sn: Any, work: Path) -> None:
    """128 layers stack in one overlay whose options fit one page, and every layer's
    mounted view equals the same changes applied to one flat directory."""
    flat = work / "flat"
    flat.mkdir()
    parent = ""
    for i in range(128):
        preparing = _k(work, f"prepare-layer-{i}")
        mounts = sn.prepare(preparing, parent, labels=opt())
        with mounted(mounts, Path(preparing)) as target:
            ft.assert_same_tree(flat, target)
            _layer(i)(flat)
            _layer(i)(target)
            ft.assert_same_tree(flat, target)
        parent = _k(work, f"committed-{i}")
        sn.commit(parent, preparing, labels=opt())
    view = _k(work, "fullview")
    mounts = sn.view(view, parent, labels=opt())
    assert [m.type for m in mounts] == ["overlay"]
    lower = [o for o in mounts[0].options if o.startswith("lowerdir=")]
    assert len(lower) == 1 and lower[0].count(":") == 127
    # Absolute paths cannot fit: 128 x "<root>/snapshots/NNN/fs" is over a page even for
    # /var/lib/lazysnap. containerd's mount.All compacts lowerdir relative to the shared
    # snapshots dir; that form must fit, which integer ids make easy.
    cwd, compacted = compact_lowerdir(mounts[0].options)
    assert cwd is not None and Path(cwd) == root_of(work) / "snapshots"
    assert len(",".join(compacted)) < PAGE_SIZE - 512
    with mounted(mounts, Path(view)) as target:
        ft.assert_same_tree(flat, target)
    assert len(sn.walk()) == 129
    assert_consistent(work)


# Filters from containerd's checkWalk, with the names they must select.
WALK_CASES = [
    (['labels."containerd.io/gc.root"==check-walk'],
     ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (['kind==active,labels."containerd.io/gc.root"==check-walk'], ["a-np", "a", "a-wl", "a-np-wl"]),
    (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
    (['kind==committed,labels."containerd.io/gc.root"==check-walk'], ["p", "p-wl"]),
    (["name==p", "name==a-np-wl"], ["p", "a-np-wl"]),
    (["name==a-wl,labels.l"], ["a-wl"]),
    (["parent==p"], ["a", "v"]),
    (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "v", "a-wl", "v-wl"]),
    (["labels.l"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
    (["labels.l==2"], ["a-wl", "a-np-wl"]),
    # Beyond containerd's list: regex, quoted values, no filter at all.
    (["name~=^a-.*wl$"], ["a-wl", "a-np-wl"]),
    (['labels.l=="3"'], ["v-wl"]),
    ([], ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
]  # fmt: skip


def check_walk(sn: Any, work: Path) -> None:
    gc = {"containerd.io/gc.root": "check-walk"}
    sn.prepare("a-np", "", labels=gc)
    sn.prepare("p-tmp", "", labels=gc)
    sn.commit("p", "p-tmp", labels=gc)
    sn.prepare("a", "p", labels=gc)
    sn.view("v", "p", labels=gc)
    sn.prepare("p-wl-tmp", "", labels=gc)
    sn.commit("p-wl", "p-wl-tmp", labels={"l": "1", **gc})
    sn.prepare("a-wl", "p-wl", labels={"l": "2", **gc})
    sn.view("v-wl", "p-wl", labels={"l": "3", **gc})
    sn.prepare("a-np-wl", "", labels={"l": "2", **gc})
    for filters, matches in WALK_CASES:
        got = sorted(i.name for i in sn.walk(filters))
        assert got == sorted(matches), f"walk({filters})"
