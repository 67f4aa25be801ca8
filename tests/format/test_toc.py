"""parse_toc on hand-written TOC JSON: what it accepts, and each hostile shape it refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.format.estargz import InvalidTOC, parse_toc
from snapshotter.format.toc import EMPTY_DIGEST, Chunk, Entry, Toc

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
BLOB, TOC_AT = 100_000, 90_000


def _parse(entries: list[Any], **kw: Any) -> Any:
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    return parse_toc(doc, blob_size=kw.pop("blob_size", BLOB), toc_offset=TOC_AT, **kw)


def _reg(name: str, size: int = 10, offset: int = 1000, **kw: Any) -> dict[str, Any]:
    return {"name": name, "type": "reg", "size": size, "offset": offset, "chunkDigest": D1, **kw}


# --- accepted -------------------------------------------------------------------------------


def test_names_are_normalised_and_parents_synthesised() -> None:
    toc = _parse([_reg("./a/b/c.txt"), {"name": "/abs//x/", "type": "dir", "mode": 0o40700}])
    assert [(e.name, e.type, e.mode) for e in toc.entries] == [
        ("", "dir", 0o755),
        ("a", "dir", 0o755),
        ("a/b", "dir", 0o755),
        ("a/b/c.txt", "reg", 0),
        ("abs", "dir", 0o755),
        ("abs/x", "dir", 0o700),
    ]


def test_directory_redeclared_later_wins_in_place() -> None:
    toc = _parse(
        [
            {"name": "./", "type": "dir", "mode": 0o700, "uid": 5},
            {"name": "d/f", "type": "fifo"},  # synthesises d
            {"name": "d/", "type": "dir", "mode": 0o41777, "uid": 1},
            {"name": "d", "type": "dir", "mode": 0o750, "uid": 2},
        ]
    )
    assert [e.name for e in toc.entries] == ["", "d", "d/f"]
    root, d = toc.entries[0], toc.entries[1]
    assert (root.mode, root.uid) == (0o700, 5)
    assert (d.mode, d.uid) == (0o750, 2)


def test_fields() -> None:
    toc = _parse(
        [
            _reg(
                "f",
                mode=0o100644,
                uid=7,
                gid=8,
                userName="ignored",
                modtime="2021-02-03T04:05:06.5+01:00",
                xattrs={"user.a": "aGk=", "security.capability": ""},
                digest=D1,
            ),
            {"name": "l1", "type": "hardlink", "linkName": "./f"},
            {"name": "l2", "type": "hardlink", "linkName": "l1"},
            {"name": "s", "type": "symlink", "linkName": "../../etc/x"},
            {"name": "c", "type": "char", "devMajor": 1, "devMinor": 3},
            {"name": "n", "type": "reg", "modtime": "1969-12-31T23:59:59Z"},
        ]
    )
    f, l1, l2, s, c, n = toc.entries[1:]
    assert (f.mode, f.uid, f.gid) == (0o644, 7, 8)
    assert f.mtime_ns == 1612321506 * 10**9 + 500_000_000
    assert f.xattrs == (("user.a", b"hi"), ("security.capability", b""))
    assert f.digest is f.chunks[0].digest  # one string for a single-chunk file
    assert (l1.link_name, l2.link_name) == ("f", "f")  # hardlink chains resolve
    assert s.link_name == "../../etc/x"  # symlink targets are verbatim
    assert (c.dev_major, c.dev_minor) == (1, 3)
    assert n.mtime_ns == -(10**9) and n.chunks == ()


def test_chunks_and_their_ends() -> None:
    toc = _parse(
        [
            _reg("big", size=25, offset=100, chunkSize=10),
            {"name": "big", "type": "chunk", "offset": 200, "chunkOffset": 10,
             "chunkSize": 10, "chunkDigest": D2},
            {"name": "big", "type": "chunk", "offset": 300, "chunkOffset": 20,
             "chunkDigest": D3},
            _reg(".prefetch.landmark", size=1, offset=400),
            # two small files sharing one member through innerOffset
            _reg("s1", size=5, offset=500, innerOffset=0),
            _reg("s2", size=5, offset=500, innerOffset=5),
            {"name": "after", "type": "dir"},
        ]
    )  # fmt: skip
    big = toc.by_name()["big"]
    assert big.chunks == (
        Chunk(0, 10, 100, 200, 0, D1),
        Chunk(10, 10, 200, 300, 0, D2),
        Chunk(20, 5, 300, 400, 0, D3),  # ends where the landmark's member starts
    )
    s1, s2 = toc.by_name()["s1"].chunks[0], toc.by_name()["s2"].chunks[0]
    assert (s1.end, s2.end, s2.inner_offset) == (TOC_AT, TOC_AT, 5)
    assert toc.prefetch_landmark == 400 and not toc.no_prefetch
    assert ".prefetch.landmark" not in toc.by_name()


def test_legacy_toc_without_chunk_digests() -> None:
    """CRFS-era TOCs: a single-chunk file is verified by its whole-file digest."""
    toc = _parse([_reg("f", chunkDigest="", digest=D2)])
    assert toc.by_name()["f"].chunks[0].digest == D2
    with pytest.raises(InvalidTOC, match="chunkDigest"):  # several chunks: nothing to check
        _parse(
            [_reg("g", size=20, chunkSize=10, chunkDigest="", digest=D2),
             {"name": "g", "type": "chunk", "offset": 2000, "chunkOffset": 10, "chunkDigest": D3}]
        )  # fmt: skip


def test_no_prefetch_landmark() -> None:
    toc = _parse([_reg(".no.prefetch.landmark", size=1, offset=10), _reg("f")])
    assert toc.no_prefetch and toc.prefetch_landmark is None
    assert [e.name for e in toc.entries] == ["", "f"]


@pytest.mark.parametrize(
    "doc",
    [
        b'{"entries":[]}',
        b' \n{ "entries" : [ ] , "version" : 1 , "extra": {"x": [1]} }\n\t',
        json.dumps(
            {"version": 1, "entries": [{"name": "d/", "type": "dir"}]}, indent="\t"
        ).encode(),
    ],
)
def test_json_layouts(doc: bytes) -> None:
    """Go writes the TOC with MarshalIndent (tabs); any valid layout must parse."""
    names = [e.name for e in parse_toc(doc, blob_size=10, toc_offset=0).entries]
    assert names in ([""], ["", "d"])


# --- refused --------------------------------------------------------------------------------

HOSTILE: dict[str, tuple[list[Any], str]] = {
    "dotdot-escape": ([_reg("a/../../etc/passwd")], "'..'"),
    "dotdot-alone": ([{"name": "..", "type": "dir"}], "'..'"),
    "nul-in-name": ([_reg("a\0b")], "NUL"),
    "name-not-string": ([{"name": 5, "type": "dir"}], r"entries\[0\]\.name"),
    "long-component": ([_reg("x" * 256)], "over-long"),
    "duplicate-reg": ([_reg("a"), _reg("a", offset=2000)], "duplicate"),
    "dir-then-reg": ([{"name": "a", "type": "dir"}, _reg("a")], "duplicate"),
    "reg-then-dir": ([_reg("a"), {"name": "a/", "type": "dir"}], "duplicate"),
    "synthesised-dir-then-reg": ([_reg("a/b"), _reg("a", offset=2000)], "duplicate"),
    "parent-is-file": ([_reg("a"), _reg("a/b", offset=2000)], "parent 'a' is a reg"),
    "root-not-dir": ([_reg("./")], "root must be a directory"),
    "hardlink-missing": ([{"name": "l", "type": "hardlink", "linkName": "nope"}], "not an earlier"),
    "hardlink-forward": (
        [{"name": "l", "type": "hardlink", "linkName": "f"}, _reg("f")],
        "not an earlier",
    ),
    "hardlink-to-dir": (
        [{"name": "d", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"}],
        "is a directory",
    ),
    "hardlink-to-root": ([{"name": "l", "type": "hardlink", "linkName": "/"}], "not an earlier"),
    "hardlink-to-landmark": (
        [_reg(".prefetch.landmark", 1),
         {"name": "l", "type": "hardlink", "linkName": ".prefetch.landmark"}],
        "not an earlier",
    ),
    "chunk-without-reg": (
        [{"name": "f", "type": "chunk", "offset": 1, "chunkDigest": D1}], "does not follow"
    ),
    "chunk-other-name": (
        [_reg("f"), {"name": "g", "type": "chunk", "offset": 2000, "chunkDigest": D1}],
        "does not follow",
    ),
    "chunk-after-other-entry": (
        [_reg("f", size=10), {"name": "d", "type": "dir"},
         {"name": "f", "type": "chunk", "offset": 2000, "chunkOffset": 10, "chunkDigest": D1}],
        "does not follow",
    ),
    "chunk-of-empty-file": (
        [_reg("f", size=0),
         {"name": "f", "type": "chunk", "offset": 2000, "chunkDigest": D1}],
        "does not follow",
    ),
    "offsets-decrease": ([_reg("a", offset=5000), _reg("b", offset=4000)], "before an earlier"),
    "chunk-offsets-decrease": (
        [_reg("f", size=20, offset=5000, chunkSize=10),
         {"name": "f", "type": "chunk", "offset": 4000, "chunkOffset": 10, "chunkDigest": D2}],
        "before an earlier",
    ),
    "chunk-past-toc": ([_reg("f", offset=TOC_AT)], "not before the toc"),
    "landmark-past-toc": ([_reg(".prefetch.landmark", 1, offset=TOC_AT + 5)], "not before the toc"),
    "chunks-overlap-inner": (
        [_reg("a", size=10, offset=500), _reg("b", size=10, offset=500, innerOffset=5)],
        "overlap",
    ),
    "chunks-same-member": ([_reg("a", offset=500), _reg("b", offset=500)], "overlap"),
    "chunk-gap": (
        [_reg("f", size=30, chunkSize=10),
         {"name": "f", "type": "chunk", "offset": 2000, "chunkOffset": 15, "chunkDigest": D2}],
        "does not continue",
    ),
    "chunk-repeats": (
        [_reg("f", size=20, chunkSize=10),
         {"name": "f", "type": "chunk", "offset": 2000, "chunkOffset": 0, "chunkDigest": D2}],
        "does not continue",
    ),
    "chunks-short-of-size": ([_reg("f", size=30, chunkSize=10)], "cover 10 of 30"),
    "chunk-beyond-size": ([_reg("f", size=10, chunkSize=20)], "does not continue"),
    "chunk-size-zero-not-last": (
        [_reg("f", size=20),
         {"name": "f", "type": "chunk", "offset": 2000, "chunkOffset": 10, "chunkDigest": D2}],
        "does not continue",
    ),
    "reg-chunk-offset-nonzero": ([_reg("f", chunkOffset=5)], "file offset 0"),
    "chunk-digest-missing": ([_reg("f", chunkDigest="")], "chunkDigest"),
    "chunk-digest-garbage": ([_reg("f", chunkDigest="sha256:xyz")], "chunkDigest"),
    "file-digest-garbage": ([_reg("f", digest=5)], "digest"),
    "negative-size": ([_reg("f", size=-1)], r"entries\[0\]\.size"),
    "negative-offset": ([_reg("f", offset=-5)], r"entries\[0\]\.offset"),
    "negative-inner-offset": ([_reg("f", innerOffset=-5)], "innerOffset"),
    "negative-chunk-size": ([_reg("f", chunkSize=-5)], "chunkSize"),
    "negative-uid": ([{"name": "d", "type": "dir", "uid": -1}], "uid"),
    "huge-gid": ([{"name": "d", "type": "dir", "gid": 1 << 40}], "gid"),
    "float-size": ([_reg("f", size=10.0)], "size"),
    "bool-mode": ([{"name": "d", "type": "dir", "mode": True}], "mode"),
    "negative-dev": ([{"name": "c", "type": "char", "devMajor": -1}], "devMajor"),
    "unknown-type": ([{"name": "s", "type": "socket"}], "unknown type"),
    "missing-type": ([{"name": "s"}], "unknown type"),
    "bad-modtime": ([{"name": "d", "type": "dir", "modtime": "yesterday"}], "RFC 3339"),
    "bad-modtime-date": (
        [{"name": "d", "type": "dir", "modtime": "2021-13-40T00:00:00Z"}], "range"
    ),
    "bad-xattr-value": ([{"name": "d", "type": "dir", "xattrs": {"user.a": "!!"}}], "base64"),
    "bad-xattr-name": ([{"name": "d", "type": "dir", "xattrs": {"": "aGk="}}], "xattr"),
    "xattrs-not-object": ([{"name": "d", "type": "dir", "xattrs": ["a"]}], "xattrs"),
    "empty-symlink": ([{"name": "s", "type": "symlink", "linkName": ""}], "symlink target"),
    "landmark-not-reg": ([{"name": ".prefetch.landmark", "type": "dir"}], "landmark"),
    "entry-not-object": ([["name", "x"]], "Expected `object`"),
}  # fmt: skip


@pytest.mark.parametrize(("entries", "message"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_entries_are_refused(entries: list[Any], message: str) -> None:
    with pytest.raises(InvalidTOC, match=message) as info:
        _parse(entries)
    assert isinstance(info.value, InvalidArgument)
    assert "toc entr" in str(info.value)  # the message names the entry


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "'entries' list"),
        (b'{"entries": {}}', "'entries' list"),
        (b'{"entries": [}', "not JSON"),
        (b'{"entries": [{"name": "a", "type": "dir"},]}', "not JSON"),
        (b'{"entries": [] "version": 1}', "not JSON"),
        (b'{"entries": []}}', "trailing characters"),
        (b'{"entries": [], "entries": []}', "two 'entries'"),
        (b'{"version": 1}', "'entries' list"),
        (b"{}", "'entries' list"),
        (b'{"version": 2, "entries": []}', "version"),
        (b'{"entries": [], "version": "1"}', "version"),
        (b"\xff\xfe", "not JSON"),
        (b'{"entries": [{"name": "\xc3\x28"}]}', "not UTF-8"),
        (b'{"entries": [{"name": "bad\\udc80"}]}', "surrogate"),  # a lone surrogate
        (b"[" * 100_000, "'entries' list"),
        (b'{"entries": [' + b"[" * 100_000 + b"]}", "toc entry #0"),
        (b'{"x": ' + b"[" * 100_000 + b'], "entries": []}', "not JSON"),
        (b'{"entries": [{"name": "a", "x": ' + b"[" * 100_000 + b"]}]}", "not JSON"),
    ],
)
def test_malformed_documents_are_refused(doc: bytes, message: str) -> None:
    with pytest.raises(InvalidTOC, match=message):
        parse_toc(doc, blob_size=BLOB, toc_offset=TOC_AT)


def test_too_many_entries() -> None:
    with pytest.raises(InvalidTOC, match="over the limit 2"):
        _parse([{"name": f"d{i}", "type": "dir"} for i in range(3)], max_entries=2)


def test_too_many_entries_is_refused_before_decoding_whatever_the_spelling() -> None:
    """Keys may be escaped ("\\u006eame" is "name"): the bound counts objects, so a
    document of many tiny entries is refused before any is decoded."""
    tiny = b'{"\\u006eame": "d%d", "type": "dir"}'
    doc = b'{"entries": [' + b", ".join(tiny % i for i in range(3)) + b"]}"
    assert [e.name for e in parse_toc(doc, blob_size=BLOB, toc_offset=TOC_AT).entries] == [
        "", "d0", "d1", "d2"
    ]  # fmt: skip
    with pytest.raises(InvalidTOC, match="over the limit 2 entries"):
        parse_toc(doc, blob_size=BLOB, toc_offset=TOC_AT, max_entries=2)


def test_toc_offset_outside_blob() -> None:
    with pytest.raises(InvalidTOC, match="outside blob"):
        _parse([], blob_size=TOC_AT)


# --- robustness and size ------------------------------------------------------------------

_ODD_VALUES: list[Any] = [
    None, True, -1, 0, 1.5, 1 << 70, "", "x", "../..", "\0", [], {}, [1], {"a": 1},
    "sha256:" + "0" * 64, "2021-01-01T00:00:00Z", "reg", "chunk", "hardlink", "dir", "a/b",
]  # fmt: skip
_KEYS = ["name", "type", "size", "offset", "innerOffset", "chunkOffset", "chunkSize",
         "chunkDigest", "digest", "linkName", "mode", "uid", "modtime", "xattrs",
         "devMajor"]  # fmt: skip


def test_fuzzed_tocs_give_a_toc_or_invalid_toc() -> None:
    """Any mutation of a valid TOC is accepted or refused as InvalidTOC, never a crash."""
    import random

    base = [
        {"name": "d/", "type": "dir", "mode": 0o755},
        _reg("d/f", size=20, offset=100, chunkSize=10, digest=D1),
        {"name": "d/f", "type": "chunk", "offset": 200, "chunkOffset": 10, "chunkDigest": D2},
        {"name": "d/h", "type": "hardlink", "linkName": "d/f"},
        {"name": "s", "type": "symlink", "linkName": "d/f"},
        _reg("g", size=5, offset=300, xattrs={"user.x": "eA=="}),
        {"name": "c", "type": "char", "devMajor": 1, "devMinor": 5},
    ]
    rnd = random.Random(1234)
    outcomes = {"ok": 0, "invalid": 0}
    for _ in range(3000):
        entries = [dict(e) for e in base]
        for _ in range(rnd.randint(1, 3)):
            e = rnd.choice(entries)
            key = rnd.choice(_KEYS)
            if rnd.random() < 0.2:
                e.pop(key, None)
            else:
                e[key] = rnd.choice(_ODD_VALUES)
        if rnd.random() < 0.2:
            rnd.shuffle(entries)
        try:
            _parse(entries)
            outcomes["ok"] += 1
        except InvalidTOC:
            outcomes["invalid"] += 1
    assert outcomes["ok"] > 100 and outcomes["invalid"] > 1000


def test_layout_and_escapes_do_not_change_the_toc() -> None:
    """Multi-byte UTF-8, escapes, blanks and unknown keys read the same in any layout."""
    entries = [
        {"name": "d\u00e9j\u00e0/", "type": "dir", "mode": 0o40755, "uid": 123456},
        _reg("d\u00e9j\u00e0/\u65e5\u672c\u8a9e.txt", size=987654, offset=12345),
        {"name": "l", "type": "symlink", "linkName": "\U0001f600" * 40},
        {"name": "x", "type": "fifo", "xattrs": {"user.big": "QUJD" * 500}},
    ]
    top = {"version": 1, "entries": entries, "extra": [1, 2.5, None, True]}
    doc = json.dumps(top, ensure_ascii=False)
    texts = (doc, doc.replace(", ", " ,\n\t "), json.dumps(top, indent=3), json.dumps(top))
    tocs = [parse_toc(text.encode(), blob_size=BLOB, toc_offset=TOC_AT) for text in texts]
    for toc in tocs[1:]:
        assert list(toc.entries) == list(tocs[0].entries)
    assert [e.name for e in tocs[0].entries][-2:] == ["l", "x"]
    assert tocs[0].entry(3).link_name == "\U0001f600" * 40


def test_repeated_entries_key_is_refused_even_when_the_word_is_also_a_name() -> None:
    one = [{"name": "entries", "type": "dir"}]
    doc = json.dumps({"version": 1, "entries": one}).encode()
    assert [e.name for e in parse_toc(doc, blob_size=BLOB, toc_offset=TOC_AT).entries] == [
        "", "entries"
    ]  # fmt: skip
    twice = b'{"entries": [], "version": 1, "entries": ' + json.dumps(one).encode() + b"}"
    with pytest.raises(InvalidTOC, match="two 'entries'"):
        parse_toc(twice, blob_size=BLOB, toc_offset=TOC_AT)


def test_truncated_json_is_invalid() -> None:
    doc = json.dumps({"version": 1, "entries": [_reg("a"), {"name": "b", "type": "dir"}]})
    for cut in range(len(doc)):
        with pytest.raises(InvalidTOC):
            parse_toc(doc[:cut].encode(), blob_size=BLOB, toc_offset=TOC_AT)


def _big_toc(n: int) -> bytes:
    entries: list[dict[str, Any]] = []
    offset = 1000
    for i in range(n):
        d = f"usr/lib/python3.11/site-packages/pkg{i // 1000}/sub{i // 20}"
        if i % 20 == 0:
            entries.append({"name": d + "/", "type": "dir", "mode": 0o40755,
                            "modtime": "2024-01-01T00:00:00Z"})  # fmt: skip
        elif i % 10 == 5:
            entries.append({"name": f"{d}/link_{i}", "type": "symlink", "linkName": "x.py",
                            "mode": 0o120777, "modtime": "2024-01-01T00:00:00Z"})  # fmt: skip
        else:
            digest = f"sha256:{i:064x}"
            entries.append(
                {"name": f"{d}/module_{i}.py", "type": "reg", "size": 3000 + i % 5000,
                 "offset": offset, "mode": 0o100644, "digest": digest, "chunkDigest": digest,
                 "modtime": f"2024-01-{1 + i % 28:02d}T00:00:00Z"}
            )  # fmt: skip
            offset += 1000 + i % 700
    return json.dumps({"version": 1, "entries": entries}).encode()


@pytest.mark.slow
def test_memory_per_entry_for_100k_entries() -> None:
    """The retained Toc and the parse's peak, per entry (tracemalloc, so Python heap)."""
    import gc
    import tracemalloc

    n = 100_000
    doc = _big_toc(n)
    gc.collect()
    tracemalloc.start()
    try:
        toc = parse_toc(doc, blob_size=1 << 40, toc_offset=1 << 39)
        _, peak = tracemalloc.get_traced_memory()
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(toc.entries) == n + 1 + 4 + 100  # root, usr/lib/python3.11/site-packages, pkgs
    per_entry, peak_per_entry = retained / n, (peak - len(doc)) / n
    print(f"\n100k-entry TOC: {per_entry:.0f} B/entry retained, {peak_per_entry:.0f} B/entry peak")
    # Columns: base name, a dozen numbers, one chunk row with its 32-byte digest ~ 120 B.
    assert per_entry < 200
    assert peak_per_entry < 1300  # the decoded text (~1 char per JSON byte) is most of it


def test_the_columnar_model_gives_back_what_it_was_given() -> None:
    """`Toc(entries=...)` keeps every field, in order, even those the columns cannot hold."""
    c1 = Chunk(0, 4, 100, 200, 0, D1)
    c2 = Chunk(4, 6, 200, 300, 7, "sha512:" + "ab" * 64)
    entries = [
        Entry("a/b", "reg", mode=0o644, size=4, digest=D1, chunks=(c1,)),  # before its dir
        Entry("a", "dir", mode=0o755, uid=1, gid=2, mtime_ns=-(10**19)),  # before 1678
        Entry("big", "reg", mode=0o1_000_000, size=10, digest=D3, chunks=(c1, c2)),
        Entry("empty", "reg", digest=EMPTY_DIGEST),
        Entry("odd", "reg", size=1, digest=D2, chunks=(Chunk(0, 1, 5, 6, 0, "SHA256:X"),)),
        Entry("nowhere/x", "fifo", xattrs=(("user.a", b"\0\1"),)),  # its dir never comes
        Entry("l", "symlink", link_name="\udc80 not utf-8 \U0001f600"),
        Entry("h", "hardlink", link_name="a/b"),
        Entry("dev", "char", dev_major=1, dev_minor=3),
        Entry("s", "sock", size=1 << 70),
        Entry("a", "reg"),  # a duplicate name
        Entry("", "dir", mode=0o700),
    ]
    toc = Toc(entries=entries, toc_offset=5, blob_size=9, prefetch_landmark=3)
    assert list(toc.entries) == entries
    assert toc.entries[-1] == entries[-1] and toc.entries[2:4] == entries[2:4]
    assert [c.digest for c in toc.chunks()] == [D1, D1, c2.digest, "SHA256:X"]
    assert (toc.toc_offset, toc.blob_size, toc.prefetch_landmark) == (5, 9, 3)
    assert toc.name(0) == "a/b" and toc.columns.parent[0] == 2  # 1 + row of "a"
    assert toc.odd_rows == {1, 2, 9}


def test_chunks_within_finds_neighbours_in_blob_order() -> None:
    def reg(name: str, offset: int, end: int) -> Entry:
        digest = "sha256:" + f"{offset:064x}"
        return Entry(name, "reg", size=10, chunks=(Chunk(0, 10, offset, end, 0, digest),))

    toc = Toc(entries=[Entry("", "dir", mode=0o755), reg("a", 100, 150), reg("b", 150, 220),
                       Entry("d", "dir", mode=0o755), reg("d/c", 260, 400), reg("e", 400, 900)])
    assert [c.offset for c in toc.chunks_within(150, 400)] == [150, 260]
    assert [c.offset for c in toc.chunks_within(151, 899)] == [260]  # e ends past 899
    assert toc.chunks_within(400, 400) == []
    shuffled = Toc(entries=[Entry("", "dir", mode=0o755), reg("a", 500, 600), reg("b", 100, 200)])
    assert shuffled.chunks_within(0, 1000) == []  # not in blob order: no neighbours


def test_chunk_values_past_32_bits_are_kept_whole() -> None:
    """Chunk columns start 32-bit and widen when a file or blob passes 4 GiB."""
    big = 5 << 30
    entries = [
        {"name": "small", "type": "reg", "size": 10, "offset": 1000, "chunkDigest": D1},
        {"name": "huge", "type": "reg", "size": 2 * big, "offset": 2000, "chunkSize": big,
         "chunkDigest": D2},
        {"name": "huge", "type": "chunk", "offset": big + 3000, "chunkOffset": big,
         "chunkSize": big, "chunkDigest": D3},
    ]  # fmt: skip
    toc = parse_toc(json.dumps({"version": 1, "entries": entries}).encode(),
                    blob_size=3 * big, toc_offset=2 * big)  # fmt: skip
    assert [(c.chunk_offset, c.size, c.offset, c.end) for c in toc.chunks()] == [
        (0, 10, 1000, 2000),
        (0, big, 2000, big + 3000),
        (big, big, big + 3000, 2 * big),
    ]
    assert [c.offset for c in toc.chunks_within(2000, 2 * big)] == [2000, big + 3000]
    inner = Chunk(big, 10, big, big + 50, big + 7, D1)  # every column past 32 bits at once
    built = Toc(entries=[Entry("", "dir"), Entry("f", "reg", size=big + 10, chunks=(
        Chunk(0, big, 0, big, 0, D2), inner))])  # fmt: skip
    assert list(built.chunks())[-1] == inner
