"""Content digests ("sha256:<hex>") as a value type, and a streaming verifier.

Strings appear only at the edges (labels, proto, paths); inside, pass `Digest` objects.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from snapshotter.errors import DataLoss, InvalidArgument

__all__ = ["Digest", "Verifier"]

_HEX_LEN = {"sha256": 64, "sha512": 128}
_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        m = _RE.match(text)
        if m is None or len(m.group(2)) != _HEX_LEN[m.group(1)]:
            raise InvalidArgument(f"invalid digest {text!r}")
        return cls(m.group(1), m.group(2))

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def verifier(self) -> Verifier:
        return Verifier(self)

    def check(self, data: bytes, what: str = "content") -> None:
        """Raise DataLoss unless `data` hashes to this digest."""
        v = self.verifier()
        v.update(data)
        v.verify(what)


class Verifier:
    """Hashes a stream piecewise; `verify()` raises DataLoss on mismatch."""

    def __init__(self, expected: Digest) -> None:
        self.expected = expected
        self._h = hashlib.new(expected.algorithm)
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def verified(self) -> bool:
        return self._h.hexdigest() == self.expected.hex

    def verify(self, what: str = "content") -> None:
        got = self._h.hexdigest()
        if got != self.expected.hex:
            raise DataLoss(
                f"{what}: digest mismatch: expected {self.expected}, "
                f"got {self.expected.algorithm}:{got} ({self.size} bytes)"
            )
