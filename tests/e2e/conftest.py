"""Fixtures for end-to-end tests: one registry with the sample image per session, and a fresh
containerd + snapshotter stack per test (so a broken test cannot poison the next one).

`stack` runs lazysnap; parametrise it indirectly with `REFERENCE` to run the same test against
containerd's own overlayfs snapshotter, which tells harness bugs from snapshotter bugs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import Registry
from tests.e2e.images import Image, push_image, sample_image
from tests.e2e.stack import REFERENCE, Stack, start_stack

both_snapshotters = pytest.mark.parametrize(
    "stack", ["lazysnap", REFERENCE], indirect=True, ids=["lazysnap", "reference-overlayfs"]
)


@dataclass(frozen=True)
class PushedImage:
    ref: str
    image: Image
    digest: str


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def sample(registry: Registry) -> PushedImage:
    image = sample_image()
    digest = push_image(registry.url, "e2e/sample", "v1", image)
    return PushedImage(f"{registry.host}/e2e/sample:v1", image, digest)


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    snapshotter = getattr(request, "param", "lazysnap")
    with start_stack(tmp_path, snapshotter) as s:
        yield s
