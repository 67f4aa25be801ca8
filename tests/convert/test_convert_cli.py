"""`lazysnap convert` as a process: Ctrl-C ends it with 130 and leaves no temp data."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.convert.layouts import image_docs, write_image
from tests.e2e.images import Entry, Layer

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_interrupt_exits_130_and_removes_temp_data(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(48 << 20)
    write_image(tmp_path / "src", image_docs([Layer((Entry("big", data=data),))]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapshotter", "convert", "--tmp-dir", str(scratch),
         f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(scratch.rglob("*.esgz")):  # converting: the output file exists
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "conversion never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "dst/index.json").exists()
