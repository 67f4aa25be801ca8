"""How core sees remote layers: the `RemoteLayers` Protocol, and nothing else.

Contract. `prepare(key, parent, labels)` is called for an active Prepare that carries
`containerd.io/snapshot.ref`. It returns None when the layer cannot be served lazily (the
implementation logs and counts the reason; core then makes an ordinary snapshot so that
containerd downloads the layer; any exception but RemoteRequired is logged by core and
treated the same way) or a `handle`: an opaque, JSON-safe string that core
stores with the committed snapshot. From then on core only passes handles back:
`lowerdir(handle)` is the directory overlayfs reads, `check(handle)` raises Unavailable
when the layer cannot be read now, `release(handle)` is called after the snapshot's row
is gone, and `restore(handle)` once per stored handle when the daemon starts.

Example: prepare("default/3/extract-1 sha256:c1", "", {snapshot.ref: "sha256:c1", ...})
-> '{"dir": "4", "digest": "sha256:ab…", ...}'; lowerdir(that) -> "/var/lib/lazysnap/repo/4".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from snapshotter.errors import FailedPrecondition

__all__ = ["RemoteLayers", "RemoteRequired"]


class RemoteRequired(FailedPrecondition):
    """Raised by `prepare` when the layer cannot be served remotely and policy forbids
    falling back to a download; the only exception core passes on from `prepare`."""


class RemoteLayers(Protocol):
    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> str | None: ...

    def lowerdir(self, handle: str) -> str: ...

    def check(self, handle: str) -> None: ...

    def release(self, handle: str) -> None: ...

    def restore(self, handle: str) -> None: ...
