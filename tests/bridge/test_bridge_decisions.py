"""`FuseRemoteLayers` deciding per layer: lazy, or fallback with a counted reason and a
log line naming the layer, or (require_lazy) a refusal that reaches core's caller."""

from __future__ import annotations

import gzip
import json
import logging
from functools import partial

import pytest
import trio

from snapshotter import labels as L
from snapshotter.bridge import LayerFallback
from snapshotter.core.remote import RemoteRequired
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.errors import AlreadyExists, FailedPrecondition
from snapshotter.remote.layer import TAIL_BYTES
from tests.bridge.bridge_bench import (
    FILES,
    IMAGE,
    Bench,
    MakeBench,
    blob_with_toc,
    layer_labels,
    layer_tar,
    push_estargz,
)
from tests.registry.fakeregistry import FakeRegistry


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lazysnap.remote" and "fallback" in r.getMessage()]


# -- decisions ------------------------------------------------------------------------


@pytest.mark.parametrize("cri", [False, True], ids=["ctr-remote-labels", "cri-labels"])
async def test_estargz_layer_is_lazy(bench: Bench, cri: bool) -> None:
    layer = push_estargz(bench.fake)
    handle = await bench.prepare(layer_labels(layer.digest, layer.toc_digest, cri=cri))
    assert handle is not None
    h = json.loads(handle)
    assert (h["mode"], h["digest"], h["size"]) == ("lazy", layer.digest, layer.size)
    assert bench.repo.layer_ids() == [h["dir"]]
    assert bench.bridge.lowerdir(handle) == str(bench.cfg.root / "repo" / h["dir"])
    status = bench.bridge.status()
    assert status["fallback_counts"] == {}
    [row] = status["layers"]
    assert (row["image_ref"], row["layer_digest"], row["mode"]) == (IMAGE, layer.digest, "lazy")
    assert (row["size"], row["snapshots"], row["bytes_fetched"]) == (layer.size, 1, 0)
    # Only the blob's end (footer and TOC member), with one suffix Range request: no
    # HEAD, the size came with it.
    seen = [(s.method, s.headers.get("range")) for s in bench.fake.seen]
    assert seen == [("GET", f"bytes=-{TAIL_BYTES}")]


def _no_ref(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = push_estargz(fake)
    labels = layer_labels(layer.digest, layer.toc_digest)
    del labels[L.STARGZ_REFERENCE]
    return labels, layer.digest


def _no_toc(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = push_estargz(fake)
    return layer_labels(layer.digest), layer.digest


def _plain_gzip(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    digest = fake.add_blob(gzip.compress(layer_tar(FILES)))
    return layer_labels(digest, "sha256:" + "0" * 64), digest


def _unreachable(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = push_estargz(fake)
    fake.script(f"/v2/app/blobs/{layer.digest}", ["connect"] * 10)
    return layer_labels(layer.digest, layer.toc_digest), layer.digest


def _hostile(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    blob, toc = blob_with_toc(
        {"version": 1, "entries": [{"name": "../../etc/shadow", "type": "reg", "size": 0}]}
    )
    digest = fake.add_blob(blob)
    return layer_labels(digest, toc), digest


def _wrong_toc_digest(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = push_estargz(fake)
    return layer_labels(layer.digest, "sha256:" + "1" * 64), layer.digest


def _unauthorized(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = push_estargz(fake)
    fake.auth, fake.users = "basic", {"someone": "else"}
    return layer_labels(layer.digest, layer.toc_digest), layer.digest


def _missing_blob(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    return layer_labels("sha256:" + "2" * 64, "sha256:" + "3" * 64), "sha256:" + "2" * 64


CASES = {
    "no-source-labels": _no_ref,
    "no-toc-digest": _no_toc,
    "not-estargz": _plain_gzip,
    "registry-unavailable": _unreachable,
    "invalid-layer": _hostile,
    "verification-failed": _wrong_toc_digest,
    "unauthorized": _unauthorized,
    "not-found": _missing_blob,
}


@pytest.mark.parametrize("reason", list(CASES))
async def test_fallback_is_counted_and_logged_with_the_layer_digest(
    bench: Bench, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lazysnap.remote")
    labels, digest = CASES[reason](bench.fake)
    assert await bench.prepare(labels) is None
    status = bench.bridge.status()
    assert status["fallback_counts"] == {reason: 1}
    [fb] = status["fallbacks"]
    assert (fb["layer_digest"], fb["reason"]) == (digest, reason)
    assert fb["detail"]
    [line] = _fallback_lines(caplog)
    assert digest in line and reason in line
    assert status["layers"] == [] and bench.repo.layer_ids() == []


async def test_fallbacks_accumulate_per_reason(bench: Bench) -> None:
    for make in (_no_toc, _no_toc, _plain_gzip):
        labels, _ = make(bench.fake)
        assert await bench.prepare(labels) is None
    assert bench.bridge.status()["fallback_counts"] == {"no-toc-digest": 2, "not-estargz": 1}


async def test_concurrent_fallbacks_are_all_counted(bench: Bench) -> None:
    labels = [_no_toc(bench.fake)[0] for _ in range(32)]
    async with trio.open_nursery() as nursery:
        for one in labels:
            nursery.start_soon(bench.prepare, one)
    status = bench.bridge.status()
    assert status["fallback_counts"] == {"no-toc-digest": 32}
    assert len(status["fallbacks"]) == 32


async def test_unverified_layer_only_with_skipverify_and_allow_no_verification(
    make_bench: MakeBench,
) -> None:
    allowing = make_bench(allow_no_verification=True)
    layer = push_estargz(allowing.fake)
    skip = layer_labels(layer.digest) | {L.STARGZ_SKIPVERIFY: "true"}
    assert await allowing.prepare(layer_labels(layer.digest)) is None  # the label is needed too
    assert await allowing.prepare(skip) is not None
    strict = make_bench()
    assert await strict.prepare(skip) is None  # and so is the config switch
    assert strict.bridge.status()["fallback_counts"] == {"no-toc-digest": 1}


async def test_lazy_off_makes_every_layer_ordinary(make_bench: MakeBench) -> None:
    bench = make_bench(lazy=False)
    layer = push_estargz(bench.fake)
    assert await bench.prepare(layer_labels(layer.digest, layer.toc_digest)) is None
    assert bench.fake.seen == []


@pytest.mark.allow_log_errors
@pytest.mark.parametrize("reason", ["no-toc-digest", "registry-unavailable", "invalid-layer"])
async def test_require_lazy_refuses_instead_of_falling_back(
    make_bench: MakeBench, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    bench = make_bench(require_lazy=True)
    labels, digest = CASES[reason](bench.fake)
    with pytest.raises(LayerFallback) as refused:
        await bench.prepare(labels)
    assert isinstance(refused.value, RemoteRequired)
    assert isinstance(refused.value, FailedPrecondition)
    assert digest in str(refused.value)
    assert bench.bridge.status()["fallback_counts"] == {reason: 1}
    assert any(r.levelno == logging.ERROR and digest in r.getMessage() for r in caplog.records)


@pytest.mark.allow_log_errors
async def test_require_lazy_reaches_the_caller_of_core_prepare(make_bench: MakeBench) -> None:
    """Core passes RemoteRequired on (gRPC: FAILED_PRECONDITION) and creates nothing."""
    bench = make_bench(require_lazy=True)
    labels, _ = _no_toc(bench.fake)
    sn = await trio.to_thread.run_sync(partial(Snapshotter, bench.cfg.root, remote=bench.bridge))
    try:
        with pytest.raises(RemoteRequired):
            await trio.to_thread.run_sync(sn.prepare, "extract-1", "", labels)
        assert await trio.to_thread.run_sync(sn.walk) == []
    finally:
        sn.close()


async def test_core_commits_a_lazy_layer_and_answers_already_exists(bench: Bench) -> None:
    layer = push_estargz(bench.fake)
    labels = layer_labels(layer.digest, layer.toc_digest)
    sn = await trio.to_thread.run_sync(partial(Snapshotter, bench.cfg.root, remote=bench.bridge))
    try:
        with pytest.raises(AlreadyExists):
            await trio.to_thread.run_sync(sn.prepare, "extract-1", "", labels)
        info = await trio.to_thread.run_sync(sn.stat, labels[L.SNAPSHOT_REF])
        assert info.labels[L.REMOTE] == L.REMOTE_VALUE
        assert len(bench.repo.layer_ids()) == 1
    finally:
        sn.close()
