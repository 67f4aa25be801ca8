"""metrics.py: the series each instrumented module moves, the cache collector, the endpoint.

Metrics are process-wide, so every assertion is on the change across one action.
"""

from __future__ import annotations

import gzip
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pyfuse3
import pytest
from prometheus_client import CollectorRegistry

from snapshotter import metrics
from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from snapshotter.format.toc import Chunk
from snapshotter.fs.ops import RepositoryOperations
from snapshotter.fs.repository import Repository
from snapshotter.remote.blob import RemoteBlob
from snapshotter.service.snapshots import _call


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Values of some series now, to compare after an action."""

    def __init__(self, *series: tuple[str, dict[str, str]]) -> None:
        self.series = series
        self.before = [sample(n, **lb) for n, lb in series]

    def __call__(self) -> list[float]:
        return [sample(n, **lb) - b for (n, lb), b in zip(self.series, self.before, strict=True)]


# -- fetches ---------------------------------------------------------------------------

def _one_chunk_blob(payload: bytes) -> tuple[bytes, Chunk]:
    member = gzip.compress(payload, mtime=0)
    chunk = Chunk(chunk_offset=0, size=len(payload), offset=0, end=len(member),
                  inner_offset=0, digest=str(Digest.of(payload)))
    return member, chunk


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ChunkCache]:
    with ChunkCache(tmp_path / "cache", 1 << 20) as c:
        yield c


@pytest.mark.parametrize("purpose", metrics.PURPOSES)
async def test_fetch_bytes_and_latency_are_counted_by_purpose(
    cache: ChunkCache, purpose: Any
) -> None:
    blob_bytes, chunk = _one_chunk_blob(purpose.encode() * 3000)

    async def fetch(start: int, end: int) -> bytes:
        return blob_bytes[start:end]

    blob = RemoteBlob(fetch, cache, blob_size=len(blob_bytes), name="b")
    others = [p for p in metrics.PURPOSES if p != purpose]
    delta = Delta(
        ("lazysnap_fetch_bytes_sum", {"purpose": purpose}),
        ("lazysnap_fetch_bytes_count", {"purpose": purpose}),
        ("lazysnap_fetch_duration_seconds_count", {"purpose": purpose}),
        *[("lazysnap_fetch_bytes_sum", {"purpose": p}) for p in others],
    )

    await blob.read_chunks([chunk], purpose=purpose)
    await blob.read_chunks([chunk], purpose=purpose)  # a cache hit fetches nothing

    assert delta() == [len(blob_bytes), 1, 1, 0, 0]


async def test_failed_fetches_are_counted(cache: ChunkCache) -> None:
    blob_bytes, chunk = _one_chunk_blob(b"x" * 1000)

    async def fetch(start: int, end: int) -> bytes:
        raise Unavailable("registry down")

    blob = RemoteBlob(fetch, cache, blob_size=len(blob_bytes), name="b")
    delta = Delta(("lazysnap_fetch_errors_total", {"purpose": "demand"}),
                  ("lazysnap_fetch_duration_seconds_count", {"purpose": "demand"}))

    with pytest.raises(Unavailable):
        await blob.read_chunk(chunk)

    assert delta() == [1, 0]


def test_every_purpose_is_exported_before_any_fetch() -> None:
    text = _exposition(metrics.REGISTRY)
    for purpose in metrics.PURPOSES:
        assert f'lazysnap_fetch_errors_total{{purpose="{purpose}"}}' in text


# -- the chunk cache ---------------------------------------------------------------------

def _exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_cache_collector_reports_statistics_at_scrape_time(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    collector = metrics.CacheCollector()
    registry.register(collector)
    assert "lazysnap_cache" not in _exposition(registry)  # no cache watched: no series

    pieces = [bytes([i]) * 400 for i in range(3)]
    with ChunkCache(tmp_path / "cache", max_bytes=900) as cache:
        collector.watch(cache.statistics)
        cache.put(Digest.of(pieces[0]), pieces[0])
        assert cache.get(Digest.of(pieces[0])) == pieces[0]
        assert cache.get(Digest.of(b"absent")) is None
        cache.put(Digest.of(pieces[1]), pieces[1])
        cache.put(Digest.of(pieces[2]), pieces[2])  # 1200 > 900: the oldest goes

        def value(name: str) -> float | None:
            return registry.get_sample_value(name)

        assert value("lazysnap_cache_entries") == 2
        assert value("lazysnap_cache_bytes") == 800
        assert value("lazysnap_cache_max_bytes") == 900
        assert value("lazysnap_cache_hits_total") == 1
        assert value("lazysnap_cache_misses_total") == 1
        assert value("lazysnap_cache_evictions_total") == 1
        assert value("lazysnap_cache_corrupt_total") == 0
        assert value("lazysnap_cache_in_flight") == 0

        collector.watch(None)
        assert value("lazysnap_cache_entries") is None


def test_watch_cache_feeds_the_process_registry(cache: ChunkCache) -> None:
    metrics.watch_cache(cache.statistics)
    try:
        cache.put(Digest.of(b"abc"), b"abc")
        assert sample("lazysnap_cache_bytes") == 3
    finally:
        metrics.watch_cache(None)
    assert metrics.REGISTRY.get_sample_value("lazysnap_cache_bytes") is None


# -- fallbacks, FUSE, gRPC ---------------------------------------------------------------

def test_fallbacks_are_counted_by_reason() -> None:
    delta = Delta(("lazysnap_fallbacks_total", {"reason": "not-estargz"}),
                  ("lazysnap_fallbacks_total", {"reason": "unauthorized"}))
    metrics.count_fallback("not-estargz")
    metrics.count_fallback("not-estargz")
    assert delta() == [2, 0]


class _StubContext:
    uid = gid = 0
    pid = 1
    umask = 0o022


async def test_fuse_operations_are_timed_including_failures() -> None:
    ops = RepositoryOperations(Repository())
    delta = Delta(("lazysnap_fuse_operation_duration_seconds_count", {"operation": "getattr"}),
                  ("lazysnap_fuse_operation_duration_seconds_count", {"operation": "lookup"}))

    await ops.getattr(pyfuse3.ROOT_INODE, _StubContext())  # type: ignore[arg-type]
    with pytest.raises(pyfuse3.FUSEError):
        await ops.lookup(pyfuse3.ROOT_INODE, b"no-such-layer", _StubContext())  # type: ignore[arg-type]

    assert delta() == [1, 1]


class _Aborted(Exception):
    pass


class _FakeContext:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code)


def _raise(exc: Exception) -> Callable[[], None]:
    def run() -> None:
        raise exc

    return run


def test_grpc_calls_are_timed_and_errors_counted_by_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    delta = Delta(
        ("lazysnap_grpc_duration_seconds_count", {"method": "Stat"}),
        ("lazysnap_grpc_errors_total", {"method": "Stat", "code": "NOT_FOUND"}),
        ("lazysnap_grpc_errors_total", {"method": "Stat", "code": "INTERNAL"}),
    )
    ctx: Any = _FakeContext()

    assert _call("Stat", ctx, lambda: "ok") == "ok"
    with pytest.raises(_Aborted):
        _call("Stat", ctx, _raise(NotFound("snapshot 'x' not found")))
    with caplog.at_level("CRITICAL"), pytest.raises(_Aborted):  # logged with traceback
        _call("Stat", ctx, _raise(RuntimeError("bug")))

    assert delta() == [3, 1, 1]


# -- the endpoint ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), (":9100", ("0.0.0.0", 9100)),
     ("[::1]:9100", ("::1", 9100)), ("localhost:0", ("localhost", 0))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text", ["9100", "host:", "host:port", "::1:9100", "[nope]:1", "h:70000"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="metrics_address"):
        metrics.parse_address(text)


def test_endpoint_serves_the_registry_and_closes() -> None:
    server = metrics.serve("127.0.0.1:0")
    try:
        r = httpx.get(server.url, timeout=10)
        assert r.status_code == 200
        assert "lazysnap_build_info" in r.text
        assert "process_resident_memory_bytes" in r.text
    finally:
        server.close()
        server.close()  # idempotent
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url, timeout=2)


def test_endpoint_on_a_busy_port_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AlreadyExists, match=f"127.0.0.1:{port}"):
            metrics.serve(f"127.0.0.1:{port}")


def test_layers_are_reported_by_purpose_at_scrape_time() -> None:
    rows = [
        {"layer_digest": "sha256:aa", "bytes_on_demand": 5, "bytes_prefetch": 7,
         "bytes_background": 11, "demand_waits": 2, "demand_fetches": 1},
        {"layer_digest": "sha256:bb", "mode": "path"},  # not lazy: nothing to report
    ]
    metrics.watch_layers(lambda: rows)
    try:
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in metrics.REGISTRY.collect() for s in family.samples
               if s.name.startswith("lazysnap_layer_")}
    finally:
        metrics.watch_layers(None)
    fetched = "lazysnap_layer_fetched_bytes_total"
    layer = ("layer", "sha256:aa")
    assert got == {
        (fetched, (layer, ("purpose", "demand"))): 5,
        (fetched, (layer, ("purpose", "prefetch"))): 7,
        (fetched, (layer, ("purpose", "background"))): 11,
        ("lazysnap_layer_demand_waits_total", (layer,)): 2,
        ("lazysnap_layer_demand_fetches_total", (layer,)): 1,
    }
    assert not any(s.name.startswith("lazysnap_layer_") for family in metrics.REGISTRY.collect()
                   for s in family.samples)
