"""Core Snapshotter properties beyond containerd's suite: what a restart keeps, and the
on-disk layout that crash recovery and short mount options rely on."""

from __future__ import annotations

import stat
from pathlib import Path

from snapshotter.core.metastore import check_consistency
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.core.types import Mount


def _id(mounts: list[Mount]) -> int:
    """The snapshot id behind a no-parent mount (<root>/snapshots/<id>/fs)."""
    return int(Path(mounts[0].source).parent.name)


def _populate(sn: Snapshotter) -> None:
    src = Path(sn.prepare("c1-a")[0].source)
    (src / "hello").write_text("hello\n")
    sn.commit("c1", "c1-a", labels={"l": "1"})
    sn.prepare("c2-a", "c1")
    sn.commit("c2", "c2-a")
    sn.prepare("a", "c2", labels={"k": "v"})
    sn.view("v", "c2")
    sn.view("v0", "")


def test_reopen_keeps_rows_labels_times_and_mounts(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path)
    _populate(sn)
    infos = sn.walk()
    mounts = {i.name: sn.mounts(i.name) for i in infos if i.name in ("a", "v", "v0")}
    usage = sn.usage("c1")
    sn.close()

    sn = Snapshotter(tmp_path)
    try:
        assert sn.walk() == infos
        assert {k: sn.mounts(k) for k in mounts} == mounts
        assert sn.usage("c1") == usage
        sn.prepare("after", "c2")
        sn.commit("c3", "after")
        assert sn.stat("c3").parent == "c2"
    finally:
        sn.close()
    assert check_consistency(tmp_path) == []


def test_ids_are_never_reused(tmp_path: Path) -> None:
    """A crash between a removal's commit and its rmtree leaves rm-<id>; if <id> could be
    handed out again, recovery could not tell the two directories apart."""
    sn = Snapshotter(tmp_path)
    first = _id(sn.prepare("x"))
    sn.remove("x")
    second = _id(sn.prepare("x"))
    assert second > first
    sn.remove("x")
    sn.close()
    sn = Snapshotter(tmp_path)
    try:
        assert _id(sn.prepare("x")) > second
    finally:
        sn.close()


def test_layout_is_private_and_short(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sn = Snapshotter(root)
    try:
        m = sn.prepare("k" * 200)  # a long key must not leak into paths
        assert Path(m[0].source) == root / "snapshots" / str(_id(m)) / "fs"
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert sorted(p.name for p in (root / "snapshots").iterdir()) == [str(_id(m))]
    finally:
        sn.close()
