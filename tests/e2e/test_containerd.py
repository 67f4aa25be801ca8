"""lazysnap under real containerd, runc and a registry: pull, run, inspect, delete, restart.

Tests marked `both_snapshotters` also run against containerd's own overlayfs snapshotter, the
behaviour lazysnap must match; a failure only on the lazysnap side is a lazysnap bug.
"""

from __future__ import annotations

import os
import signal
import stat

import pytest

from tests.e2e.conftest import PushedImage, both_snapshotters
from tests.e2e.harness import wait_for
from tests.e2e.images import merged_tree
from tests.e2e.stack import Stack
from tests.e2e.tree import LISTING_SCRIPT, compare, host_xattrs, parse_listing

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _committed(stack: Stack) -> dict[str, str]:
    """name -> parent of every committed snapshot."""
    return {s.key: s.parent for s in stack.snapshots() if s.kind == "Committed"}


@both_snapshotters
def test_pull_unpacks_one_committed_snapshot_per_layer(stack: Stack, sample: PushedImage) -> None:
    stack.pull(sample.ref)

    committed = _committed(stack)
    assert len(committed) == len(sample.image.layers)
    # A chain: one snapshot without a parent, every other one on top of a committed one.
    assert [name for name, parent in committed.items() if not parent] != []
    assert sum(1 for parent in committed.values() if not parent) == 1
    assert all(parent in committed for parent in committed.values() if parent)
    assert len(stack.snapshot_dirs()) == len(sample.image.layers)


@both_snapshotters
def test_run_prints_the_image_command_output(stack: Stack, sample: PushedImage) -> None:
    stack.pull(sample.ref)

    assert stack.run(sample.ref, "hello") == "hello from lazysnap\n"
    assert stack.run(sample.ref, "args", "echo", "from", "args") == "from args\n"
    # --rm removed the container's active snapshot again.
    assert [s for s in stack.snapshots() if s.kind == "Active"] == []


@both_snapshotters
def test_container_sees_exactly_the_merged_layers(stack: Stack, sample: PushedImage) -> None:
    """Content, mode, owner, link targets, devices, hardlinks; whiteouts and opaque dirs."""
    stack.pull(sample.ref)

    listing = stack.run(sample.ref, "listing", "sh", "-c", LISTING_SCRIPT)

    seen = parse_listing(listing)
    expected = merged_tree(sample.image)
    assert compare(expected, seen) == []
    # Spelled out, since these are what overlay semantics most easily get wrong:
    assert "/etc/removed.txt" not in seen and "/etc/kept.txt" in seen
    assert not [p for p in seen if p.startswith("/etc/subdir")]
    assert sorted(p for p in seen if p.startswith("/opt/old/")) == ["/opt/old/a", "/opt/old/c"]
    assert seen["/data/hardlink"].inode == seen["/data/hello.txt"].inode
    assert seen["/data/symlink"].kind == "reg"


@both_snapshotters
def test_xattrs_reach_the_container_rootfs(stack: Stack, sample: PushedImage) -> None:
    stack.pull(sample.ref)
    stack.run(sample.ref, "xattrs", "sleep", "60", rm=False, detach=True)
    try:
        rootfs = stack.task_rootfs("xattrs")
        wait_for(lambda: (rootfs / "bin").exists(), 10, "the task's rootfs mount")
        assert host_xattrs(rootfs, merged_tree(sample.image)) == []
    finally:
        stack.ctr("tasks", "rm", "-f", "xattrs")
        stack.ctr("containers", "rm", "xattrs")


@both_snapshotters
def test_writes_land_in_the_containers_upper_dir(stack: Stack, sample: PushedImage) -> None:
    stack.pull(sample.ref)
    layers_before = {d: _tree_digest(stack, d) for d in stack.snapshot_dirs()}

    out = stack.run(
        sample.ref,
        "writer",
        "sh",
        "-c",
        "echo written > /data/new.txt && echo changed > /etc/kept.txt && rm /data/empty && "
        "cat /data/new.txt /etc/kept.txt",
        rm=False,
    )

    assert out == "written\nchanged\n"
    mount = stack.mounts("writer")
    assert mount["type"] == "overlay"
    upper = mount["upperdir"]
    upper_id = os.path.basename(os.path.dirname(upper))
    assert upper == str(stack.snapshot_root / "snapshots" / upper_id / "fs")
    assert (stack.snapshot_root / "snapshots" / upper_id / "fs" / "data/new.txt").read_text() == (
        "written\n"
    )
    assert (stack.snapshot_root / "snapshots" / upper_id / "fs/etc/kept.txt").read_text() == (
        "changed\n"
    )
    whiteout = os.lstat(stack.snapshot_root / "snapshots" / upper_id / "fs/data/empty")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    # The image's layers are untouched, and the lowerdirs are exactly those layers.
    lower_ids = {os.path.basename(os.path.dirname(p)) for p in mount["lowerdir"].split(":")}
    assert lower_ids == set(layers_before)
    assert {d: _tree_digest(stack, d) for d in layers_before} == layers_before

    stack.ctr("containers", "rm", "writer")
    wait_for(lambda: upper_id not in stack.snapshot_dirs(), 20, "the container's upper dir to go")
    assert "writer" not in {s.key for s in stack.snapshots()}


def _tree_digest(stack: Stack, snapshot_id: str) -> list[tuple[str, int, int]]:
    root = stack.snapshot_root / "snapshots" / snapshot_id / "fs"
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mode))
    return sorted(out)


@both_snapshotters
def test_ctr_snapshots_ls_info_tree_usage(stack: Stack, sample: PushedImage) -> None:
    stack.pull(sample.ref)
    committed = _committed(stack)
    top = next(name for name in committed if name not in committed.values())
    bottom = next(name for name, parent in committed.items() if parent == "")

    info = stack.info(top)
    assert info["Kind"] == "Committed" and info["Name"] == top
    assert info["Parent"] == committed[top]
    assert "Parent" not in stack.info(bottom)
    tree = stack.snap("tree")
    assert tree.index(bottom) < tree.index(top)
    usage = stack.snap("usage", top)
    assert top in usage


@both_snapshotters
def test_image_rm_and_gc_remove_all_snapshots(stack: Stack, sample: PushedImage) -> None:
    stack.pull(sample.ref)
    stack.run(sample.ref, "once")
    assert stack.snapshot_dirs()

    stack.remove_image_and_gc(sample.ref)

    assert stack.snapshots() == []
    wait_for(lambda: not stack.snapshot_dirs(), 20, "snapshot directories to be removed")
    assert stack.ctr("images", "ls", "-q") == ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_between_pull_and_run_keeps_all_state(
    stack: Stack, sample: PushedImage, sig: signal.Signals
) -> None:
    assert stack.lazysnap is not None
    stack.pull(sample.ref)
    before = (stack.snapshots(), stack.snapshot_dirs())

    status = stack.lazysnap.stop(sig)
    assert status == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    stack.lazysnap.start()
    stack.wait_ready()

    assert (stack.snapshots(), stack.snapshot_dirs()) == before
    assert stack.run(sample.ref, "after-restart") == "hello from lazysnap\n"
    listing = parse_listing(stack.run(sample.ref, "listing", "sh", "-c", LISTING_SCRIPT))
    assert compare(merged_tree(sample.image), listing) == []
    stack.remove_image_and_gc(sample.ref)
    assert stack.snapshots() == []
    wait_for(lambda: not stack.snapshot_dirs(), 20, "snapshot directories to be removed")
