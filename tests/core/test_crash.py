"""kill -9 at arbitrary points, then a restart: the store must pass the consistency check."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapshotter.core.metastore import check_consistency
from snapshotter.core.snapshotter import Snapshotter

_WORKLOAD = r"""
import itertools, sys
from pathlib import Path
from snapshotter.core.snapshotter import Snapshotter
from snapshotter import errors
sn = Snapshotter(Path(sys.argv[1]))
print("ready", flush=True)
for i in itertools.count():
    k = f"k{i}"
    parent = f"c{i-1}" if i % 5 else ""
    try:
        m = sn.prepare(k, parent if i else "")
        sn.commit(f"c{i}", k)
        if i % 3 == 0:
            sn.view(f"v{i}", f"c{i}")
            sn.remove(f"v{i}")
        if i % 7 == 6:
            sn.prepare(f"x{i}", f"c{i}")
            sn.remove(f"x{i}")
    except (errors.NotFound, errors.InvalidArgument):
        pass
"""


@pytest.mark.slow
def test_kill9_anywhere_leaves_a_consistent_store(tmp_path: Path) -> None:
    root = tmp_path / "root"
    rng = random.Random(1234)
    for round_ in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKLOAD, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.01, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        sn = Snapshotter(root)  # recovery runs here
        try:
            assert check_consistency(root) == [], f"round {round_}"
            assert sn.walk(), "the workload made progress"
        finally:
            sn.close()
