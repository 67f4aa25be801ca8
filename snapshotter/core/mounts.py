"""Mount shapes of containerd's overlayfs snapshotter, as pure functions of a snapshot.

No parent: a bind mount of the snapshot's own dir (rw for active, ro for a view). A view
of exactly one parent: a read-only bind of that parent. Otherwise overlayfs, lowerdir
nearest parent first, plus upperdir/workdir for an active snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

from snapshotter.core.types import Kind, Mount

__all__ = ["snapshot_mounts"]


def snapshot_mounts(
    kind: Kind,
    upper: str,
    work: str,
    lowers: Sequence[str],
    *,
    index_off: bool = False,
) -> list[Mount]:
    """`lowers` are the parents' directories, nearest parent first."""
    if not lowers:
        flag = "ro" if kind == Kind.VIEW else "rw"
        return [Mount(type="bind", source=upper, options=(flag, "rbind"))]
    if kind != Kind.ACTIVE and len(lowers) == 1:
        return [Mount(type="bind", source=lowers[0], options=("ro", "rbind"))]
    options: list[str] = []
    # Without index=off, an overlay whose lowerdirs were mounted elsewhere before
    # can refuse to mount (EBUSY/ESTALE on the index); containerd does the same.
    if index_off:
        options.append("index=off")
    if kind == Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={upper}"]
    options.append("lowerdir=" + ":".join(lowers))
    return [Mount(type="overlay", source="overlay", options=tuple(options))]
