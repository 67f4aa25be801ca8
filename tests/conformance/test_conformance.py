"""Runs every `check_*` of the conformance modules against every snapshotter factory.

A factory takes a fresh root and returns a snapshotter; add one here (e.g. a gRPC client
speaking to `lazysnap serve`) and the whole suite runs against it. Checks marked
`needs_mounts` run under the `root` marker, `slow` ones under `slow`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bad_input_checks
import layer_checks
import pytest
import snapshotter_suite
from suite_base import assert_consistent
from suite_grpc import GrpcSnapshotter
from suite_mounting import unmount_under

from snapshotter.core.snapshotter import Snapshotter

MODULES = (snapshotter_suite, layer_checks, bad_input_checks)

FACTORIES: dict[str, Callable[[Path], Any]] = {
    "core": lambda root: Snapshotter(root),
    "grpc": lambda root: GrpcSnapshotter(root, root.parent / "snapshots.sock"),
}


class _RefusalsExpected(logging.Filter):
    """The servicer logs refused requests (bad input the checks send on purpose) at
    WARNING; mark those as expected so only ERRORs still fail the test."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            record.expected = True
        return True


def _checks() -> list[Any]:
    params = []
    for module in MODULES:
        for name, fn in vars(module).items():
            if not (name.startswith("check_") and callable(fn)) or fn.__module__ != module.__name__:
                continue
            marks = []
            if getattr(fn, "needs_mounts", False):
                marks.append(pytest.mark.root)
            if getattr(fn, "slow", False):
                marks.append(pytest.mark.slow)
            params.append(pytest.param(fn, id=name.removeprefix("check_"), marks=marks))
    return params


@pytest.fixture(params=sorted(FACTORIES))
def factory(request: pytest.FixtureRequest) -> Iterator[Callable[[Path], Any]]:
    servicer_log = logging.getLogger("snapshotter.service.snapshots")
    refusals = _RefusalsExpected()
    servicer_log.addFilter(refusals)
    try:
        yield FACTORIES[request.param]
    finally:
        servicer_log.removeFilter(refusals)


@pytest.fixture
def suite_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """containerd's makeTest layout under umask 0 (so modes are what the checks say)."""
    old = os.umask(0)
    root, work = tmp_path / "root", tmp_path / "work"
    root.mkdir(mode=0o777)
    work.mkdir(mode=0o777)
    try:
        yield root, work
    finally:
        os.umask(old)


@pytest.mark.parametrize("check", _checks())
def test_conformance(
    check: Callable[[Any, Path], None],
    factory: Callable[[Path], Any],
    suite_dirs: tuple[Path, Path],
) -> None:
    root, work = suite_dirs
    sn = factory(root)
    try:
        check(sn, work)
    finally:
        left = unmount_under(work.parent)
        sn.close()
    assert not left, f"check left mounts behind: {left}"
    assert_consistent(work)


def test_every_check_is_collected() -> None:
    """A check named wrongly (not `check_`) would silently never run."""
    public = {
        name
        for module in MODULES
        for name, fn in vars(module).items()
        if callable(fn)
        and getattr(fn, "__module__", "") == module.__name__
        and not name.startswith("_")
    }
    assert {n for n in public if not n.startswith("check_")} == set()
