"""parse_pull/parse_remove on CRI request bytes, built with the full runtime.v1 test messages."""

from __future__ import annotations

import base64

import pytest

from snapshotter.cri.pull import InvalidPullRequest, parse_pull, parse_remove
from snapshotter.registry.credentials import Credential
from tests.e2e._cri_proto.runtime.v1 import api_pb2 as cri


def _pull(image: str, **auth: str) -> bytes:
    req = cri.PullImageRequest(
        image=cri.ImageSpec(image=image, annotations={"k": "v"}),
        sandbox_config=cri.PodSandboxConfig(hostname="node-1"),
    )
    if auth:
        req.auth.CopyFrom(cri.AuthConfig(**auth))
    return req.SerializeToString()


def test_username_and_password() -> None:
    pull = parse_pull(_pull("reg.example:5000/team/app:v1", username="u", password="p"))

    assert (pull.image, pull.host) == ("reg.example:5000/team/app:v1", "reg.example:5000")
    assert pull.credential == Credential("u", "p")


def test_base64_auth_wins_over_separate_fields() -> None:
    auth = base64.b64encode(b"user:pa:ss").decode()
    pull = parse_pull(_pull("reg.example/app", auth=auth, username="ignored"))

    assert pull.image == "reg.example/app:latest"
    assert pull.credential == Credential("user", "pa:ss")


def test_identity_token() -> None:
    pull = parse_pull(_pull("reg.example/app:v1", username="u", identity_token="refresh"))
    assert pull.credential == Credential("u", "", "refresh")


def test_docker_hub_names_are_normalized() -> None:
    pull = parse_pull(_pull("alpine", username="u", password="p",
                            server_address="https://index.docker.io/v1/"))

    assert (pull.image, pull.host) == ("docker.io/library/alpine:latest", "docker.io")
    assert pull.credential == Credential("u", "p")


def test_credentials_for_another_registry_are_not_kept() -> None:
    pull = parse_pull(_pull("reg.example/app:v1", username="u", password="p",
                            server_address="other.example"))
    assert pull.credential is None


@pytest.mark.parametrize("auth", [{}, {"registry_token": "bearer-only"}])
def test_no_usable_credential(auth: dict[str, str]) -> None:
    assert parse_pull(_pull("reg.example/app:v1", **auth)).credential is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xff\xff",  # not protobuf
        cri.PullImageRequest().SerializeToString(),  # no image
        _pull("UPPER/Case:v1"),  # not a reference
        _pull("reg.example/app:v1", auth="!!!"),  # auth not base64
        _pull("reg.example/app:v1", auth=base64.b64encode(b"nocolon").decode()),
    ],
)
def test_unreadable_requests(raw: bytes) -> None:
    with pytest.raises(InvalidPullRequest):
        parse_pull(raw)


def test_remove_names_the_normalized_image() -> None:
    raw = cri.RemoveImageRequest(image=cri.ImageSpec(image="reg.example/app")).SerializeToString()
    assert parse_remove(raw) == "reg.example/app:latest"
    empty = cri.RemoveImageRequest().SerializeToString()
    assert parse_remove(empty) is None
