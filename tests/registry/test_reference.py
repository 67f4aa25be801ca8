from __future__ import annotations

import pytest

from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument
from snapshotter.registry.reference import Reference, is_loopback

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "host", "repo", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/library/alpine:1", "docker.io", "library/alpine", "1", None),
        ("ghcr.io/o/r/sub:v1", "ghcr.io", "o/r/sub", "v1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/app:t", "localhost:5000", "app", "t", None),
        ("127.0.0.1:5000/a/b@" + D, "127.0.0.1:5000", "a/b", None, D),
        ("reg.example/app:v1@" + D, "reg.example", "app", "v1", D),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ],
)
def test_parse(text: str, host: str, repo: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.host, ref.repository, ref.tag) == (host, repo, tag)
    assert ref.digest == (Digest.parse(digest) if digest else None)
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    ["", " alpine", "Alpine", "app:", "app@sha256:abc", "reg.example/", "a//b", "x:5000/a:b:c"],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Reference.parse(text)


def test_object_prefers_digest() -> None:
    assert Reference.parse("r.io/a:v1").object == "v1"
    assert Reference.parse(f"r.io/a:v1@{D}").object == D


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.9.9.9", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry.example", False),
        ("docker.io", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
