"""TocStore: verified TOC members kept on disk across restarts, and what it does with
files it cannot trust."""

from __future__ import annotations

import gzip
import io
import logging
import os
import tarfile
from functools import partial
from pathlib import Path

import pytest
import trio
from remote_fakes import estargz_parts

from snapshotter.digest import Digest
from snapshotter.errors import DataLoss
from snapshotter.format.estargz import InvalidTOC, parse_toc, read_toc_json
from snapshotter.remote.tocparse import TocParser
from snapshotter.remote.tocstore import TocStore


@pytest.fixture(scope="module")
def layer() -> tuple[bytes, int, bytes, Digest]:
    """(blob, toc_offset, toc member, toc digest) of a small eStargz layer."""
    return estargz_parts()


def _add(store: TocStore, layer, member: bytes | None = None, digest: Digest | None = None):  # type: ignore[no-untyped-def]
    """Stage, parse (in a thread: no worker) and keep, as a Prepare does."""
    blob, toc_offset, good, toc_digest = layer
    add = partial(TocParser().add, store, digest or toc_digest,
                  good if member is None else member, toc_offset, blob_size=len(blob),
                  max_size=1 << 20, max_entries=1000)  # fmt: skip
    return trio.run(add)


def _load(store: TocStore, layer):  # type: ignore[no-untyped-def]
    blob, _, _, toc_digest = layer
    return store.load(toc_digest, blob_size=len(blob), max_entries=1000)


def test_added_toc_is_kept_as_the_member_and_loads_after_a_restart(layer, tmp_path) -> None:
    _, toc_offset, member, toc_digest = layer
    toc = _add(TocStore(tmp_path), layer)
    assert toc.toc_offset == toc_offset and "usr/lib/big.bin" in toc.by_name()
    assert [p.name for p in tmp_path.iterdir()] == [toc_digest.hex]  # no temp file left
    assert (tmp_path / toc_digest.hex).read_bytes() == b"%d\n" % toc_offset + member
    again = _load(TocStore(tmp_path), layer)
    assert again is not None and list(again.entries) == list(toc.entries)


def test_json_stored_by_older_versions_still_loads(layer, tmp_path) -> None:
    blob, toc_offset, member, toc_digest = layer
    raw = read_toc_json(member, max_size=1 << 20)
    (tmp_path / toc_digest.hex).write_bytes(b"%d\n" % toc_offset + raw)
    toc = _load(TocStore(tmp_path), layer)
    expected = parse_toc(raw, blob_size=len(blob), toc_offset=toc_offset)
    assert toc is not None and list(toc.entries) == list(expected.entries)


def test_absent_toc_is_none(layer, tmp_path) -> None:
    assert _load(TocStore(tmp_path / "never-made"), layer) is None


def test_wrong_digest_keeps_nothing(layer, tmp_path) -> None:
    with pytest.raises(DataLoss):
        _add(TocStore(tmp_path), layer, digest=Digest.of(b"another toc"))
    assert list(tmp_path.iterdir()) == []


def test_verified_but_hostile_toc_keeps_nothing(tmp_path) -> None:
    doc = b'{"version": 1, "entries": [{"name": "a/../../x", "type": "dir"}]}'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(doc)
        tf.addfile(info, io.BytesIO(doc))
    member = gzip.compress(buf.getvalue())
    add = partial(TocParser().add, TocStore(tmp_path), Digest.of(doc), member, 100,
                  blob_size=1000, max_size=1 << 20, max_entries=10)  # fmt: skip
    with pytest.raises(InvalidTOC):
        trio.run(add)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.allow_log_errors
@pytest.mark.parametrize("damage", ["flip", "cut", "no-offset", "bad-offset", "empty"])
def test_damaged_file_is_removed_and_not_served(
    layer, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    blob, toc_offset, member, toc_digest = layer
    body = bytearray(member)
    body[len(body) // 2] ^= 0x40
    data = {
        "flip": b"%d\n" % toc_offset + bytes(body),
        "cut": b"%d\n" % toc_offset + member[: len(member) // 2],
        "no-offset": member,
        "bad-offset": b"%d\n" % len(blob) + member,
        "empty": b"",
    }[damage]
    path = tmp_path / toc_digest.hex
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, "snapshotter.remote.tocstore"):
        assert _load(TocStore(tmp_path), layer) is None
    assert not path.exists()
    assert "damaged" in caplog.text


def test_old_temp_files_are_swept_fresh_ones_kept(tmp_path) -> None:
    old, fresh = tmp_path / ".tmp-old", tmp_path / ".tmp-fresh"
    old.write_bytes(b"half a member")
    fresh.write_bytes(b"being written")
    os.utime(old, (1, 1))
    TocStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-fresh"]


def test_trim_removes_unused_tocs_oldest_first_and_keeps_used_ones(tmp_path: Path) -> None:
    store = TocStore(tmp_path)
    sizes = {"a" * 64: 100, "b" * 64: 200, "c" * 64: 300, "d" * 64: 400}
    for age, (name, size) in enumerate(sizes.items()):
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + age, 1000 + age))  # a oldest, d newest
    (tmp_path / ".tmp-in-progress").write_bytes(b"y" * 10_000)  # not a stored TOC
    # 1000 bytes stored; bound 500: a is in use (kept), b and c go, d is newest.
    assert store.trim(keep={"a" * 64}, max_bytes=500) == (2, 500)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-in-progress", "a" * 64, "d" * 64]
    # Used TOCs stay even beyond the bound; nothing to do under it.
    assert store.trim(keep={"a" * 64, "d" * 64}, max_bytes=0) == (0, 0)
    assert store.trim(keep=set(), max_bytes=10_000) == (0, 0)
    assert TocStore(tmp_path / "never-made").trim(keep=set(), max_bytes=0) == (0, 0)
