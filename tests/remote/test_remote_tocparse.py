"""TocParser: TOCs parsed in a real worker process give what an in-daemon parse gives,
errors included, and a worker that is busy, killed or cancelled costs nothing but time."""

from __future__ import annotations

import gzip
import io
import os
import signal
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from remote_fakes import estargz_parts

from snapshotter.digest import Digest
from snapshotter.errors import DataLoss
from snapshotter.format.estargz import InvalidTOC, parse_toc_member
from snapshotter.fs.tree import ROOT, LayerTree
from snapshotter.remote.tocparse import TocParser
from snapshotter.remote.tocstore import TocStore


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, int, bytes, Digest]:
    """(blob, toc_offset, toc member, toc digest) of a small eStargz layer."""
    return estargz_parts()


@pytest.fixture
async def parser() -> AsyncIterator[TocParser]:
    p = TocParser()
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        yield p
        nursery.cancel_scope.cancel()
    assert p._proc is None  # killed with its nursery


async def _add(parser: TocParser, store: TocStore, layer, member=None, digest=None, build=None):  # type: ignore[no-untyped-def]
    blob, toc_offset, good, toc_digest = layer
    return await parser.add(store, digest or toc_digest, good if member is None else member,
                            toc_offset, blob_size=len(blob), max_size=1 << 20,
                            max_entries=1000, build=build)  # fmt: skip


def _reference(layer):  # type: ignore[no-untyped-def]
    """The reference: the member parsed right here."""
    blob, toc_offset, member, toc_digest = layer
    return parse_toc_member(member, toc_digest=toc_digest, blob_size=len(blob),
                            toc_offset=toc_offset, max_size=1 << 20, max_entries=1000)


async def test_worker_parse_equals_the_in_daemon_parse_and_is_kept(
    parser: TocParser, layer, tmp_path: Path
) -> None:
    blob, toc_offset, _, toc_digest = layer
    store = TocStore(tmp_path / "store")
    toc = await _add(parser, store, layer)
    assert parser._proc is not None
    assert parser.status() == {"worker_pid": parser._proc.pid, "parsed_in_worker": 1,
                               "parsed_in_daemon": 0}  # fmt: skip
    expected = _reference(layer)
    assert list(toc.entries) == list(expected.entries)
    assert (toc.toc_offset, toc.blob_size) == (toc_offset, len(blob))
    assert [c for c in toc.chunks()] == [c for c in expected.chunks()]
    # The member is kept as the in-daemon parse keeps it; no staged or result file left.
    assert [p.name for p in store.dir.iterdir()] == [toc_digest.hex]
    loaded = store.load(toc_digest, blob_size=len(blob), max_entries=1000)
    assert loaded is not None and list(loaded.entries) == list(toc.entries)


def _walk(tree: LayerTree, ino: int = ROOT) -> list[tuple[bytes, tuple]]:
    out = []
    for _, name, child, st in tree.listing(ino):
        out.append((name, st))
        if tree.node(child).is_dir:
            out += [(name + b"/" + n, s) for n, s in _walk(tree, child)]
    return out


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "no-worker"])
async def test_the_tree_is_built_where_the_toc_is_parsed(
    layer, tmp_path: Path, worker: bool
) -> None:
    p = TocParser(preload=("snapshotter.fs._treebuild",))  # as the bridge runs it
    async with trio.open_nursery() as nursery:
        if worker:
            await nursery.start(p.run)
        tree = await _add(p, TocStore(tmp_path), layer, build=LayerTree.from_toc)
        nursery.cancel_scope.cancel()
    assert (p.parsed_in_worker, p.parsed_in_daemon) == ((1, 0) if worker else (0, 1))
    assert isinstance(tree, LayerTree)
    expected = LayerTree.from_toc(_reference(layer))
    assert list(tree.toc.entries) == list(expected.toc.entries)
    assert _walk(tree) == _walk(expected) and len(_walk(tree)) > 3
    assert tree.total_size == expected.total_size > 0


@pytest.mark.allow_log_errors
async def test_a_worker_that_cannot_preload_leaves_the_parse_to_the_daemon(
    layer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = TocParser(preload=("snapshotter.no_such_module",))
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        with trio.fail_after(10):
            while p._deaths == 0:
                await trio.sleep(0.02)
        toc = await _add(p, TocStore(tmp_path), layer)
        nursery.cancel_scope.cancel()
    assert (p.parsed_in_worker, p.parsed_in_daemon) == (0, 1)
    assert list(toc.entries) == list(_reference(layer).entries)
    assert "worker exited with 1" in caplog.text


async def test_errors_come_back_from_the_worker_and_nothing_is_kept(
    parser: TocParser, layer, tmp_path: Path
) -> None:
    store = TocStore(tmp_path)
    with pytest.raises(DataLoss, match="toc"):
        await _add(parser, store, layer, digest=Digest.of(b"another toc"))
    doc = b'{"version": 1, "entries": [{"name": "a/../../x", "type": "dir"}]}'
    with pytest.raises(InvalidTOC):
        await _add(parser, store, layer, member=_member(doc), digest=Digest.of(doc))
    assert parser._proc is not None  # the same worker, still serving
    assert list(store.dir.iterdir()) == []
    await _add(parser, store, layer)
    assert parser.parsed_in_worker == 1


async def test_without_a_worker_the_daemon_parses(layer, tmp_path: Path) -> None:
    parser = TocParser()  # never run
    toc = await _add(parser, TocStore(tmp_path), layer)
    assert parser.status() == {"worker_pid": None, "parsed_in_worker": 0, "parsed_in_daemon": 1}
    assert list(toc.entries) == list(_reference(layer).entries)


async def test_a_second_parse_while_the_worker_is_busy_waits_its_turn(
    parser: TocParser, layer, tmp_path: Path
) -> None:
    results = []
    async with trio.open_nursery() as nursery:
        for i in range(2):
            nursery.start_soon(
                lambda i=i: _collect(results, _add(parser, TocStore(tmp_path / str(i)), layer))
            )
    assert len(results) == 2 and list(results[0].entries) == list(results[1].entries)
    assert parser.parsed_in_worker == 2


async def _collect(results: list, coro) -> None:  # type: ignore[no-untyped-def]
    results.append(await coro)


@pytest.mark.allow_log_errors
async def test_a_killed_worker_is_replaced(
    parser: TocParser, layer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await _add(parser, TocStore(tmp_path), layer)
    first = parser._proc
    assert first is not None
    os.kill(first.pid, signal.SIGTERM)  # ignored: its life is its pipe
    await trio.sleep(0.2)
    assert first.returncode is None
    os.kill(first.pid, signal.SIGUSR1)  # dies on its own: counted, restarted after a delay
    with trio.fail_after(10):
        while parser._proc is None or parser._proc is first:
            await trio.sleep(0.05)
    await _add(parser, TocStore(tmp_path / "again"), layer)
    assert parser.parsed_in_worker == 2
    assert "worker exited with -10" in caplog.text


def _member(doc: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(doc)
        tf.addfile(info, io.BytesIO(doc))
    return gzip.compress(buf.getvalue(), 1)


async def test_a_cancelled_parse_kills_the_worker_and_the_next_parse_works(
    parser: TocParser, layer, tmp_path: Path
) -> None:
    # Large enough that the worker is still parsing when the caller gives up.
    dirs = ",".join(f'{{"name": "d{i}", "type": "dir"}}' for i in range(250_000))
    doc = f'{{"version": 1, "entries": [{dirs}]}}'.encode()
    store = TocStore(tmp_path)
    await _add(parser, store, layer)  # the worker is up
    first = parser._proc
    assert first is not None
    with trio.move_on_after(0.3) as scope:
        await parser.add(store, Digest.of(doc), _member(doc), 100, blob_size=1000,
                         max_size=1 << 24, max_entries=300_000)  # fmt: skip
    assert scope.cancelled_caught
    with trio.fail_after(10):
        while parser._proc is None or parser._proc is first:
            await trio.sleep(0.01)
    assert first.returncode == -signal.SIGKILL
    assert [p.name for p in store.dir.iterdir()] == [layer[3].hex]  # nothing staged left
    await _add(parser, TocStore(tmp_path / "again"), layer)
    assert parser.parsed_in_worker == 2
