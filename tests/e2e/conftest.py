"""Fixtures for end-to-end tests: one registry with the sample image per session, and a fresh
containerd + snapshotter stack per test (so a broken test cannot poison the next one).

`stack` runs lazysnap; parametrise it indirectly with `REFERENCE` to run the same test against
containerd's own overlayfs snapshotter, which tells harness bugs from snapshotter bugs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.estargz import EstargzImage, convert_and_push
from tests.e2e.harness import Registry
from tests.e2e.images import Image, data_image, push_image, sample_image
from tests.e2e.stack import REFERENCE, Stack, start_stack

MiB = 1024 * 1024
# Three incompressible files for the lazy tests: far more than a container that only runs
# `echo` needs, so what a lazy start fetches is visibly a small part of the image.
DATA_FILES = {"data/big-0.bin": 12 * MiB + 7, "data/big-1.bin": 9 * MiB, "data/big-2.bin": 5 * MiB}

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
    image = sample_image(third_layer=True)
    digest = push_image(registry.url, "e2e/sample", "v1", image)
    return PushedImage(f"{registry.host}/e2e/sample:v1", image, digest)


@pytest.fixture(scope="session")
def esgz_sample(
    registry: Registry, sample: PushedImage, tmp_path_factory: pytest.TempPathFactory
) -> EstargzImage:
    """The sample image converted to eStargz by ctr-remote."""
    return convert_and_push(tmp_path_factory.mktemp("conv"), registry, "e2e/sample", "v1", "esgz")


@pytest.fixture(scope="session")
def esgz_data(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> tuple[EstargzImage, EstargzImage]:
    """Two eStargz images whose data layers differ by one small file: they share big-*.bin."""
    push_image(registry.url, "e2e/data", "a", data_image(DATA_FILES))
    push_image(registry.url, "e2e/data", "b", data_image(DATA_FILES, extra={"data/b.txt": b"b"}))
    work = tmp_path_factory.mktemp("conv")
    a = convert_and_push(work / "a", registry, "e2e/data", "a", "a-esgz")
    b = convert_and_push(work / "b", registry, "e2e/data", "b", "b-esgz")
    return a, b


def data_sha256(path: str, files: dict[str, int] = DATA_FILES, seed: int = 7) -> str:
    """sha256 of one file of `data_image(files, seed)`, as `sha256sum` prints it."""
    entries = data_image(files, seed=seed).layers[1].entries
    return hashlib.sha256(next(e.data for e in entries if e.path == path)).hexdigest()


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
