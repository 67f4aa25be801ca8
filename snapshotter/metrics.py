"""Prometheus metrics: every metric object of the daemon, and the HTTP endpoint serving them.

The only module that imports prometheus_client. Other modules call the small functions
below (`observe_fetch`, `count_fallback`, ...) and never see a metric object, so the
instrumented code stays readable and the metric names live in one place. Counting is
always on (a dict lookup and an add); only the endpoint is optional (`metrics_address`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from snapshotter.errors import AlreadyExists, InvalidArgument

__all__ = [
    "PURPOSES",
    "REGISTRY",
    "CacheCollector",
    "LayerCollector",
    "MetricsAddressInUse",
    "MetricsAddressInvalid",
    "MetricsServer",
    "count_fallback",
    "count_fetch_error",
    "count_rpc_error",
    "fuse_observer",
    "observe_fetch",
    "observe_rpc",
    "parse_address",
    "serve",
    "serving",
    "watch_cache",
    "watch_layers",
]

log = logging.getLogger(__name__)

PURPOSES = ("demand", "prefetch", "background")
"""Label values of `purpose`: a reader waits, startup prefetch, background completion."""

REGISTRY = CollectorRegistry(auto_describe=True)
"""Ours, not prometheus_client's global one: a test or an embedding program that imports
us twice, or registers its own metrics, cannot collide with the daemon's names."""

ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Range requests take from a millisecond (loopback, cache-warm registry) to tens of seconds
# (a 16 MiB coalesced range over a slow link, or retries under fetch_timeout).
_FETCH_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FETCH_BYTES = tuple(float(4 << (2 * i)) * 1024 for i in range(8))  # 4 KiB .. 64 MiB
# FUSE answers from memory in microseconds; a read that fetches takes the network's time.
_FUSE_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RPC_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                10, 30, 60)

_BUILD_INFO = Gauge(
    "lazysnap_build_info", "lazysnap version of this daemon (always 1)", ["version"],
    registry=REGISTRY,
)
_FETCH_DURATION = Histogram(
    "lazysnap_fetch_duration_seconds",
    "Registry range requests for layer chunks: time until the last byte, by purpose",
    ["purpose"], buckets=_FETCH_SECONDS, registry=REGISTRY,
)
_FETCH_BYTES_HIST = Histogram(
    "lazysnap_fetch_bytes",
    "Registry range requests for layer chunks: compressed bytes received per request, "
    "by purpose (the _sum is the total fetched)",
    ["purpose"], buckets=_FETCH_BYTES, registry=REGISTRY,
)
_FETCH_ERRORS = Counter(
    "lazysnap_fetch_errors_total",
    "Registry range requests for layer chunks that failed, by purpose",
    ["purpose"], registry=REGISTRY,
)
_FALLBACKS = Counter(
    "lazysnap_fallbacks_total",
    "Layers that could not be served lazily and were downloaded in full, by reason",
    ["reason"], registry=REGISTRY,
)
_FUSE_DURATION = Histogram(
    "lazysnap_fuse_operation_duration_seconds",
    "FUSE requests on the repository mount, by operation (read includes any fetch)",
    ["operation"], buckets=_FUSE_SECONDS, registry=REGISTRY,
)
_RPC_DURATION = Histogram(
    "lazysnap_grpc_duration_seconds",
    "containerd Snapshots API calls, by method (errors included)",
    ["method"], buckets=_RPC_SECONDS, registry=REGISTRY,
)
_RPC_ERRORS = Counter(
    "lazysnap_grpc_errors_total",
    "containerd Snapshots API calls answered with an error, by method and gRPC status code "
    "(ALREADY_EXISTS from a lazy Prepare and NOT_FOUND from Stat are routine)",
    ["method", "code"], registry=REGISTRY,
)

for _purpose in PURPOSES:  # so every purpose shows up as 0 before its first fetch
    _FETCH_DURATION.labels(_purpose)
    _FETCH_BYTES_HIST.labels(_purpose)
    _FETCH_ERRORS.labels(_purpose)
try:
    _BUILD_INFO.labels(metadata.version("lazysnap")).set(1)
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    _BUILD_INFO.labels("unknown").set(1)


# -- recording ---------------------------------------------------------------------------

def observe_fetch(purpose: str, nbytes: int, seconds: float) -> None:
    """One range request that answered `nbytes` compressed bytes after `seconds`."""
    _FETCH_DURATION.labels(purpose).observe(seconds)
    _FETCH_BYTES_HIST.labels(purpose).observe(nbytes)


def count_fetch_error(purpose: str) -> None:
    _FETCH_ERRORS.labels(purpose).inc()


def count_fallback(reason: str) -> None:
    """A layer fell back to a full download; `reason` is one of bridge's short codes."""
    _FALLBACKS.labels(reason).inc()


def fuse_observer(operation: str) -> Callable[[float], None]:
    """The bound `observe(seconds)` of one FUSE operation's histogram.

    Bind once, when the handler is defined: the label lookup then costs nothing per
    request, which matters on the read path.
    """
    return _FUSE_DURATION.labels(operation).observe


def observe_rpc(method: str, seconds: float) -> None:
    _RPC_DURATION.labels(method).observe(seconds)


def count_rpc_error(method: str, code: str) -> None:
    """`code` is the gRPC status code's name, e.g. "NOT_FOUND"."""
    _RPC_ERRORS.labels(method, code).inc()


# -- the chunk cache, read at scrape time ------------------------------------------------

class _CacheStatistics(Protocol):
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    corrupt: int
    in_flight: int


class CacheCollector(Collector):
    """Reports the chunk cache's `statistics()` when scraped, so the cache keeps plain ints.

    One instance is registered for the process; `watch(source)` points it at the daemon's
    cache (a callable returning `cache.chunks.CacheStatistics`) and `watch(None)` forgets
    it, after which a scrape reports no cache series rather than a closed cache's numbers.
    """

    def __init__(self) -> None:
        self._source: Callable[[], _CacheStatistics] | None = None

    def watch(self, source: Callable[[], _CacheStatistics] | None) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        # Explicit (and empty) so that registering does not call collect() on no cache.
        return []

    def collect(self) -> Iterator[Any]:
        source = self._source
        if source is None:
            return
        s = source()
        gauges = {
            "entries": ("Chunks in the cache", s.entries),
            "bytes": ("Bytes of chunks in the cache", s.bytes),
            "max_bytes": ("Bound of the cache (cache_size)", s.max_bytes),
            "in_flight": ("Chunks being fetched right now", s.in_flight),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"lazysnap_cache_{name}", doc, value=value)
        counters = {
            "hits": ("Chunk reads answered from the cache", s.hits),
            "misses": ("Chunk reads not found in the cache", s.misses),
            "evictions": ("Chunks deleted to stay within the bound", s.evictions),
            "corrupt": ("Cached chunks that failed verification on read and were removed",
                        s.corrupt),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"lazysnap_cache_{name}", doc, value=value)


_CACHE = CacheCollector()
REGISTRY.register(_CACHE)


def watch_cache(source: Callable[[], _CacheStatistics] | None) -> None:
    """Report this cache statistics source (e.g. `cache.statistics`) from now on."""
    _CACHE.watch(source)


# -- lazy layers, read at scrape time ----------------------------------------------------

class LayerCollector(Collector):
    """Per lazily attached layer: compressed bytes fetched by purpose, on-demand reads
    that waited for the network and the range requests made for them, from rows as
    `lazysnap status` has them (a callable returning dicts with `layer_digest`,
    `bytes_on_demand`, `bytes_prefetch`, `bytes_background`, `demand_waits` and
    `demand_fetches`; rows without `demand_waits` are skipped). One series set
    per attached layer, as stargz-snapshotter does: a node holds tens of layers, not
    millions."""

    def __init__(self) -> None:
        self._source: Callable[[], list[dict[str, Any]]] | None = None

    def watch(self, source: Callable[[], list[dict[str, Any]]] | None) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        source = self._source
        if source is None:
            return
        fetched = CounterMetricFamily(
            "lazysnap_layer_fetched_bytes",
            "Compressed bytes fetched for one lazy layer, by purpose", labels=["layer", "purpose"])
        waits = CounterMetricFamily(
            "lazysnap_layer_demand_waits",
            "On-demand reads of one lazy layer that waited for the network", labels=["layer"])
        requests = CounterMetricFamily(
            "lazysnap_layer_demand_fetches",
            "Range requests made for on-demand reads of one lazy layer", labels=["layer"])
        for row in source():
            if "demand_waits" not in row:
                continue
            layer = row["layer_digest"]
            for purpose, key in (("demand", "bytes_on_demand"), ("prefetch", "bytes_prefetch"),
                                 ("background", "bytes_background")):
                fetched.add_metric([layer, purpose], row[key])
            waits.add_metric([layer], row["demand_waits"])
            requests.add_metric([layer], row.get("demand_fetches", 0))
        yield fetched
        yield waits
        yield requests


_LAYERS = LayerCollector()
REGISTRY.register(_LAYERS)


def watch_layers(source: Callable[[], list[dict[str, Any]]] | None) -> None:
    """Report these layer rows (e.g. the daemon's status rows) from now on."""
    _LAYERS.watch(source)


# -- the endpoint ------------------------------------------------------------------------

class MetricsAddressInvalid(InvalidArgument):
    pass


class MetricsAddressInUse(AlreadyExists):
    pass


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9100`) -> (host, port); an empty host means all, port 0
    any free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise MetricsAddressInvalid(
            f"metrics_address {text!r}: expected host:port, e.g. 127.0.0.1:9100"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MetricsAddressInvalid(
                f"metrics_address {text!r}: {host!r} is not an IPv6 address"
            ) from None
    elif ":" in host:
        raise MetricsAddressInvalid(
            f"metrics_address {text!r}: write an IPv6 host in brackets, e.g. [::1]:9100"
        )
    return host or "0.0.0.0", int(port_text)


@dataclass
class MetricsServer:
    """The running endpoint; `close()` stops it (idempotent)."""

    address: tuple[str, int]  # as bound: the real port if 0 was asked for
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)


def serve(address: str) -> MetricsServer:
    """Serve `/metrics` on `address` (host:port) from a daemon thread of its own.

    The thread only formats counters, so it needs no trio and cannot stall FUSE.
    """
    host, port = parse_address(address)
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        kind = MetricsAddressInUse if exc.errno == errno.EADDRINUSE else MetricsAddressInvalid
        raise kind(f"metrics_address {address!r}: cannot listen: {exc}") from exc
    bound = server.server_address[:2]
    running = MetricsServer((bound[0], bound[1]), server, thread)
    log.info("metrics on %s", running.url)
    return running


@contextlib.contextmanager
def serving(address: str) -> Iterator[MetricsServer | None]:
    """`serve(address)` for the duration of a with-block; nothing if `address` is empty."""
    if not address:
        yield None
        return
    server = serve(address)
    try:
        yield server
    finally:
        server.close()
