"""Prefetch end to end: landmark images made by `ctr-remote image optimize`, background
completion of lazily mounted layers, and `lazysnap prefetch` ahead of a cold start.

Bytes are counted at a `TcpProxy` in front of the registry (every byte the daemon fetches
passes it) and, per layer and purpose, in the daemon's status document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import data_sha256
from tests.e2e.daemon_status import layer_rows, status_after, status_cli
from tests.e2e.estargz import EstargzImage, blob_data_path, convert_and_push, read_toc
from tests.e2e.harness import REPO_ROOT, Registry, free_port
from tests.e2e.images import MEDIA_MANIFEST, data_image, push_image
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import REFERENCE, Stack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

MiB = 1024 * 1024
FILES = {"data/hot.bin": 2 * MiB, "data/cold-0.bin": 6 * MiB, "data/cold-1.bin": 4 * MiB}
WORKLOAD = "cat /data/hot.bin > /dev/null"
QUIET = ["--no-background-fetch"]


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> str:
    push_image(registry.url, "e2e/prefetch", "src", data_image(FILES, seed=21))
    return "src"


@pytest.fixture(scope="module")
def optimized(
    registry: Registry, pushed: str, tmp_path_factory: pytest.TempPathFactory
) -> EstargzImage:
    """FILES converted by `ctr-remote image optimize` with a workload reading hot.bin: the
    files it touched come first in each layer, followed by `.prefetch.landmark`."""
    src = f"{registry.host}/e2e/prefetch:src"
    dst = f"{registry.host}/e2e/prefetch:opt"
    with start_stack(tmp_path_factory.mktemp("opt"), REFERENCE, show_logs=False) as stack:
        stack.ctr("content", "fetch", "--plain-http", src)
        stack.containerd.ctr(
            "images", "optimize", "--oci", "--estargz-compression-level", "1", "--period", "2",
            "--entrypoint", '["/bin/sh", "-c"]', "--args", json.dumps([WORKLOAD]),
            src, dst, tool="ctr-remote",
        )
        stack.push(dst)
    resp = httpx.get(f"{registry.url}/v2/e2e/prefetch/manifests/opt",
                     headers={"Accept": MEDIA_MANIFEST}, timeout=30)
    resp.raise_for_status()
    return EstargzImage("e2e/prefetch", "opt", resp.json())


@pytest.fixture(scope="module")
def plain(
    registry: Registry, pushed: str, tmp_path_factory: pytest.TempPathFactory
) -> EstargzImage:
    """The same files converted without a workload (no landmark)."""
    return convert_and_push(tmp_path_factory.mktemp("conv"), registry, "e2e/prefetch", pushed,
                            "esgz")


@pytest.fixture
def proxy(registry: Registry) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", registry.port)) as p:
        yield p


def _landmark(registry: Registry, layer: dict[str, Any]) -> int | None:
    """Offset of the layer's `.prefetch.landmark` member, None without one."""
    toc = read_toc(blob_data_path(registry, str(layer["digest"])).read_bytes())
    for entry in toc["entries"]:  # type: ignore[union-attr]
        if entry.get("name") == ".prefetch.landmark":
            return int(entry["offset"])
    return None


def _payload_before(registry: Registry, layer: dict[str, Any], end: int) -> tuple[int, int]:
    """[first, last) compressed extent of the chunks that start before `end`."""
    toc = read_toc(blob_data_path(registry, str(layer["digest"])).read_bytes())
    entries = [e for e in toc["entries"] if e.get("type") in ("reg", "chunk")  # type: ignore[union-attr]
                and int(e.get("size", e.get("chunkSize", 0)) or 0) > 0]
    starts = sorted(int(e["offset"]) for e in entries if int(e["offset"]) < end)
    return (starts[0], end) if starts else (0, 0)


def _status(stack: Stack, since: float) -> dict[str, Any]:
    assert stack.lazysnap is not None
    return status_after(stack.lazysnap.root, since)


def _wait_rows(stack: Stack, digests: list[str], done, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        rows = layer_rows(_status(stack, time.time()), digests)
        if len(rows) == len(digests) and all(done(r) for r in rows.values()):
            return rows
        assert time.monotonic() < deadline, f"layers never got there: {rows}"


def test_landmark_layers_prefetch_exactly_up_to_the_landmark(
    registry: Registry, optimized: EstargzImage, tmp_path: Path, proxy: TcpProxy
) -> None:
    digests = [str(layer["digest"]) for layer in optimized.layers]
    marks = {str(layer["digest"]): _landmark(registry, layer) for layer in optimized.layers}
    assert any(m is not None for m in marks.values()), "optimize made no landmark"
    port = free_port()
    args = [*QUIET, "--metrics-address", f"127.0.0.1:{port}"]
    with start_stack(tmp_path, lazysnap_args=args) as stack:
        ref = optimized.ref(proxy.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        rows = _wait_rows(stack, digests, lambda r: r.get("prefetch", "").endswith(
            ("done", "nothing")))
        for layer in optimized.layers:
            row = rows[str(layer["digest"])]
            mark = marks[str(layer["digest"])]
            if mark is None:  # `.no.prefetch.landmark`: nothing was read from this layer
                assert row["prefetch"] == "no-prefetch landmark: nothing"
                assert row["bytes_prefetch"] == 0
                continue
            first, end = _payload_before(registry, layer, mark)
            assert row["prefetch"] == "landmark done"
            assert row["bytes_prefetch"] == end - first, (row, first, end)
        before = proxy.counts().down
        out = stack.run(ref, "pf-hot", "sha256sum", "/data/hot.bin")
        assert out.split()[0] == data_sha256("data/hot.bin", FILES, seed=21)
        # What the workload read was prefetched: reading it again fetches (almost) nothing.
        assert proxy.counts().down - before < 64 * 1024
        assert stack.lazysnap is not None
        shown = status_cli(stack.lazysnap.root)
        assert shown.returncode == 0 and "    prefetch: landmark done (" in shown.stdout
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        prefetched = {
            s.labels["layer"]: s.value
            for family in text_string_to_metric_families(scraped) for s in family.samples
            if s.name == "lazysnap_layer_fetched_bytes_total" and s.labels["purpose"] == "prefetch"
        }
        assert prefetched == {d: float(rows[d]["bytes_prefetch"]) for d in digests}


def test_background_fetch_completes_layers_and_serves_offline(
    plain: EstargzImage, tmp_path: Path, proxy: TcpProxy
) -> None:
    digests = [str(layer["digest"]) for layer in plain.layers]
    args = ["--background-quiet", "0.5", "--background-rate", "0"]
    with start_stack(tmp_path, lazysnap_args=args) as stack:
        ref = plain.ref(proxy.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        rows = _wait_rows(stack, digests, lambda r: r.get("background") == "complete")
        assert sum(r["bytes_background"] for r in rows.values()) > sum(FILES.values()) * 0.9
        proxy.set_mode("blackhole")  # everything must come from the cache now
        out = stack.run(ref, "pf-offline", "sha256sum", "/data/cold-0.bin", "/data/cold-1.bin")
        assert data_sha256("data/cold-0.bin", FILES, seed=21) in out
        assert data_sha256("data/cold-1.bin", FILES, seed=21) in out
        proxy.set_mode("forward")


def test_on_demand_reads_go_ahead_of_a_running_background_fetch(
    plain: EstargzImage, tmp_path: Path, proxy: TcpProxy
) -> None:
    # A slow background fetch (1 MiB/s for 12 MiB) is still running when the container
    # reads a file it has not reached: the read must not queue behind it.
    digests = [str(layer["digest"]) for layer in plain.layers]
    args = ["--background-quiet", "0.2", "--background-rate", "1MiB",
            "--background-concurrency", "1"]
    with start_stack(tmp_path, lazysnap_args=args) as stack:
        ref = plain.ref(proxy.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        data_layer = [str(plain.layers[-1]["digest"])]  # 12 MiB: 12 s of background work
        _wait_rows(stack, data_layer, lambda r: r.get("background") == "running")
        started = time.monotonic()
        out = stack.run(ref, "pf-reader", "sha256sum", "/data/cold-1.bin")
        took = time.monotonic() - started
        assert data_sha256("data/cold-1.bin", FILES, seed=21) in out
        rows = layer_rows(_status(stack, time.time()), digests)
        print(f"on-demand read of 4 MiB took {took:.1f}s during background fetch: {rows}")
        assert took < 8  # at the background's 1 MiB/s alone it would take longer
        assert rows[data_layer[0]]["bytes_on_demand"] > 0
        assert rows[data_layer[0]]["background"] != "complete"


def _prefetch_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    assert stack.lazysnap is not None
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", "prefetch", "--root", str(stack.lazysnap.root),
         "--config", str(stack.lazysnap.workdir / "none.toml"), *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_prefetch_command_then_cold_start_fetches_nothing(
    plain: EstargzImage, tmp_path: Path, proxy: TcpProxy
) -> None:
    with start_stack(tmp_path, lazysnap_args=QUIET) as stack:
        assert stack.lazysnap is not None
        (stack.lazysnap.workdir / "none.toml").write_text(
            f'hosts_dir = "{stack.lazysnap.workdir / "certs.d"}"\n')
        ref = plain.ref(proxy.host)
        done = _prefetch_cli(stack, "--all", ref)
        assert done.returncode == 0, done.stderr
        assert "prefetched 2 layers of 1 images" in done.stdout, done.stdout
        again = _prefetch_cli(stack, "--all", ref)
        assert again.returncode == 0 and " 0B fetched" in again.stdout, again.stdout

        stack.pull(ref, tool="ctr-remote", verb="rpull")
        before = proxy.counts().down
        out = stack.run(ref, "pf-cold", "sha256sum", *(f"/{p}" for p in FILES))
        for path in FILES:
            assert data_sha256(path, FILES, seed=21) in out
        assert proxy.counts().down - before == 0
