"""Image references (`host[:port]/repo[:tag][@digest]`) with Docker Hub's defaults."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument
from snapshotter.registry.errors import InvalidReference

__all__ = ["DOCKER_HUB", "Reference", "is_loopback"]

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?)(?::\d+)?$")


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed image reference.

    `host` is the registry as named in the reference (`docker.io` for Docker Hub: the name
    under which containerd looks up `certs.d/` and docker looks up credentials), and
    `repository` is the full path (`library/alpine`). A reference with neither tag nor
    digest gets the tag `latest`. Example::

        Reference.parse("alpine")  # docker.io/library/alpine:latest
        Reference.parse("127.0.0.1:5000/app@sha256:...")  # tag None, digest set
    """

    host: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or len(text) > 4096 or text != text.strip():
            raise InvalidReference(f"invalid image reference {text!r}")
        rest, digest = text, None
        if "@" in rest:
            rest, _, digest_text = rest.partition("@")
            try:
                digest = Digest.parse(digest_text)
            except InvalidArgument:
                raise InvalidReference(f"image reference {text!r}: invalid digest") from None
        host, slash, path = rest.partition("/")
        if not slash or not (("." in host or ":" in host) or host == "localhost"):
            host, path = DOCKER_HUB, rest
        tag = None
        last_slash = path.rfind("/")
        colon = path.rfind(":")
        if colon > last_slash:
            path, tag = path[:colon], path[colon + 1 :]
            if not _TAG.match(tag):
                raise InvalidReference(f"image reference {text!r}: invalid tag {tag!r}")
        if host in _HUB_ALIASES:
            host = DOCKER_HUB
            if "/" not in path:
                path = f"library/{path}"
        if not _HOST.match(host):
            raise InvalidReference(f"image reference {text!r}: invalid registry host {host!r}")
        if not path or not all(_COMPONENT.match(c) for c in path.split("/")):
            raise InvalidReference(f"image reference {text!r}: invalid repository {path!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(host, path, tag, digest)

    @property
    def object(self) -> str:
        """What a manifest request names: the digest if pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    def with_digest(self, digest: Digest) -> Reference:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1, with or without a port."""
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
