"""The suite's own tools must be able to fail: a comparison that sees nothing proves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import suite_fstest as ft
from suite_mounting import compact_lowerdir

BASE = ft.apply(
    ft.create_dir("/d", 0o755),
    ft.create_file("/d/f", b"content", 0o644),
    ft.create_file("/g", b"g", 0o600),
    ft.symlink("d/f", "/s"),
)


NOTHING = ft.apply()


@pytest.mark.parametrize(
    ("on_a", "on_b"),
    [
        (NOTHING, ft.create_file("/d/f", b"other", 0o644)),
        (NOTHING, ft.chmod("/d/f", 0o600)),
        (NOTHING, ft.chmod("/d", 0o700)),
        (NOTHING, ft.remove_all("/g")),
        (NOTHING, ft.create_file("/new", b"", 0o644)),
        (NOTHING, ft.apply(ft.remove_all("/s"), ft.symlink("elsewhere", "/s"))),
        (NOTHING, ft.apply(ft.remove_all("/g"), ft.create_dir("/g", 0o600))),
        # Same names, modes and bytes; only the hard-link grouping differs.
        (ft.create_file("/g2", b"g", 0o600), ft.link("/g", "/g2")),
    ],
)
def test_tree_diff_sees_each_kind_of_change(
    tmp_path: Path, on_a: ft.Change, on_b: ft.Change
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        BASE(d)
    assert ft.tree_diff(a, b) == []
    on_a(a)
    on_b(b)
    assert ft.tree_diff(a, b) != []


@pytest.mark.root
def test_tree_diff_sees_owner(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        BASE(d)
    ft.chown("/d/f", 1, 1)(b)
    assert ft.tree_diff(a, b) != []


def test_move_falls_back_to_copy(tmp_path: Path) -> None:
    BASE(tmp_path)
    ft.move("/d", "/e")(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["e", "g", "s"]


def test_compact_lowerdir_like_containerd() -> None:
    lowers = [f"/var/lib/x/snapshots/{i}/fs" for i in (12, 13, 2)]
    opts = ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=" + ":".join(lowers)]
    cwd, compacted = compact_lowerdir(opts)
    assert cwd == "/var/lib/x/snapshots/"
    assert compacted == ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=12/fs:13/fs:2/fs"]
    assert compact_lowerdir(["lowerdir=/a/1/fs"]) == (None, ["lowerdir=/a/1/fs"])
    assert compact_lowerdir(["lowerdir=/1/fs:/2/fs"]) == (None, ["lowerdir=/1/fs:/2/fs"])
