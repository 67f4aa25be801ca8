"""OCI whiteout names and what they mean; `fs/tree.py` turns them into overlayfs terms.

In an OCI layer, `.wh.<name>` deletes `<name>` from the layers below, and `.wh..wh..opq`
in a directory hides everything below that directory. overlayfs says the same with a
char 0/0 device named `<name>` and an `overlay.opaque` xattr of "y" on the directory.
"""

from __future__ import annotations

import enum

__all__ = [
    "OPAQUE_MARKER",
    "OVERLAY_OPAQUE_XATTR",
    "OVERLAY_OPAQUE_XATTR_USER",
    "OVERLAY_OPAQUE_YES",
    "OVERLAY_WHITEOUT_DEV",
    "WHITEOUT_META_PREFIX",
    "WHITEOUT_PREFIX",
    "WhiteoutKind",
    "classify",
]

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."  # reserved for markers (AUFS used `.wh..wh.plnk` etc.)
OPAQUE_MARKER = ".wh..wh..opq"

OVERLAY_WHITEOUT_DEV = (0, 0)  # (major, minor) of overlayfs' whiteout char device
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_OPAQUE_XATTR_USER = "user.overlay.opaque"  # overlayfs mounted with `userxattr`
OVERLAY_OPAQUE_YES = b"y"


class WhiteoutKind(enum.Enum):
    ORDINARY = "ordinary"  # a normal file name, shown as is
    WHITEOUT = "whiteout"  # `.wh.<target>`: <target> is deleted
    OPAQUE = "opaque"  # `.wh..wh..opq`: the containing directory is opaque
    META = "meta"  # any other reserved `.wh.` name: hidden, no effect (as in containerd)


def classify(name: str) -> tuple[WhiteoutKind, str]:
    """`(kind, target)` for a path or base name; only the base name matters.

    `target` is the deleted name for WHITEOUT and the base name itself for ORDINARY;
    it is "" for OPAQUE and META.

    >>> classify("usr/.wh.lib")
    (<WhiteoutKind.WHITEOUT: 'whiteout'>, 'lib')
    """
    base = name.rpartition("/")[2]
    if not base.startswith(WHITEOUT_PREFIX):
        return WhiteoutKind.ORDINARY, base
    if base == OPAQUE_MARKER:
        return WhiteoutKind.OPAQUE, ""
    target = base[len(WHITEOUT_PREFIX) :]
    # `.wh..wh.*` is reserved, and a whiteout of "", "." or ".." would name no entry.
    if base.startswith(WHITEOUT_META_PREFIX) or target in ("", ".", ".."):
        return WhiteoutKind.META, ""
    return WhiteoutKind.WHITEOUT, target
