"""Manifests fetched moments ago, reused by whoever resolves the same reference next.

When containerd prepares an image's first layer, several parts of the daemon resolve that
image at once (the profile lookup, the TOCs loaded ahead): without this, each is a manifest
GET, and registries count those (Docker Hub's pull limit is in manifest GETs). A tag may
move, so an answer is reused only for `max_age` seconds; failures are never reused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from snapshotter.registry.manifest import Manifest

__all__ = ["RecentManifests"]

_KEPT = 64  # references remembered at most


@dataclass
class _Entry:
    at: float
    done: trio.Event = field(default_factory=trio.Event)
    manifest: Manifest | None = None  # None once done: the fetch failed or was cancelled


class RecentManifests:
    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    async def get(
        self, key: str, max_age: float, fetch: Callable[[], Awaitable[Manifest]]
    ) -> Manifest:
        """`fetch()`, or the manifest a fetch for `key` gave at most `max_age` seconds
        ago or is about to give (then this waits for it)."""
        now = trio.current_time()
        entry = self._entries.get(key)
        if entry is not None and (not entry.done.is_set() or now - entry.at <= max_age):
            await entry.done.wait()
            if entry.manifest is not None:
                return entry.manifest
            return await fetch()  # that fetch failed: ours may not
        entry = self._entries[key] = _Entry(at=now)
        self._entries.move_to_end(key)
        while len(self._entries) > _KEPT:
            self._entries.popitem(last=False)
        try:
            entry.manifest = manifest = await fetch()
        finally:
            entry.done.set()
            if entry.manifest is None and self._entries.get(key) is entry:
                del self._entries[key]
        return manifest
