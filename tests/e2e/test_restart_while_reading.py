"""A running container keeps reading lazily pulled files while lazysnap is killed (SIGKILL)
and restarted, and while it is stopped and started (what `systemctl restart` does).

The container checks sha256 of every data file in a loop and logs each result to a bind
mount. Every `sha256sum` opens its file, and through overlayfs each open reaches the FUSE
mount, so the loop waits on the repository while no daemon serves it; before each restart
the test also drops the files' cached pages, so reads reach the daemon too. Passing means:
no read failed, every hash is right, and the loop went on after each restart.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest

from snapshotter.fs.mount import mounted
from tests.e2e.conftest import DATA_FILES, data_sha256
from tests.e2e.estargz import EstargzImage
from tests.e2e.harness import Registry, wait_for
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

FILES = sorted(DATA_FILES)  # data/big-0.bin ...
_LOOP = """
cd /
while [ ! -e /out/stop ]; do
  for f in {files}; do
    if s=$(sha256sum "$f"); then echo "$(date +%s) $s" >> /out/reads
    else echo "$(date +%s) FAIL $f" >> /out/reads; fi
  done
done
touch /out/done
"""


def _reads(out: Path) -> list[str]:
    path = out / "reads"
    return path.read_text().splitlines() if path.exists() else []


def _evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next reads go to the daemon."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)  # nothing of the mount stays open here: restarts fork this process


def _more_reads(out: Path, than: int, what: str, timeout: float = 60.0) -> int:
    try:
        wait_for(lambda: len(_reads(out)) >= than + len(FILES), timeout, what, interval=0.1)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; the reader waits in:\n{_reader_stacks()}") from None
    return len(_reads(out))


def _reader_stacks() -> str:
    """Where the container's processes wait in the kernel: tells a lost FUSE request
    (request_wait_answer) from anything else."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "sha256sum":
                found.append(f"pid {entry.name}:\n{(entry / 'stack').read_text()}")
        except OSError:
            continue
    return "\n".join(found) or "(no sha256sum running)"


def test_reads_never_fail_while_the_daemon_is_killed_and_restarted(
    stack: Stack, registry: Registry, esgz_data: tuple[EstargzImage, EstargzImage],
    tmp_path: Path,
) -> None:
    assert stack.lazysnap is not None
    daemon = stack.lazysnap
    ref = esgz_data[0].ref(registry.host)
    stack.pull(ref, tool="ctr-remote", verb="rpull")
    out = tmp_path / "out"
    out.mkdir()
    loop = _LOOP.format(files=" ".join(f"/{f}" for f in FILES))
    stack.ctr("run", "--snapshotter", stack.snapshotter, "-d",
              "--mount", f"type=bind,src={out},dst=/out,options=rbind:rw",
              ref, "reader", "sh", "-c", loop)
    repo = daemon.root / "repo"
    layer = next(d for d in repo.iterdir() if (d / FILES[0]).exists())
    files = [layer / f for f in FILES]
    count = _more_reads(out, 0, "the container's first reads")

    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        _evict(files)
        time.sleep(0.2)  # the loop is reading again
        daemon.stop(sig)
        assert mounted(repo) == ["fuse.lazysnap"], "the mount went with the daemon"
        before = len(_reads(out))
        time.sleep(2.0)  # readers wait meanwhile; nothing fails
        paused = _reads(out)[before:]
        assert len(paused) <= len(FILES), f"the loop did not wait: {paused}"
        daemon.start()
        stack.wait_ready()
        count = _more_reads(out, len(_reads(out)), f"reads after {sig.name} and restart")

    (out / "stop").touch()
    wait_for((out / "done").exists, 60, "the reader loop to end")
    stack.ctr("tasks", "rm", "-f", "reader")
    stack.ctr("containers", "rm", "reader")

    lines = _reads(out)
    failed = [line for line in lines if "FAIL" in line]
    assert failed == [], failed
    want = {f"/{f}": data_sha256(f) for f in FILES}
    for line in lines:
        _, digest, path = line.split()
        assert digest == want[path], line
    assert len(lines) >= count
    log = daemon.log_path.read_text()
    assert log.count("took over the repository") == 3
    assert log.count("asked the kernel to resend") == 3
    assert "removing stale fuse" not in log
    stamps = [int(line.split()[0]) for line in lines]
    pause = max(b - a for a, b in itertools.pairwise(stamps))
    print(f"{len(lines)} reads, longest pause {pause} s")
