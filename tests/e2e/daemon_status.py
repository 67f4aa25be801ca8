"""The daemon's `<root>/status.json` as e2e tests read it: what lazysnap says it serves.

The daemon rewrites the file every couple of seconds, so a test that has just pulled or
run something waits for a document written after that moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import REPO_ROOT

__all__ = ["layer_rows", "status_after", "status_cli"]


def status_after(root: Path, moment: float, timeout: float = 15.0) -> dict[str, Any]:
    """The first status document the daemon wrote after `moment` (a `time.time()`)."""
    path = root / "status.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            doc = {}
        if doc.get("time", 0) > moment:
            return doc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no status written after {moment} within {timeout}s")
        time.sleep(0.1)


def layer_rows(doc: dict[str, Any], digests: list[str]) -> dict[str, dict[str, Any]]:
    """The status rows of these layer digests, by digest (missing ones are absent)."""
    return {row["layer_digest"]: row for row in doc["layers"] if row["layer_digest"] in digests}


def status_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lazysnap status --root <root> [args]` as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", "status", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
