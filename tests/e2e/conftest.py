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
    # The project's rule "unexpected WARNING/ERROR records fail a test" also holds for the
    # daemon, whose records end up in its log file rather than in pytest's caplog.
    if s.lazysnap is not None and not request.node.get_closest_marker("allow_log_errors"):
        bad = daemon_log_problems(s.lazysnap.log_path)
        if bad:
            pytest.fail("lazysnap logged:\n" + "\n".join(bad), pytrace=False)


_BAD_LOG_PREFIXES = ("WARNING", "ERROR", "CRITICAL", "Traceback")


def daemon_log_problems(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line for line in lines if line.startswith(_BAD_LOG_PREFIXES)]
