"""The daemon's Prometheus endpoint, scraped while containerd drives it: the series move.

`lazysnap serve --metrics-address 127.0.0.1:<port>`; a lazy pull and a container reading a
file must show up as gRPC calls, FUSE reads, on-demand fetched bytes and cache bytes; a
plain (non-eStargz) image as a fallback.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import PushedImage, daemon_log_problems, data_sha256
from tests.e2e.estargz import EstargzImage
from tests.e2e.harness import Registry, free_port
from tests.e2e.stack import start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(url, timeout=10)
    r.raise_for_status()
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_endpoint_follows_pulls_reads_and_fallbacks(
    tmp_path: Path,
    registry: Registry,
    esgz_data: tuple[EstargzImage, EstargzImage],
    sample: PushedImage,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with start_stack(tmp_path, lazysnap_args=["--metrics-address", f"127.0.0.1:{port}"]) as stack:
        before = scrape(url)
        assert total(before, "lazysnap_build_info") == 1
        assert value(before, "lazysnap_cache_bytes") == 0

        ref = esgz_data[0].ref(registry.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        out = stack.run(ref, "metrics-read", "sha256sum", "/data/big-2.bin")
        assert out.split()[0] == data_sha256("data/big-2.bin")
        stack.pull(sample.ref, tool="ctr-remote", verb="rpull")  # not eStargz: falls back
        after = scrape(url)

        def grew(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert grew("lazysnap_grpc_duration_seconds_count", method="Prepare") >= 2
        assert grew("lazysnap_grpc_errors_total", method="Prepare", code="ALREADY_EXISTS") >= 1
        assert grew("lazysnap_fuse_operation_duration_seconds_count", operation="read") >= 1
        assert grew("lazysnap_fuse_operation_duration_seconds_count", operation="lookup") >= 1
        # 5 MiB of incompressible data was read on demand through the FUSE mount.
        assert grew("lazysnap_fetch_bytes_sum", purpose="demand") > 5 << 20
        assert grew("lazysnap_fetch_duration_seconds_count", purpose="demand") >= 1
        assert value(after, "lazysnap_cache_bytes") >= 5 << 20
        assert value(after, "lazysnap_cache_misses_total") >= 1
        fallbacks = "lazysnap_fallbacks_total"
        assert total(after, fallbacks) - total(before, fallbacks) >= 1
        assert value(after, "process_resident_memory_bytes") > 0

    assert stack.lazysnap is not None
    assert not daemon_log_problems(stack.lazysnap.log_path)
    with pytest.raises(httpx.TransportError):  # the endpoint went with the daemon
        httpx.get(url, timeout=2)
