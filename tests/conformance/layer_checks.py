"""Layer file-system checks through real mounts: containerd's issues.go (regressions of
older layering models) plus what overlay must get right across layers (whiteouts,
opaque directories, a directory replaced by a file and back) and the mount shapes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import suite_fstest as ft
from suite_base import (
    check_snapshots,
    mount_source_dir,
    needs_mounts,
    opt,
    overlay_option,
    root_of,
)
from suite_mounting import mounted

# Extra options containerd 1.6's overlay driver may add depending on the kernel.
_OPTIONAL_OVERLAY_OPTIONS = {"index=off", "userxattr"}


@needs_mounts
def check_layer_file_update(sn: Any, work: Path) -> None:
    """docker#21555: a file updated in an upper layer shows the new content.

    containerd repeats this across second boundaries to catch mtime-based diffing; a
    snapshotter keeps upper dirs as they are, so a repeat adds nothing and we run twice."""
    l1 = ft.apply(
        ft.create_dir("/etc", 0o700),
        ft.create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        ft.create_file("/etc/profile", b"PATH=/usr/bin", 0o644),
    )
    l2 = ft.apply(
        ft.create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
        ft.create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
        ft.create_dir("/root", 0o700),
        ft.create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    )
    for _ in range(2):
        check_snapshots(sn, work, l1, l2)


@needs_mounts
def check_remove_directory_in_lower_layer(sn: Any, work: Path) -> None:
    """docker#25244: a directory removed and recreated hides the lower layer's entries."""
    check_snapshots(
        sn,
        work,
        ft.apply(ft.create_dir("/lib", 0o700), ft.create_file("/lib/hidden", b"", 0o644)),
        ft.apply(
            ft.remove_all("/lib"),
            ft.create_dir("/lib", 0o700),
            ft.create_file("/lib/not-hidden", b"", 0o644),
        ),
        ft.apply(ft.create_file("/lib/newfile", b"", 0o644)),
    )


@needs_mounts
def check_chown(sn: Any, work: Path) -> None:
    """docker#20240, #24913, #28391: ownership changes of lower entries survive commit."""
    check_snapshots(
        sn,
        work,
        ft.apply(
            ft.create_dir("/opt", 0o700),
            ft.create_dir("/opt/a", 0o700),
            ft.create_dir("/opt/a/b", 0o700),
            ft.create_file("/opt/a/b/file.txt", b"hello", 0o644),
        ),
        ft.apply(
            ft.chown("/opt", 1, 1),
            ft.chown("/opt/a", 1, 1),
            ft.chown("/opt/a/b", 1, 1),
            ft.chown("/opt/a/b/file.txt", 1, 1),
        ),
    )


@needs_mounts
def check_rename(sn: Any, work: Path) -> None:
    """docker#25409. containerd skips this one ("fails on some kernels"): a lower directory
    cannot be renamed without redirect_dir, so we move it the way mv(1) does."""
    check_snapshots(
        sn,
        work,
        ft.apply(
            ft.create_dir("/dir1", 0o700),
            ft.create_dir("/somefiles", 0o700),
            ft.create_file("/somefiles/f1", b"was here first!", 0o644),
            ft.create_file("/somefiles/f2", b"nothing interesting", 0o644),
        ),
        ft.apply(
            ft.move("/dir1", "/dir2"),
            ft.create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
            ft.rename("/somefiles/f1-overwrite", "/somefiles/f1"),
            ft.rename("/somefiles/f2", "/somefiles/f3"),
        ),
    )


@needs_mounts
def check_directory_permission_on_commit(sn: Any, work: Path) -> None:
    """docker#27298: owners of directories copied up or recreated are kept on commit."""
    check_snapshots(
        sn,
        work,
        ft.apply(
            *(ft.create_dir(f"/dir{i}", 0o700) for i in range(1, 6)),
            ft.create_file("/dir4/f1", b"...", 0o644),
            ft.create_file("/dir5/f1", b"...", 0o644),
            *(ft.chown(p, 1, 1) for p in ("/dir1", "/dir2", "/dir3", "/dir5", "/dir5/f1")),
        ),
        ft.apply(
            ft.chown("/dir2", 0, 0),
            ft.remove_all("/dir3"),
            ft.chown("/dir4", 1, 1),
            ft.chown("/dir4/f1", 1, 1),
        ),
        ft.apply(
            ft.create_dir("/dir3", 0o700),
            ft.chown("/dir3", 1, 1),
            ft.remove_all("/dir5"),
            ft.create_dir("/dir5", 0o700),
            ft.chown("/dir5", 1, 1),
        ),
    )


@needs_mounts
def check_deleted_files_in_child_snapshot(sn: Any, work: Path) -> None:
    check_snapshots(
        sn,
        work,
        ft.apply(
            ft.create_file("/foo", b"foo\n", 0o777),
            ft.create_file("/foobar", b"foobar\n", 0o777),
        ),
        ft.apply(ft.remove_all("/foobar")),
        ft.apply(),
    )


@needs_mounts
def check_file_from_lower_layer(sn: Any, work: Path) -> None:
    """containerd's MoveFileFromLowerLayer: hard-link then delete a lower file."""
    check_snapshots(
        sn,
        work,
        ft.apply(
            ft.create_dir("/dir1", 0o700),
            ft.create_file("/dir1/f1", b"Hello", 0o644),
            ft.create_dir("/dir2", 0o700),
            ft.create_file("/dir2/f2", b"...", 0o644),
        ),
        ft.apply(
            ft.create_dir("/dir3", 0o700),
            ft.create_file("/dir3/f1", b"Hello", 0o644),
            ft.remove_all("/dir1"),
            ft.link("/dir2/f2", "/dir3/f2"),
            ft.remove_all("/dir2/f2"),
        ),
    )


@needs_mounts
def check_directory_file_swap(sn: Any, work: Path) -> None:
    """A directory becomes a file in the next layer and a file becomes a directory; then
    back again. Links and symlinks ride along."""
    check_snapshots(
        sn,
        work,
        ft.apply(
            ft.create_dir("/a", 0o755),
            ft.create_file("/a/f", b"in a dir", 0o644),
            ft.create_file("/b", b"a file", 0o600),
            ft.symlink("/b", "/s"),
            ft.link("/b", "/hard"),
        ),
        ft.apply(
            ft.remove_all("/a"),
            ft.create_file("/a", b"now a file", 0o644),
            ft.remove_all("/b"),
            ft.create_dir("/b", 0o711),
            ft.create_file("/b/inner", b"inner", 0o640),
        ),
        ft.apply(
            ft.remove_all("/a"),
            ft.create_dir("/a", 0o700),
            ft.create_file("/a/g", b"g", 0o644),
            ft.remove_all("/s"),
            ft.create_dir("/s", 0o755),
        ),
        ft.apply(),
    )


@needs_mounts
def check_deletions_are_whiteouts(sn: Any, work: Path) -> None:
    """What a deletion leaves in the upper dir is overlay's on-disk format, which the next
    layer (and a differ) reads: 0:0 character devices and opaque directories."""
    sn.prepare("base-a", "", labels=opt())
    with mounted(sn.mounts("base-a"), work / "base") as target:
        ft.apply(
            ft.create_file("/gone", b"x", 0o644),
            ft.create_dir("/dir", 0o755),
            ft.create_file("/dir/old", b"old", 0o644),
        )(target)
    sn.commit("base", "base-a", labels=opt())
    mounts = sn.prepare("top-a", "base", labels=opt())
    upper = Path(overlay_option(mounts, "upperdir"))
    with mounted(mounts, work / "top") as target:
        ft.apply(
            ft.remove_all("/gone"),
            ft.remove_all("/dir"),
            ft.create_dir("/dir", 0o755),
            ft.create_file("/dir/new", b"new", 0o644),
        )(target)
    st = (upper / "gone").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "deletion is not a whiteout"
    prefix = "user" if "userxattr" in mounts[0].options else "trusted"
    assert os.getxattr(upper / "dir", f"{prefix}.overlay.opaque") == b"y"
    assert sorted(os.listdir(upper / "dir")) == ["new"]
    sn.commit("top", "top-a", labels=opt())
    with mounted(sn.view("top-v", "top", labels=opt()), work / "view") as target:
        assert not os.path.lexists(target / "gone")
        assert sorted(os.listdir(target / "dir")) == ["new"]


def _fs_dir(path: str, work: Path) -> Path:
    """A snapshot's fs dir must be <root>/snapshots/<small integer id>/fs."""
    p = Path(path)
    assert p.name == "fs" and p.parent.parent == root_of(work) / "snapshots", p
    assert p.parent.name.isdigit(), f"snapshot id {p.parent.name!r} is not an integer"
    return p


def check_mount_shapes(sn: Any, work: Path) -> None:
    """The overlay driver's shapes: bind for zero parents, ro bind of the parent for a
    view of one, overlay otherwise with lowerdir nearest parent first."""
    m = sn.prepare("c1-a", "", labels=opt())
    assert (m[0].type, m[0].options) == ("bind", ("rw", "rbind"))
    fs1 = _fs_dir(m[0].source, work)
    assert fs1.is_dir() and (fs1.parent / "work").is_dir()
    assert sn.mounts("c1-a") == m
    sn.commit("c1", "c1-a", labels=opt())

    m = sn.view("v0", "", labels=opt())
    assert (m[0].type, m[0].options) == ("bind", ("ro", "rbind"))
    assert _fs_dir(m[0].source, work).is_dir()

    m = sn.view("v1", "c1", labels=opt())
    assert [(x.type, x.source, x.options) for x in m] == [("bind", str(fs1), ("ro", "rbind"))]

    m = sn.prepare("c2-a", "c1", labels=opt())
    assert sn.mounts("c2-a") == m
    assert (m[0].source, overlay_option(m, "lowerdir")) == ("overlay", str(fs1))
    fs2 = _fs_dir(overlay_option(m, "upperdir"), work)
    assert Path(overlay_option(m, "workdir")) == fs2.parent / "work"
    required = {f"lowerdir={fs1}", f"upperdir={fs2}", f"workdir={fs2.parent / 'work'}"}
    assert set(m[0].options) - _OPTIONAL_OVERLAY_OPTIONS == required
    sn.commit("c2", "c2-a", labels=opt())

    m = sn.view("v2", "c2", labels=opt())
    assert (m[0].type, m[0].source) == ("overlay", "overlay")
    assert set(m[0].options) - _OPTIONAL_OVERLAY_OPTIONS == {f"lowerdir={fs2}:{fs1}"}
    assert sn.mounts("v2") == m

    m = sn.prepare("a3", "c2", labels=opt())
    assert overlay_option(m, "lowerdir") == f"{fs2}:{fs1}"
    assert mount_source_dir(sn.prepare("alone", "", labels=opt())) not in (fs1, fs2)
