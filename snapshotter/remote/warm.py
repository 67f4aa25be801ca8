"""Keeping lazily attached layers warm: startup prefetch, then background completion,
layer by layer, with the policy (sizes, waits, caps) the daemon is configured with.

`remote/prefetch.py` knows how to fetch a plan; this module decides when, for which
layer, and how many at once, and remembers what happened for `lazysnap status`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import trio

from snapshotter.errors import LazysnapError
from snapshotter.format.toc import Toc
from snapshotter.remote.blob import FETCH_PURPOSE, DemandGauge, RangeReader, RemoteBlob
from snapshotter.remote.prefetch import (
    BACKGROUND_BATCH,
    PrefetchPlan,
    background_fetch,
    plan_prefetch,
    prefetch,
)
from snapshotter.remote.taskhost import TaskHost

if TYPE_CHECKING:
    from snapshotter.digest import Digest
    from snapshotter.registry.client import RegistryClient
    from snapshotter.registry.reference import Reference

__all__ = ["HostPool", "WarmHooks", "WarmPolicy", "Warmer"]

log = logging.getLogger("lazysnap.warm")

FetchRange = Callable[[int, int], Awaitable[bytes]]
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WarmPolicy:
    """What the daemon's config says about prefetching (see config.py for each key)."""

    prefetch: bool = True  # false: no startup prefetch at all
    prefetch_size: int = 0  # bytes from the layer's start when there is no landmark/label
    prefetch_wait: float = 10.0  # seconds a start waits for its layers' prefetch
    prefetch_parallel: int = 4  # range requests in flight per layer prefetch
    background: bool = True
    # Seconds without waiting readers before background work (stargz's silence period is
    # 30 s too): startup and bursts of reads keep the network to themselves.
    background_quiet: float = 30.0
    background_rate: int = 0  # bytes per second for all background work; 0 = no cap
    background_concurrency: int = 2  # layers completed in the background at once
    background_batch: int = BACKGROUND_BATCH


@dataclass
class _Layer:
    key: str
    blob: RemoteBlob
    toc: Toc
    deadline: float  # trio time after which a start stops waiting for the prefetch
    ready: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    prefetch: str = "pending"  # the plan's reason, then "done"/"failed" is appended
    prefetch_chunks: int = 0
    background: str = "off"  # off, waiting, running, complete, incomplete, stopped


@dataclass
class _Host:
    limiter: trio.CapacityLimiter
    tocs: int = 0  # TOC fetches in flight
    no_tocs: trio.Event = field(default_factory=trio.Event)


class HostPool:
    """At most `per_host` range requests in flight to one registry host, all blobs
    together: a burst of reads over many layers queues here instead of opening
    connections without bound (and a slow one holds only its own slot).

    TOC fetches go first: while one is in flight to a host, prefetch and background
    requests (`blob.FETCH_PURPOSE`) wait before they start. A Prepare waits for its
    TOC, and a prefetch of tens of requests in flight would otherwise leave it a
    tenth of the link (measured: 2.5 s instead of 0.2 s for a 1.5 MB TOC at 100 Mbit/s).
    Demand reads neither wait nor hold the others back.
    """

    def __init__(self, per_host: int) -> None:
        self.per_host = max(1, per_host)
        self._hosts: dict[str, _Host] = {}

    def limited(self, host: str, fetch: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """`fetch` (a FetchRange, or any request to `host`) within the host's bound."""

        async def fetch_range(*args: P.args, **kwargs: P.kwargs) -> T:
            state = self._hosts.get(host)
            if state is None:
                state = self._hosts[host] = _Host(trio.CapacityLimiter(self.per_host))
            purpose = FETCH_PURPOSE.get()
            if purpose in ("prefetch", "background"):
                while state.tocs:
                    await state.no_tocs.wait()
            elif purpose == "toc":
                state.tocs += 1
            try:
                async with state.limiter:
                    return await fetch(*args, **kwargs)
            finally:
                if purpose == "toc":
                    state.tocs -= 1
                    if not state.tocs:
                        state.no_tocs.set()
                        state.no_tocs = trio.Event()

        return fetch_range

    def blob_reader(self, client: RegistryClient, ref: Reference, digest: Digest) -> RangeReader:
        """Range reads of one blob within `ref.host`'s bound: one range, or several in one
        request while the registry answers those."""
        return RangeReader(
            self.limited(ref.host, partial(client.read_blob_range, ref, digest)),
            self.limited(ref.host, partial(client.read_blob_ranges, ref, digest)),
            partial(client.multi_range, ref.host),
        )


class Warmer(TaskHost):
    """Starts, tracks and stops the warming of each attached layer.

    Lifecycle: `await nursery.start(warmer.run)` in the daemon; then, in the trio thread,
    `attach(key, blob, toc)` right after a layer is attached (starts its prefetch without
    waiting, so the layers of an image, prepared one after another, prefetch in
    parallel), `await wait_ready(key)` before a container's mounts are handed out
    (returns when the layer's prefetch has finished or `prefetch_wait` seconds after
    attach, whichever is first), and `detach(key)` when the layer goes (cancels its
    work). Background completion starts after the prefetch and `background_quiet`
    seconds, `background_concurrency` layers at a time, pausing while any on-demand read
    waits on `gauge` (shared with every blob attached here). Without `run`, tasks are
    trio system tasks (tests, tools).

        warmer = Warmer(WarmPolicy(prefetch_wait=5))
        await nursery.start(warmer.run)
        warmer.attach("sha256:ab..", blob, toc, prefetch_size=label_size)
        await warmer.wait_ready("sha256:ab..")
        warmer.status("sha256:ab..")   # {"prefetch": "landmark done", ...}
    """

    def __init__(self, policy: WarmPolicy) -> None:
        self.policy = policy
        self.gauge = DemandGauge()
        self._layers: dict[str, _Layer] = {}
        self._background = trio.CapacityLimiter(max(1, policy.background_concurrency))

    def attach(
        self, key: str, blob: RemoteBlob, toc: Toc, *, prefetch_size: int | None = None
    ) -> None:
        """Start warming a layer (trio thread). Attaching a key again replaces it."""
        self.detach(key)
        if blob.demand is None:
            blob.demand = self.gauge
        layer = _Layer(key, blob, toc, deadline=trio.current_time() + self.policy.prefetch_wait)
        self._layers[key] = layer
        size = self.policy.prefetch_size if prefetch_size is None else prefetch_size
        if self._nursery is not None:
            self._nursery.start_soon(self._warm, layer, size)
        else:
            trio.lowlevel.spawn_system_task(self._warm, layer, size)

    def detach(self, key: str) -> None:
        layer = self._layers.pop(key, None)
        if layer is not None:
            layer.scope.cancel()
            layer.ready.set()

    async def wait_ready(self, key: str) -> bool:
        """Wait for the layer's prefetch, bounded; True if it finished."""
        layer = self._layers.get(key)
        if layer is None:
            return True
        with trio.move_on_at(layer.deadline):
            await layer.ready.wait()
        if not layer.ready.is_set():
            log.info("%s: start goes ahead before its prefetch finished (%gs)",
                     layer.blob.name, self.policy.prefetch_wait)
        return layer.ready.is_set()

    def status(self, key: str) -> dict[str, Any]:
        """The layer's warming state and bytes by purpose (empty if not attached here)."""
        layer = self._layers.get(key)
        if layer is None:
            return {}
        stats = layer.blob.statistics()
        return {
            "prefetch": layer.prefetch,
            "prefetch_chunks": layer.prefetch_chunks,
            "background": layer.background,
            "bytes_prefetch": stats.bytes_prefetch,
            "bytes_background": stats.bytes_background,
            "bytes_on_demand": stats.bytes_on_demand,
            "demand_waits": stats.demand_waits,
            "demand_fetches": stats.demand_fetches,
        }

    def keys(self) -> list[str]:
        return list(self._layers)

    # -- internals ----------------------------------------------------------------------

    async def _warm(self, layer: _Layer, size: int) -> None:
        # Runs as a system task without `run`: nothing may escape.
        with layer.scope:
            try:
                await self._prefetch(layer, size)
                if self.policy.background:
                    await self._complete(layer)
            except Exception:
                log.exception("%s: warming failed", layer.blob.name)
            finally:
                layer.ready.set()

    async def _prefetch(self, layer: _Layer, size: int) -> None:
        toc = layer.toc
        if not self.policy.prefetch:
            plan = PrefetchPlan(end=0, chunks=(), reason="off")
        elif toc.prefetch_landmark is not None and toc.prefetch_landmark > toc.toc_offset:
            # A hint that cannot be right: ignore it rather than guess what was meant.
            log.warning("%s: prefetch landmark at %d lies beyond the layer's data (%d bytes);"
                        " not prefetching", layer.blob.name, toc.prefetch_landmark,
                        toc.toc_offset)
            plan = PrefetchPlan(end=0, chunks=(), reason="landmark rejected")
        else:
            plan = plan_prefetch(toc, size=size)
        layer.prefetch = plan.reason
        if not plan.chunks:
            layer.prefetch = f"{plan.reason}: nothing"
            layer.ready.set()
            return
        result = await prefetch(layer.blob, plan, parallel=self.policy.prefetch_parallel)
        layer.prefetch_chunks = result.chunks
        layer.prefetch = f"{plan.reason} {'done' if result.complete else 'partly failed'}"
        layer.ready.set()
        log.info("%s: prefetched %d chunks (%d bytes, %s)", layer.blob.name, result.chunks,
                 result.bytes_fetched, plan.reason)

    async def _complete(self, layer: _Layer) -> None:
        layer.background = "waiting"
        # Startup is when readers need the network most: leave it to them for a while.
        await trio.sleep(self.policy.background_quiet)
        async with self._background:
            layer.background = "running"
            rate = self.policy.background_rate
            per_layer = rate / self._background.total_tokens if rate else None
            try:
                result = await background_fetch(
                    layer.blob, layer.toc, quiet=self.policy.background_quiet,
                    rate=per_layer, batch_bytes=self.policy.background_batch,
                )
            except LazysnapError as exc:  # e.g. the cache closed under us
                layer.background = "stopped"
                log.info("%s: background fetch stopped: %s", layer.blob.name, exc)
                return
        layer.background = "complete" if result.complete else "incomplete"
        log.info("%s: background fetch %s (%d bytes)", layer.blob.name, layer.background,
                 result.bytes_fetched)



class WarmHooks:
    """`Warmer` as one of the bridge's LayerHooks: a layer attached (or restored) starts
    warming, its release (from a gRPC thread) stops it, and its status row gains the
    warming fields."""

    def __init__(self, warmer: Warmer, token: trio.lowlevel.TrioToken) -> None:
        self.warmer = warmer
        self._token = token

    def preparing(self, source: Any) -> None:
        pass  # a prefetch plan needs the layer's TOC

    def attached(self, layer_id: str, source: Any, toc: Toc, blob: RemoteBlob) -> None:
        self.warmer.attach(source.layer_digest, blob, toc, prefetch_size=source.prefetch_size)

    def lowerdir(self, digest: str) -> str | None:
        return None

    def released(self, digest: str) -> None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # not in the trio thread (the usual case: a gRPC thread)
            trio.from_thread.run_sync(self.warmer.detach, digest, trio_token=self._token)
        else:
            self.warmer.detach(digest)

    def restored(self, in_use: frozenset[str]) -> None:
        pass  # warming state lives in memory only

    def status(self, digest: str) -> dict[str, Any]:
        return self.warmer.status(digest)
