"""Warming attached layers: prefetch on attach (landmark, label, config size), a bounded
wait for it, background completion that yields to readers, per-host request bounds."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing
from remote_fakes import layout, pieces

from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.remote.blob import FETCH_PURPOSE, RemoteBlob
from snapshotter.remote.prefetch import missing_chunks
from snapshotter.remote.warm import HostPool, Warmer, WarmPolicy


def _toc(chunks: list[Chunk], size: int, **kw: object) -> Toc:
    entries = [Entry("", "dir", mode=0o755)]
    entries += [Entry(f"f{i}", "reg", size=c.size, chunks=(c,)) for i, c in enumerate(chunks)]
    return Toc(entries=tuple(entries), toc_offset=size, blob_size=size + 100, **kw)  # type: ignore[arg-type]


@pytest.fixture
def six():
    data, chunks = layout([[p] for p in pieces(6)])
    return data, chunks


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        await trio.sleep(0.01)


NO_BACKGROUND = WarmPolicy(background=False)


async def test_landmark_prefetch_fetches_exactly_up_to_it_in_one_request(
    six, cache, fake_source
) -> None:
    data, chunks = six
    toc = _toc(chunks, len(data), prefetch_landmark=chunks[3].offset)
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data), name="layer A")
    async with trio.open_nursery() as nursery:
        warmer = Warmer(NO_BACKGROUND)
        await nursery.start(warmer.run)
        warmer.attach("A", blob, toc)
        assert await warmer.wait_ready("A")
        assert source.calls == [(chunks[0].offset, chunks[2].end)]
        st = warmer.status("A")
        assert st["prefetch"] == "landmark done" and st["prefetch_chunks"] == 3
        assert st["bytes_prefetch"] == chunks[2].end - chunks[0].offset
        assert st["bytes_on_demand"] == st["bytes_background"] == st["demand_waits"] == 0
        assert blob.demand is warmer.gauge
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("label", "config", "expect"), [(None, 0, 0), (None, 2, 2), (4, 2, 4)])
async def test_label_size_wins_over_the_config_size(
    six, cache, fake_source, label, config, expect
) -> None:
    data, chunks = six
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    warmer = Warmer(WarmPolicy(background=False, prefetch_size=chunks[config].offset + 1
                               if config else 0))
    warmer.attach("A", blob, _toc(chunks, len(data)),
                  prefetch_size=chunks[label].offset + 1 if label else None)
    assert await warmer.wait_ready("A")
    assert len(missing_chunks(blob, _toc(chunks, len(data)))) == 6 - (expect + 1 if expect else 0)
    warmer.detach("A")


async def test_the_wait_for_a_prefetch_is_bounded(six, cache, fake_source) -> None:
    data, chunks = six
    source = fake_source(data, ["hang"])
    blob = RemoteBlob(source, cache, blob_size=len(data), fetch_timeout=60)
    warmer = Warmer(WarmPolicy(background=False, prefetch_wait=0.2))
    warmer.attach("A", blob, _toc(chunks, len(data), prefetch_landmark=chunks[5].offset))
    began = time.monotonic()
    assert not await warmer.wait_ready("A")
    assert 0.15 < time.monotonic() - began < 5
    warmer.detach("A")  # cancels the hanging prefetch
    assert await warmer.wait_ready("A")  # unknown keys are ready


async def test_layers_prefetch_in_parallel(six, cache, fake_source) -> None:
    data, _ = six
    gate = trio.Event()
    sources = [fake_source(data) for _ in range(3)]
    warmer = Warmer(NO_BACKGROUND)
    for i, source in enumerate(sources):
        source.gate = gate
        # Distinct content per layer so the shared cache does not join them.
        d, c = layout([[p] for p in pieces(3, tag=f"L{i}-")])
        source.blob = d
        blob = RemoteBlob(source, cache, blob_size=len(d))
        warmer.attach(str(i), blob, _toc(c, len(d), prefetch_landmark=c[2].offset))
    await _until(lambda: all(s.calls for s in sources))  # all three asked before any answer
    gate.set()
    for i in range(3):
        assert await warmer.wait_ready(str(i))
        warmer.detach(str(i))


async def test_background_completes_a_layer_after_the_quiet_period(six, cache, fake_source) -> None:
    data, chunks = six
    toc = _toc(chunks, len(data), prefetch_landmark=chunks[1].offset)
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    warmer = Warmer(WarmPolicy(background_quiet=0.05))
    warmer.attach("A", blob, toc)
    await _until(lambda: warmer.status("A")["background"] == "complete")
    assert missing_chunks(blob, toc) == []
    st = warmer.status("A")
    assert st["bytes_prefetch"] + st["bytes_background"] == chunks[5].end - chunks[0].offset
    warmer.detach("A")


async def test_background_yields_while_a_reader_waits(six, cache, fake_source) -> None:
    data, chunks = six
    toc = _toc(chunks, len(data), no_prefetch=True)
    source = fake_source(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    warmer = Warmer(WarmPolicy(background_quiet=0.05, background_batch=1))
    warmer.gauge.enter()  # a reader is waiting on the network
    warmer.attach("A", blob, toc)
    await trio.sleep(0.3)
    assert source.calls == [] and warmer.status("A")["background"] == "running"
    warmer.gauge.leave()
    await _until(lambda: warmer.status("A")["background"] == "complete")
    assert len(source.calls) == 6  # one small request per chunk (batch_bytes=1)
    warmer.detach("A")


async def test_background_is_off_when_configured(six, cache, fake_source) -> None:
    data, chunks = six
    source = fake_source(data)
    warmer = Warmer(WarmPolicy(background=False, background_quiet=0))
    warmer.attach("A", RemoteBlob(source, cache, blob_size=len(data)), _toc(chunks, len(data)))
    await trio.sleep(0.2)
    assert source.calls == [] and warmer.status("A")["background"] == "off"
    warmer.detach("A")


async def test_prefetch_off_fetches_nothing(six, cache, fake_source) -> None:
    data, chunks = six
    source = fake_source(data)
    warmer = Warmer(WarmPolicy(prefetch=False, background=False))
    blob = RemoteBlob(source, cache, blob_size=len(data))
    warmer.attach("A", blob, _toc(chunks, len(data), prefetch_landmark=chunks[3].offset))
    assert await warmer.wait_ready("A")
    assert source.calls == [] and warmer.status("A")["prefetch"] == "off: nothing"
    warmer.detach("A")


@pytest.mark.allow_log_errors
async def test_a_landmark_beyond_the_data_is_rejected(six, cache, fake_source, caplog) -> None:
    data, chunks = six
    source = fake_source(data)
    warmer = Warmer(NO_BACKGROUND)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    warmer.attach("A", blob, _toc(chunks, len(data), prefetch_landmark=len(data) + 50))
    assert await warmer.wait_ready("A")
    assert source.calls == [] and warmer.status("A")["prefetch"] == "landmark rejected: nothing"
    assert "beyond the layer's data" in caplog.text
    warmer.detach("A")


async def test_host_pool_bounds_requests_per_host() -> None:
    pool = HostPool(2)
    inflight = peak = 0
    gate = trio.Event()

    async def fetch(start: int, end: int) -> bytes:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await gate.wait()
        inflight -= 1
        return b""

    a, b = pool.limited("a", fetch), pool.limited("b", fetch)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(a, 0, 0)
        nursery.start_soon(b, 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert peak == inflight == 3  # two to "a", one to "b"
        gate.set()


async def test_host_pool_lets_toc_fetches_go_before_prefetch_requests() -> None:
    """While a TOC fetch is in flight to a host, prefetch and background requests wait to
    start (a Prepare waits on the TOC); demand reads and other hosts do not."""
    pool = HostPool(8)
    started: list[str] = []
    toc_done = trio.Event()

    async def fetch(start: int, end: int) -> bytes:
        started.append(FETCH_PURPOSE.get())
        if FETCH_PURPOSE.get() == "toc":
            await toc_done.wait()
        return b""

    a, b = pool.limited("a", fetch), pool.limited("b", fetch)

    async def as_(purpose: str, fetch_range) -> None:  # type: ignore[no-untyped-def]
        FETCH_PURPOSE.set(purpose)  # type: ignore[arg-type]  # this task's own context
        await fetch_range(0, 1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(as_, "toc", a)
        await trio.testing.wait_all_tasks_blocked()
        for purpose in ("prefetch", "background", "demand"):
            nursery.start_soon(as_, purpose, a)
        nursery.start_soon(as_, "prefetch", b)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(started) == ["demand", "prefetch", "toc"]  # b's prefetch; a's demand
        toc_done.set()
    assert sorted(started) == ["background", "demand", "prefetch", "prefetch", "toc"]
