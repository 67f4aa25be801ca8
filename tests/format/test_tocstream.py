"""The TOC read as a stream: JSON in pieces, the member inflated piecewise from bytes or a
file, and `parse_toc_member`'s verify-then-parse, with the memory it costs."""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
import tracemalloc
import zlib
from typing import Any

import pytest

from snapshotter.digest import Digest
from snapshotter.errors import DataLoss
from snapshotter.format.estargz import (
    TOC_NAME,
    InvalidTOC,
    parse_toc,
    parse_toc_member,
    read_toc_json,
    toc_json_pieces,
)

BLOB, TOC_AT = 1 << 40, 1 << 39


def _doc(n: int) -> bytes:
    entries: list[dict[str, Any]] = [{"name": "d\u00e9j\u00e0/", "type": "dir", "mode": 0o40755}]
    for i in range(n):
        digest = f"sha256:{i:064x}"
        entries.append({"name": f"d\u00e9j\u00e0/\u65e5{i}.py", "type": "reg", "size": 10 + i,
                        "offset": 1000 * (i + 1), "digest": digest, "chunkDigest": digest,
                        "modtime": "2024-01-01T00:00:00Z"})  # fmt: skip
    return json.dumps({"version": 1, "entries": entries}, ensure_ascii=False).encode()


def _tar(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _gzip(data: bytes, cuts: tuple[int, ...] = ()) -> bytes:
    """`data` as gzip, one member per stretch between `cuts` (writers may split it)."""
    bounds = [0, *cuts, len(data)]
    out = b""
    for a, b in itertools.pairwise(bounds):
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        out += c.compress(data[a:b]) + c.flush()
    return out


def _member(payload: bytes, cuts: tuple[int, ...] = ()) -> bytes:
    return _gzip(_tar(payload), cuts)


def _entries(toc: Any) -> list[Any]:
    return list(toc.entries)


# --- JSON in pieces -------------------------------------------------------------------------


def test_json_in_pieces_of_any_size_parses_as_the_whole() -> None:
    doc = _doc(50)
    whole = _entries(parse_toc(doc, blob_size=BLOB, toc_offset=TOC_AT))
    rnd = random.Random(7)
    for _ in range(20):  # pieces cut anywhere, inside multi-byte UTF-8 too; some empty
        pieces, at = [], 0
        while at < len(doc):
            step = rnd.choice([0, 1, 2, 3, 7, 100, 5000])
            pieces.append(doc[at : at + step])
            at += step
        toc = parse_toc(iter(pieces), blob_size=BLOB, toc_offset=TOC_AT)
        assert _entries(toc) == whole


def test_json_pieces_ending_inside_a_character_are_invalid() -> None:
    doc = _doc(3)
    cut = doc.index("\u65e5".encode()) + 1
    with pytest.raises(InvalidTOC, match="not JSON"):  # cut short, there
        parse_toc(iter([doc[:cut]]), blob_size=BLOB, toc_offset=TOC_AT)


# --- the member, inflated piecewise ---------------------------------------------------------


@pytest.mark.parametrize("step", [1, 3, 64 * 1024])
def test_member_pieces_from_bytes_and_from_a_file_are_the_json(
    step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = _doc(3000)
    tar = _tar(doc)
    # Members split at odd points, one inside the tar header; blocks of 1 byte put a
    # member's gzip magic across two blocks.
    member = _gzip(tar, (100, 513, len(tar) // 2, len(tar) - 3))
    monkeypatch.setattr("snapshotter.format.estargz._IN_STEP", step)
    pieces = list(toc_json_pieces(member, max_size=len(doc)))
    assert b"".join(pieces) == doc
    assert max(len(p) for p in pieces) <= 64 * 1024
    f = io.BytesIO(b"header line\n" + member)
    f.readline()
    assert b"".join(toc_json_pieces(f, max_size=len(doc))) == doc
    assert read_toc_json(member, max_size=len(doc)) == doc


def test_member_cut_short_or_with_junk_after_a_member_is_data_loss() -> None:
    member = _member(_doc(200))
    with pytest.raises(DataLoss, match="truncated"):
        list(toc_json_pieces(member[:-100], max_size=1 << 20))
    junk = _gzip(_tar(_doc(200))[:1000]) + b"junk"
    with pytest.raises(DataLoss, match="no gzip member"):
        list(toc_json_pieces(junk, max_size=1 << 20))


# --- verify, then parse ---------------------------------------------------------------------


def _parse_member(member: Any, digest: Digest | None, **kw: Any) -> Any:
    kw.setdefault("max_size", 1 << 24)
    return parse_toc_member(member, toc_digest=digest, blob_size=BLOB, toc_offset=TOC_AT,
                            max_entries=1 << 20, **kw)  # fmt: skip


def test_parse_toc_member_gives_the_toc_of_its_json_from_bytes_or_a_file() -> None:
    doc = _doc(500)
    member = _member(doc)
    whole = _entries(parse_toc(doc, blob_size=BLOB, toc_offset=TOC_AT))
    assert _entries(_parse_member(member, Digest.of(doc))) == whole
    assert _entries(_parse_member(member, None)) == whole  # unverified: one pass
    f = io.BytesIO(b"12\n" + member)
    f.readline()
    assert _entries(_parse_member(f, Digest.of(doc))) == whole


def test_a_wrong_digest_is_data_loss_whatever_the_parse_says() -> None:
    hostile = b'{"version": 1, "entries": [{"name": "../../etc/passwd", "type": "reg"}]}'
    # With the wrong digest this is DataLoss, not the InvalidTOC the parse raised first.
    with pytest.raises(DataLoss, match="my layer: toc: digest mismatch"):
        _parse_member(_member(hostile), Digest.of(b"another toc"), what="my layer: toc")
    with pytest.raises(InvalidTOC, match=r"'\.\.'"):  # verified, and still refused
        _parse_member(_member(hostile), Digest.of(hostile))
    doc = _doc(50)  # a TOC that parses, but is not the one the layer names
    with pytest.raises(DataLoss, match="digest mismatch"):
        _parse_member(_member(doc), Digest.of(_doc(51)))


def test_over_the_size_limit_is_refused_before_inflating() -> None:
    doc = _doc(100)
    with pytest.raises(InvalidTOC, match="over the limit"):
        _parse_member(_member(doc), Digest.of(doc), max_size=len(doc) - 1)


def test_parsing_holds_the_json_once() -> None:
    """A TOC of 24 MiB (mostly blanks, so that the model stays small) is verified and
    parsed holding its JSON once, beside the Toc: the gathered pieces are handed to the
    decoder, not copied, and the decoded entries are small beside the text."""
    entries = b", ".join(
        json.dumps({"name": f"f{i}", "type": "reg", "size": 1, "offset": 10 * i + 10,
                    "chunkDigest": f"sha256:{i:064x}"}).encode() + b" " * 12_600
        for i in range(2000)
    )  # fmt: skip
    doc = b'{"version": 1, "entries": [' + entries + b"]}"
    assert len(doc) > 24 << 20
    member = _member(doc)
    digest = Digest.of(doc)
    tracemalloc.start()
    try:
        toc = _parse_member(member, digest, max_size=len(doc))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(toc) == 2001
    beyond = peak - kept - len(doc)
    assert beyond < 4 << 20, f"{beyond >> 10} KiB beyond the Toc and one copy of the JSON"
