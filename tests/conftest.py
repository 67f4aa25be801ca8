"""Project-wide test policy.

Markers declare prerequisites (`fuse`, `root`, `e2e`); a test whose prerequisite is
missing is skipped with the reason on a laptop. In CI (CI=true or LAZYSNAP_STRICT=1)
every marker must run, so such a skip, or any other skip, fails the run instead.
Unexpected WARNING/ERROR log records fail a test; tests that expect one use
`expect_log` or mark themselves `allow_log_errors`.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest

STRICT = os.environ.get("CI", "").lower() == "true" or os.environ.get("LAZYSNAP_STRICT") == "1"

_PREREQS = {
    "fuse": lambda: (
        None
        if os.path.exists("/dev/fuse") and shutil.which("fusermount3")
        else "needs /dev/fuse and fusermount3"
    ),
    "root": lambda: None if os.geteuid() == 0 else "needs root",
    "e2e": lambda: next(
        (
            f"needs {b} on PATH"
            for b in ("containerd", "ctr", "runc", "docker-registry")
            if shutil.which(b) is None
        ),
        None,
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_log_errors: the test expects WARNING/ERROR logs")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, check in _PREREQS.items():
        if item.get_closest_marker(name) is not None:
            reason = check()
            if reason:
                pytest.skip(f"[{name}] {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which must run every test: {reason}"


@pytest.fixture(autouse=True)
def _fail_on_unexpected_logs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    yield
    if request.node.get_closest_marker("allow_log_errors"):
        return
    bad = [
        r
        for r in caplog.get_records("call")
        if r.levelno >= logging.WARNING and not getattr(r, "expected", False)
    ]
    if bad:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)
        pytest.fail(f"unexpected log records:\n{lines}", pytrace=False)
