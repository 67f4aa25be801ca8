"""build_estargz -> footer -> TOC -> chunks gives back the original tar, byte for byte."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from estargz_layers import CHUNK, Item, make_tar, read_layer, rich_items

from snapshotter.format.build import BuildResult, InvalidLayerTar, build_estargz
from snapshotter.format.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME


def _build(tar: bytes, **kw: object) -> tuple[bytes, BuildResult]:
    out = io.BytesIO()
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("compression_level", 1)
    result = build_estargz(io.BytesIO(tar), out, **kw)  # type: ignore[arg-type]
    return out.getvalue(), result


def test_round_trip_every_type() -> None:
    items = rich_items()
    blob, result = _build(make_tar(items))
    toc, files = read_layer(blob)
    by_name = toc.by_name()
    for it in items:
        e = by_name[it.name]
        kind = {
            tarfile.REGTYPE: "reg",
            tarfile.DIRTYPE: "dir",
            tarfile.LNKTYPE: "hardlink",
            tarfile.SYMTYPE: "symlink",
            tarfile.CHRTYPE: "char",
            tarfile.BLKTYPE: "block",
            tarfile.FIFOTYPE: "fifo",
        }[it.type]
        assert (e.type, e.mode, e.uid, e.gid) == (kind, it.mode, it.uid, it.gid), it.name
        assert e.mtime_ns == it.mtime * 1_000_000_000
        assert e.link_name == it.linkname
        assert (e.dev_major, e.dev_minor) == (it.dev if kind in ("char", "block") else (0, 0))
        assert dict(e.xattrs) == it.xattrs
        if kind == "reg":
            assert files[it.name] == it.data
            assert e.size == len(it.data)
            assert e.digest == ("sha256:" + hashlib.sha256(it.data).hexdigest() if it.data else "")
    # implicit parents were synthesised, parents come first, the root leads
    assert toc.entries[0].name == ""
    assert by_name["deep/a"].type == "dir" and by_name["deep/a"].mode == 0o755
    seen: set[str] = set()
    for e in toc.entries:
        assert e.name == "" or e.name.rpartition("/")[0] in seen
        seen.add(e.name)
    assert toc.prefetch_landmark is None and not toc.no_prefetch
    assert result.toc_offset == toc.toc_offset


def test_chunking_and_members() -> None:
    blob, _ = _build(make_tar(rich_items()))
    toc, _ = read_layer(blob)
    by_name = toc.by_name()
    big, exact = by_name["big.bin"], by_name["exact.bin"]
    assert [c.size for c in big.chunks] == [CHUNK, CHUNK, CHUNK // 2]
    assert [c.chunk_offset for c in exact.chunks] == [0, CHUNK]
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        toc_json = json.load(tf.extractfile(TOC_NAME))  # type: ignore[arg-type]
    sizes = {
        e["name"]: e.get("chunkSize", 0)
        for e in toc_json["entries"]
        if e["name"] in ("big.bin", "exact.bin", "etc/hosts") and e.get("chunkOffset", 0) == 0
    }
    last = [e.get("chunkSize", 0) for e in toc_json["entries"] if e["type"] == "chunk"]
    # spec: every chunk but a file's last says its size; the last (or only) one says 0
    assert sizes == {"big.bin": CHUNK, "exact.bin": CHUNK, "etc/hosts": 0}
    assert last == [CHUNK, 0, 0]
    assert not by_name["empty"].chunks and not by_name[".wh.gone"].chunks
    chunks = sorted((c for e in toc.entries for c in e.chunks), key=lambda c: c.offset)
    for c, nxt in zip(chunks, [*chunks[1:], None], strict=True):
        assert blob[c.offset : c.offset + 2] == b"\x1f\x8b"  # each payload opens a member
        assert c.inner_offset == 0
        assert c.end == (nxt.offset if nxt else toc.toc_offset)


def test_output_is_an_ordinary_tar_gz_and_digests_are_right() -> None:
    items = rich_items()
    tar = make_tar(items)
    blob, result = _build(tar)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [it.name for it in items] + [TOC_NAME]
        for it, m in zip(items, members, strict=False):
            if m.isreg():
                assert tf.extractfile(m).read() == it.data  # type: ignore[union-attr]
            assert {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY")} == {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                for k, v in it.xattrs.items()
            }
        toc_json = tf.extractfile(members[-1]).read()  # type: ignore[union-attr]
    raw = gzip.decompress(blob)
    assert raw.endswith(bytes(1024))
    assert result.diff_id.hex == hashlib.sha256(raw).hexdigest()
    assert result.uncompressed_size == len(raw)
    assert result.blob_digest.hex == hashlib.sha256(blob).hexdigest()
    assert result.size == len(blob)
    assert result.toc_digest.hex == hashlib.sha256(toc_json).hexdigest()


def test_deterministic() -> None:
    tar = make_tar(rich_items())
    assert _build(tar)[0] == _build(tar)[0]


def test_prioritized_files_come_first_then_landmark() -> None:
    items = rich_items()
    blob, _ = _build(make_tar(items), prioritized=["deep/a/b/file", "./etc/hosts.link", "nope"])
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        names = tf.getnames()
        landmark = tf.extractfile(PREFETCH_LANDMARK).read()  # type: ignore[union-attr]
    assert names[:5] == [
        "deep/a/b/file",  # its parents are implicit in this tar: nothing to move
        "etc",  # a parent that is in the tar moves first
        "etc/hosts",  # the hardlink's target moves with it
        "etc/hosts.link",
        PREFETCH_LANDMARK,
    ]
    assert landmark == b"\x0f"
    assert len(names) == len(items) + 2  # + landmark + TOC, nothing lost or doubled
    toc, files = read_layer(blob)
    assert PREFETCH_LANDMARK not in toc.by_name()
    assert toc.prefetch_landmark is not None
    first = toc.by_name()["deep/a/b/file"].chunks[0]
    assert first.end <= toc.prefetch_landmark
    assert files["big.bin"] == items[3].data


@pytest.mark.parametrize("prioritized", [[], ["missing/file"]])
def test_no_prefetch_landmark(prioritized: list[str]) -> None:
    blob, _ = _build(make_tar(rich_items()), prioritized=prioritized)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        assert tf.getnames()[0] == NO_PREFETCH_LANDMARK
    toc, _ = read_layer(blob)
    assert toc.no_prefetch and toc.prefetch_landmark is None
    assert NO_PREFETCH_LANDMARK not in toc.by_name()


class _OneWay(io.RawIOBase):
    """A pipe-like source: read() only, no seek."""

    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray) -> int:  # type: ignore[override]
        n = self._b.readinto(buf)
        return n


@pytest.mark.parametrize("prioritized", [None, ["etc/hosts"]])
def test_gzip_input_from_a_pipe(prioritized: list[str] | None) -> None:
    items = rich_items()
    src = _OneWay(gzip.compress(make_tar(items)))
    out = io.BytesIO()
    build_estargz(src, out, chunk_size=CHUNK, prioritized=prioritized, compression_level=1)
    _, files = read_layer(out.getvalue())
    assert files["big.bin"] == items[3].data


def test_converting_twice_drops_the_old_toc_and_landmarks() -> None:
    items = rich_items()
    once, _ = _build(make_tar(items), prioritized=["etc/hosts"])
    twice, _ = _build(gzip.decompress(once), prioritized=["etc/hosts"])
    with tarfile.open(fileobj=io.BytesIO(twice), mode="r:gz") as tf:
        names = tf.getnames()
    assert names.count(TOC_NAME) == 1 and names.count(PREFETCH_LANDMARK) == 1
    _, files = read_layer(twice)
    assert files["exact.bin"] == items[4].data


def test_large_file_streams_without_holding_the_layer() -> None:
    import tracemalloc

    size = 48 << 20
    tar = make_tar([Item("zeros", data=bytes(size))])
    tracemalloc.start()
    try:
        out = io.BytesIO()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        build_estargz(io.BytesIO(tar), _Discard(), chunk_size=4 << 20, compression_level=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 16 << 20
    del out


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        return len(b)


def test_rejects_unsupported_input() -> None:
    with pytest.raises(InvalidLayerTar):
        build_estargz(io.BytesIO(b"this is not a tar" * 100), io.BytesIO())


def test_legacy_footer_blob_reads_the_same() -> None:
    """A CRFS-era blob: same members, 47-byte footer without the SG subfield header."""
    items = rich_items()
    blob, result = _build(make_tar(items))
    legacy_extra = f"{result.toc_offset:016x}STARGZ".encode()
    legacy = (
        b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + len(legacy_extra).to_bytes(2, "little")
        + legacy_extra + b"\x01\x00\x00\xff\xff" + bytes(8)
    )  # fmt: skip
    old = blob[:-51] + legacy
    assert gzip.decompress(old) == gzip.decompress(blob)
    toc, files = read_layer(old)
    assert toc.blob_size == len(old)
    assert files["big.bin"] == items[3].data


def test_user_names_only_where_they_change() -> None:
    items = [Item("a", uid=1), Item("b", uid=1), Item("c", uid=2)]
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for it in items:
            info = tarfile.TarInfo(it.name)
            info.uid, info.uname = it.uid, f"user{it.uid}"
            tf.addfile(info)
    blob, _ = _build(tar.getvalue())
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        entries = json.load(tf.extractfile(TOC_NAME))["entries"]  # type: ignore[arg-type]
    assert [e.get("userName") for e in entries] == ["user1", None, "user2"]


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_gnu_sparse_input_becomes_a_plain_file(tmp_path: Path, fmt: str) -> None:
    """GNU tar's sparse encodings (old GNU and PAX 1.0) come out as ordinary files."""
    f = tmp_path / "src" / "sparse"
    f.parent.mkdir()
    with f.open("wb") as fh:
        fh.truncate(3 * CHUNK)
        fh.seek(CHUNK + 100)
        fh.write(b"island")
    tar = tmp_path / "in.tar"
    subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-cf", tar, "-C", f.parent, "sparse"], check=True
    )
    with tarfile.open(tar) as tf:
        assert tf.getmember("sparse").sparse  # the input really is sparse
    blob, _ = _build(tar.read_bytes())
    _, files = read_layer(blob)
    assert files["sparse"] == f.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        member = tf.getmember("sparse")
        assert member.sparse is None and member.isreg() and member.size == 3 * CHUNK


def test_refuses_names_that_are_not_utf8() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo(b"caf\xe9".decode("utf-8", "surrogateescape")))
    with pytest.raises(InvalidLayerTar, match="not UTF-8"):
        build_estargz(io.BytesIO(buf.getvalue()), io.BytesIO())
