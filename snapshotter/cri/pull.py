"""Reading the image name and pull credentials out of CRI PullImage/RemoveImage bytes.

Only the fields lazysnap needs are decoded (`lazysnap.cri.v1`, wire-compatible with
`runtime.v1`); the proxy forwards the original bytes untouched.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from snapshotter.errors import InvalidArgument
from snapshotter.registry.credentials import Credential
from snapshotter.registry.errors import InvalidReference
from snapshotter.registry.reference import DOCKER_HUB, Reference
from snapshotter.service._proto.lazysnap.cri.v1 import pull_pb2

__all__ = ["InvalidPullRequest", "PullAuth", "parse_pull", "parse_remove"]

log = logging.getLogger(__name__)

_HUB_SERVERS = {"index.docker.io", "registry-1.docker.io", "docker.io"}


class InvalidPullRequest(InvalidArgument):
    """The request bytes are not a PullImageRequest we can read (or name no image)."""


@dataclass(frozen=True, slots=True)
class PullAuth:
    """An image pull as the proxy sees it: normalized reference, registry, credential."""

    image: str
    host: str
    credential: Credential | None


def _decode(message: type, raw: bytes, what: str):  # type: ignore[no-untyped-def]
    try:
        return message.FromString(raw)
    except DecodeError:
        raise InvalidPullRequest(f"{what}: not a valid protobuf message") from None


def _reference(image: str, what: str) -> Reference:
    if not image:
        raise InvalidPullRequest(f"{what}: no image name")
    try:
        return Reference.parse(image)
    except InvalidReference as exc:
        raise InvalidPullRequest(f"{what}: {exc}") from None


def _server_host(server_address: str) -> str:
    rest = server_address.partition("://")[2] if "://" in server_address else server_address
    host = rest.partition("/")[0]
    return DOCKER_HUB if host in _HUB_SERVERS else host


def parse_pull(raw: bytes) -> PullAuth:
    """The image and credential of a PullImageRequest; credential None if it carries none.

    As containerd's CRI plugin does, credentials whose `server_address` names another
    registry than the image's are not used for it. `registry_token` (a ready bearer
    token) is not kept: the registry client can only renew tokens from a password or an
    identity token.
    """
    req = _decode(pull_pb2.PullImageRequest, raw, "PullImage request")
    ref = _reference(req.image.image, "PullImage request")
    image = str(ref)
    if not req.HasField("auth"):
        return PullAuth(image, ref.host, None)
    auth = req.auth
    if auth.server_address and _server_host(auth.server_address) != ref.host:
        log.info("PullImage %s: credentials are for another registry; not kept", image)
        return PullAuth(image, ref.host, None)
    username, password = auth.username, auth.password
    if auth.auth:
        try:
            decoded = base64.b64decode(auth.auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidPullRequest(f"PullImage {image}: 'auth' is not base64") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise InvalidPullRequest(f"PullImage {image}: 'auth' has no ':'")
    if auth.identity_token:
        return PullAuth(image, ref.host, Credential(username, "", auth.identity_token))
    if username or password:
        return PullAuth(image, ref.host, Credential(username, password))
    if auth.registry_token:
        log.info("PullImage %s: a registry_token cannot be renewed by lazysnap; not kept", image)
    return PullAuth(image, ref.host, None)


def parse_remove(raw: bytes) -> str | None:
    """The normalized reference a RemoveImageRequest names, or None for an image ID."""
    req = _decode(pull_pb2.RemoveImageRequest, raw, "RemoveImage request")
    try:
        return str(Reference.parse(req.image.image))
    except (InvalidReference, ValueError):
        return None
