"""What every conformance check shares: the label set, the layout, layer building and
the "no partial state" guard.

Layout (as containerd's makeTest): a fresh temp dir holds `root/` (the snapshotter's root)
and `work/` (the play area passed to checks as `work`), so `root_of(work)` finds the root.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from suite_fstest import Applier, assert_same_tree
from suite_mounting import mounted

from snapshotter.core.metastore import check_consistency
from snapshotter.core.types import Info, Mount

GC_ROOT = "containerd.io/gc.root"

# Stamped once per session like containerd's package-level `opt`.
_GC_ROOT_VALUE = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

_names = itertools.count(1)


def opt(**extra: str) -> dict[str, str]:
    """The labels passed on every call: GC root (so a GC can never collect test snapshots)."""
    return {GC_ROOT: _GC_ROOT_VALUE, **extra}


def needs_mounts(check: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a check that mounts the returned Mounts for real (runs under the root marker)."""
    check.needs_mounts = True  # type: ignore[attr-defined]
    return check


def slow(check: Callable[..., Any]) -> Callable[..., Any]:
    check.slow = True  # type: ignore[attr-defined]
    return check


def root_of(work: Path) -> Path:
    return work.parent / "root"


def snapshot_dirs(work: Path) -> list[str]:
    """Every path below <root>/snapshots, relative: the on-disk half of the state."""
    base = root_of(work) / "snapshots"
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*dirnames, *filenames]:
            found.append(str(Path(dirpath, name).relative_to(base)))
    return sorted(found)


def assert_consistent(work: Path) -> None:
    problems = check_consistency(root_of(work))
    assert problems == [], f"store inconsistent: {problems}"


def _state(sn: Any, work: Path) -> tuple[list[Info], list[str]]:
    return sorted(sn.walk(), key=lambda i: i.name), snapshot_dirs(work)


@contextmanager
def unchanged(sn: Any, work: Path) -> Iterator[None]:
    """Wrap a call that must fail: afterwards rows, labels, times and directories are as
    before (no stray rows, no stray directories) and the store is still consistent."""
    rows, dirs = _state(sn, work)
    yield
    after_rows, after_dirs = _state(sn, work)
    assert after_rows == rows, "a failed call changed the snapshot rows"
    assert after_dirs == dirs, "a failed call changed the snapshot directories"
    assert_consistent(work)


def mount_source_dir(mounts: list[Mount]) -> Path:
    """The directory a single-layer bind mount exposes (the snapshot's own fs dir)."""
    assert len(mounts) == 1 and mounts[0].type == "bind", mounts
    return Path(mounts[0].source)


def overlay_option(mounts: list[Mount], name: str) -> str:
    assert len(mounts) == 1 and mounts[0].type == "overlay", mounts
    values = [o.split("=", 1)[1] for o in mounts[0].options if o.startswith(name + "=")]
    assert len(values) == 1, f"expected one {name}= option in {mounts[0].options}"
    return values[0]


def create_snapshot(sn: Any, parent: str, work: Path, applier: Applier) -> str:
    """Prepare on `parent`, apply through a real mount, commit; returns the committed name
    (containerd's helpers.go createSnapshot)."""
    name = f"layer-{next(_names)}"
    preparing = f"{name}-prepare"
    mounts = sn.prepare(preparing, parent, labels=opt())
    target = work / f"apply-{name}"
    with mounted(mounts, target):
        applier(target)
    target.rmdir()
    sn.commit(name, preparing, labels=opt())
    return name


def check_snapshot(sn: Any, work: Path, name: str, flat: Path) -> None:
    """A view of `name`, mounted, must equal `flat`; the view is removed afterwards."""
    view = f"{name}-view"
    mounts = sn.view(view, name, labels=opt())
    target = work / f"check-{name}"
    try:
        with mounted(mounts, target):
            assert_same_tree(flat, target)
    finally:
        sn.remove(view)
    target.rmdir()


def check_snapshots(sn: Any, work: Path, *appliers: Applier) -> list[str]:
    """Build a chain, one layer per applier, checking each layer's view against the same
    changes applied to one flat directory (containerd's helpers.go checkSnapshots)."""
    flat = work / f"flat-{next(_names)}"
    flat.mkdir()
    parent, names = "", []
    for applier in appliers:
        parent = create_snapshot(sn, parent, work, applier)
        applier(flat)
        check_snapshot(sn, work, parent, flat)
        names.append(parent)
    return names
