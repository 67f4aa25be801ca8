"""TOCs of an image's later layers, fetched and parsed while containerd is still busy
with the earlier ones.

containerd prepares an image's layers one after another, and each remote layer's
Prepare waits for that layer's TOC (a few round trips, then a parse of ~25 us per
entry): for a 30k-entry layer that is seconds of the pull spent after the layer before
it was done. Once the first layer of an image is prepared, its manifest names every
layer and, for eStargz, each TOC's digest (the `containerd.io/snapshot/stargz/toc.digest`
annotation), which is all a TOC load needs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from snapshotter.digest import Digest
from snapshotter.errors import LazysnapError
from snapshotter.labels import TOC_DIGEST, LayerSource
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.remote.taskhost import TaskHost

__all__ = ["LoadToc", "TocsAhead"]

log = logging.getLogger(__name__)

T = TypeVar("T")

LoadToc = Callable[[LayerSource, int], Awaitable[T]]
"""`await load(source, blob_size)`: the layer's verified TOC, or what Prepare makes of it
(its inode tree): what Prepare would do."""

# TOCs loaded ahead and not taken (layers containerd already had, so never prepared)
# cost memory: at most this many, each dropped this many seconds after its load.
_KEEP = 16
_UNUSED = 120.0
_AGAIN = 60.0  # seconds before another Prepare of an image resolves its manifest again


@dataclass
class _Load(Generic[T]):
    toc_digest: str
    blob_size: int
    done: trio.Event = field(default_factory=trio.Event)
    loaded: T | None = None  # what `load` made: the TOC, or the tree built from it


class TocsAhead(TaskHost, Generic[T]):
    """Loads the TOCs of an image's other layers once one of its layers is prepared.

    `seen(source, skip)` (trio thread, when one of its layers is prepared) resolves
    the image's manifest and starts loading, `parallel` at a time, the TOC of each
    other layer that has a TOC digest and that `skip(digest)` does not rule out
    (attached already, in a repository root). `take(source)` returns such a TOC,
    waiting for its load if it is under way, only if it was loaded for the very TOC
    digest the layer's own labels give (the blob size is the manifest's, which the
    footer found at its end confirms); otherwise None, and the caller loads it as usual.
    Loading ahead is an optimisation: a failure is a log line, and the layer's Prepare
    fetches the TOC itself.
    """

    def __init__(self, client: RegistryClient, load: LoadToc[T], *, parallel: int = 2) -> None:
        self._client = client
        self._load = load
        self._limiter = trio.CapacityLimiter(max(1, parallel))
        self._loads: OrderedDict[str, _Load[T]] = OrderedDict()  # by layer digest
        self._images: dict[str, float] = {}  # image ref (or manifest digest) -> when seen

    def seen(self, source: LayerSource, skip: Callable[[str], bool]) -> None:
        key = source.manifest_digest or source.image_ref
        now = trio.current_time()
        if self._nursery is None or not source.image_ref:
            return
        if now < self._images.get(key, -_AGAIN) + _AGAIN:
            return
        self._images = {k: t for k, t in self._images.items() if now < t + _AGAIN}
        self._images[key] = now
        self._nursery.start_soon(self._image, source, skip)

    async def take(self, source: LayerSource) -> T | None:
        load = self._loads.get(source.layer_digest)
        if load is None or load.toc_digest != source.toc_digest:
            return None
        await load.done.wait()
        self._loads.pop(source.layer_digest, None)
        return load.loaded

    async def _image(self, source: LayerSource, skip: Callable[[str], bool]) -> None:
        try:
            ref = Reference.parse(source.image_ref)
            if source.manifest_digest:
                ref = ref.with_digest(Digest.parse(source.manifest_digest))
            # Shared with the profile lookup, which resolves the image at the same moment.
            manifest = await self._client.get_manifest(ref, max_age=_AGAIN)
        except LazysnapError as exc:
            log.info("image %s: later layers' TOCs not loaded ahead (%s)", source.image_ref, exc)
            return
        started = 0
        for layer in manifest.layers:
            digest, toc_digest = str(layer.digest), layer.annotations.get(TOC_DIGEST, "")
            if (not toc_digest or digest == source.layer_digest or digest in self._loads
                    or skip(digest)):  # fmt: skip
                continue
            if started == _KEEP:  # a manifest of hundreds of layers: the rest load on Prepare
                break
            started += 1
            other = LayerSource(image_ref=source.image_ref, layer_digest=digest,
                                toc_digest=toc_digest, manifest_digest=str(manifest.digest))
            load = self._loads[digest] = _Load(toc_digest, layer.size)
            while len(self._loads) > _KEEP:
                self._loads.popitem(last=False)[1].done.set()  # a waiter loads it itself
            assert self._nursery is not None
            self._nursery.start_soon(self._one, other, load)

    async def _one(self, source: LayerSource, load: _Load[T]) -> None:
        try:
            async with self._limiter:
                load.loaded = await self._load(source, load.blob_size)
            log.debug("layer %s: toc loaded ahead", source.layer_digest)
        except LazysnapError as exc:
            log.info("layer %s: toc not loaded ahead (%s); Prepare fetches it",
                     source.layer_digest, exc)
        finally:
            load.done.set()
        await trio.sleep(_UNUSED)
        if self._loads.get(source.layer_digest) is load:
            del self._loads[source.layer_digest]
