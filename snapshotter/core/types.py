"""Value types of the snapshot world, in containerd's vocabulary (snapshots/snapshotter.go)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["Info", "Kind", "Mount", "Usage"]


class Kind(enum.IntEnum):
    """Numbering matches containerd.services.snapshots.v1.Kind on the wire."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True, slots=True)
class Info:
    """A snapshot as containerd sees it.

    `name` is the key for active/view snapshots and the committed name otherwise;
    `parent` is "" for a snapshot without parent. Times are timezone-aware UTC.
    """

    kind: Kind
    name: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk usage of one snapshot's own directory (not its parents)."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount(8) call: `mount -t <type> <source> <target> -o <options>`."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""
