"""The tree comparison the e2e tests rely on must notice what overlay bugs would look like:
a file a whiteout should hide, wrong content or mode, a broken hardlink, a lost symlink."""

from __future__ import annotations

import dataclasses

import pytest

from tests.e2e.images import FileInfo, merged_tree, sample_image
from tests.e2e.tree import Seen, compare, parse_listing


def _as_seen(tree: dict[str, FileInfo]) -> dict[str, Seen]:
    """What a perfect container would list, hardlinks sharing an inode."""
    inodes: dict[int, int] = {}
    counts: dict[int, int] = {}
    for info in tree.values():
        counts[id(info)] = counts.get(id(info), 0) + 1
    seen = {}
    for path, info in tree.items():
        ino = inodes.setdefault(id(info), len(inodes) + 1)
        kind = "reg" if info.kind == "hardlink" else info.kind
        seen[path] = Seen(
            kind=kind,
            mode=0o777 if kind == "symlink" else info.mode,
            uid=info.uid,
            gid=info.gid,
            size=info.size,
            nlink=counts[id(info)] if kind == "reg" else 1,
            inode=ino,
            device=info.device,
            mtime=info.mtime,
            sha256=info.sha256,
            link=info.link,
        )
    return seen


@pytest.fixture(scope="module")
def expected() -> dict[str, FileInfo]:
    return merged_tree(sample_image(third_layer=True))


def test_merged_tree_applies_whiteouts_and_opaque_dirs(expected: dict[str, FileInfo]) -> None:
    assert "/etc/removed.txt" not in expected and "/etc/kept.txt" in expected
    assert not [p for p in expected if p.startswith("/etc/subdir")]
    assert sorted(p for p in expected if p.startswith("/opt/old/")) == ["/opt/old/a", "/opt/old/c"]
    assert expected["/opt/old/a"].mode == 0o600 and expected["/data/symlink"].kind == "reg"
    assert expected["/data/hardlink"] is expected["/data/hello.txt"]
    assert not any(".wh." in p for p in expected)


def test_a_perfect_view_has_no_differences(expected: dict[str, FileInfo]) -> None:
    assert compare(expected, _as_seen(expected)) == []


@pytest.mark.parametrize(
    ("path", "change", "problem"),
    [
        ("/data/big.bin", {"sha256": "0" * 64}, "sha256"),
        ("/data/owned", {"mode": 0o644}, "mode"),
        ("/data/owned", {"uid": 0}, "uid"),
        ("/bin/sh", {"link": "elsewhere"}, "link"),
        ("/data/null", {"device": (1, 5)}, "device"),
        ("/data/hardlink", {"inode": 999}, "different inodes"),
        ("/data/empty", {"mtime": 0}, "mtime"),
    ],
)
def test_each_kind_of_difference_is_reported(
    expected: dict[str, FileInfo], path: str, change: dict[str, object], problem: str
) -> None:
    seen = _as_seen(expected)
    seen[path] = dataclasses.replace(seen[path], **change)  # type: ignore[arg-type]

    problems = compare(expected, seen)

    assert problems and all(path in p or "hardlinks" in p for p in problems)
    assert any(problem in p for p in problems)


def test_whited_out_and_missing_files_are_reported(expected: dict[str, FileInfo]) -> None:
    seen = _as_seen(expected)
    seen["/etc/removed.txt"] = seen["/etc/kept.txt"]
    del seen["/data/empty"]

    assert compare(expected, seen) == [
        "/data/empty: missing (reg)",
        "/etc/removed.txt: unexpected (reg)",
    ]


def test_a_truncated_listing_is_an_error() -> None:
    with pytest.raises(ValueError, match="incomplete"):
        parse_listing("#stat\n/|41ed|0|0|4096|1|2|0|0|1\n#sha256\n")
