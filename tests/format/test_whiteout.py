from __future__ import annotations

import doctest

import pytest

from snapshotter.format import whiteout
from snapshotter.format.whiteout import WhiteoutKind, classify


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("etc/passwd", (WhiteoutKind.ORDINARY, "passwd")),
        ("file", (WhiteoutKind.ORDINARY, "file")),
        (".whatever", (WhiteoutKind.ORDINARY, ".whatever")),
        ("a/.wh.b", (WhiteoutKind.WHITEOUT, "b")),
        (".wh..hidden", (WhiteoutKind.WHITEOUT, ".hidden")),
        (".wh.a.wh.b", (WhiteoutKind.WHITEOUT, "a.wh.b")),
        ("dir/.wh..wh..opq", (WhiteoutKind.OPAQUE, "")),
        (".wh..wh.plnk", (WhiteoutKind.META, "")),
        (".wh..wh..opqx", (WhiteoutKind.META, "")),
        (".wh.", (WhiteoutKind.META, "")),
        (".wh..", (WhiteoutKind.META, "")),
        (".wh...", (WhiteoutKind.META, "")),
        (".wh.x/child", (WhiteoutKind.ORDINARY, "child")),  # only the base name matters
    ],
)
def test_classify(name: str, expected: tuple[WhiteoutKind, str]) -> None:
    assert classify(name) == expected


def test_doctest() -> None:
    assert doctest.testmod(whiteout).failed == 0
