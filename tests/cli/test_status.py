"""`lazysnap status` on hand-written status files: the table, --json, and a clear error
whenever no daemon is running. The same command against a real daemon, after lazy pulls
and a fallback, runs in tests/e2e/test_lazy_auth.py (it shares that module's stack), and
after a clean stop and a `kill -9` in tests/e2e/test_lazy_restart.py."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from snapshotter.cli import EXIT_CODES, main
from snapshotter.errors import DataLoss, NotFound, PermissionDenied, Unavailable

IMAGE = "registry.example/team/app:v1"
LAZY = "sha256:" + "a" * 64
PATH = "sha256:" + "b" * 64
FELL = "sha256:" + "c" * 64


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "layers": [
            {"image_ref": IMAGE, "layer_digest": LAZY, "mode": "lazy", "path": "/r/repo/1",
             "size": 3 << 20, "bytes_fetched": 768 << 10, "percent_fetched": 25.0,
             "cache_hits": 7, "snapshots": 1, "error": ""},
            {"image_ref": IMAGE, "layer_digest": PATH, "mode": "path",
             "path": "/cvmfs/unpacked.cern.ch/.layers/bb/bbbb/layerfs", "size": 0,
             "bytes_fetched": 0, "percent_fetched": 0.0, "cache_hits": 0, "snapshots": 1,
             "error": ""},
        ],
        "fallbacks": [{"image_ref": IMAGE, "layer_digest": FELL, "reason": "no-toc-digest",
                       "detail": f"layer {FELL}: no toc digest"}],
        "fallback_counts": {"no-toc-digest": 1},
        "cache": {"entries": 3, "bytes": 768 << 10, "max_bytes": 10 << 30, "hits": 7,
                  "misses": 3, "evictions": 0},
        "time": time.time(),
        "pid": os.getpid(),
    }
    return doc | over


def _status(root: Path, *args: str) -> int:
    return main(["status", "--root", str(root), *args])


def _write(root: Path, doc: object) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "status.json").write_text(json.dumps(doc))


def test_text_has_a_line_per_layer_and_per_fallback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, _doc())
    assert _status(tmp_path) == 0
    header, lazy, path, fell, cache = capsys.readouterr().out.splitlines()
    assert header.split() == ["IMAGE", "LAYER", "MODE", "SIZE", "FETCHED", "%", "HITS"]
    assert lazy.split() == [IMAGE, LAZY[:19], "lazy", "3.0MiB", "768.0KiB", "25.0", "7"]
    assert path.split() == [IMAGE, PATH[:19], "path", "-", "-", "-", "-",
                            "/cvmfs/unpacked.cern.ch/.layers/bb/bbbb/layerfs"]
    assert fell.split()[:3] == [IMAGE, FELL[:19], "fallback:"]
    assert "no-toc-digest" in fell and fell.endswith(f"layer {FELL}: no toc digest")
    assert cache.startswith("cache: 768.0KiB of 10.0GiB in 3 chunks; hits 7, misses 3")


def test_json_is_the_status_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _doc()
    _write(tmp_path, doc)
    assert _status(tmp_path, "--json") == 0
    assert json.loads(capsys.readouterr().out) == doc


def test_an_unrestored_layer_shows_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _doc()
    doc["layers"][0] |= {"mode": "lazy (not restored)", "error": "registry unreachable"}
    _write(tmp_path, doc)
    assert _status(tmp_path) == 0
    assert "lazy (not restored)" in capsys.readouterr().out.splitlines()[1]


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("content", "category", "words"),
    [
        (None, NotFound, "lazysnap serve --root"),
        (_doc(time=time.time() - 3600), Unavailable, "not running"),
        ("dead-pid", Unavailable, "not running"),
        ("{not json", DataLoss, "not a status document"),
        ([1, 2], DataLoss, "not a status document"),
    ],
    ids=["missing", "stale", "dead-daemon", "garbage", "not-an-object"],
)
def test_no_running_daemon_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object,
    category: type[Exception], words: str,
) -> None:
    if content == "dead-pid":
        _write(tmp_path, _doc(pid=_exited_pid()))
    elif isinstance(content, str):
        (tmp_path / "status.json").write_text(content)
    elif content is not None:
        _write(tmp_path, content)
    assert _status(tmp_path) == EXIT_CODES[category]  # type: ignore[index]
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("lazysnap: ") and words in out.err
    assert str(tmp_path / "status.json") in out.err
    assert "Traceback" not in out.err


@pytest.mark.root
def test_unreadable_status_says_permission_denied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon keeps its root 0700; another user gets a message, not a traceback."""
    root = tmp_path / "root"
    _write(root, _doc())
    os.chmod(root, 0o700)
    os.seteuid(65534)  # nobody, for this call only (root may switch back)
    try:
        code = _status(root)
    finally:
        os.seteuid(0)
    assert code == EXIT_CODES[PermissionDenied]
    assert "permission denied" in capsys.readouterr().err


@pytest.mark.root
@pytest.mark.fuse
def test_daemon_survives_a_status_file_it_cannot_write(tmp_path: Path) -> None:
    """A full disk (here: a directory where the temp file goes) costs the status file,
    never the daemon; status works again once the file can be written."""
    from tests.e2e.harness import Lazysnap, remove_tree, unmount_under, wait_for

    sockdir = Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))
    daemon = Lazysnap(tmp_path / "daemon", str(sockdir / "lazysnap.sock"))
    blocker = daemon.root / "status.json.tmp"
    blocker.mkdir(parents=True)
    try:
        daemon.start()
        wait_for(lambda: "cannot write status file" in daemon.log_path.read_text(), 30,
                 "the daemon to report the status file")
        assert _status(daemon.root) == EXIT_CODES[NotFound]
        blocker.rmdir()
        wait_for(lambda: (daemon.root / "status.json").exists(), 30, "a status file")
        daemon.check_alive()
        assert _status(daemon.root) == 0
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        remove_tree(sockdir)
        leftovers = unmount_under(tmp_path)
    assert "Traceback" not in daemon.log_path.read_text()
    assert leftovers == []


def test_a_warmed_layer_shows_bytes_by_purpose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _doc()
    doc["layers"][0] |= {"prefetch": "landmark done", "prefetch_chunks": 3,
                         "background": "running", "bytes_prefetch": 512 << 10,
                         "bytes_background": 200 << 10, "bytes_on_demand": 56 << 10,
                         "demand_waits": 4, "demand_fetches": 3}
    _write(tmp_path, doc)
    assert _status(tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("    prefetch: landmark done (512.0KiB); background: running "
                        "(200.0KiB); on demand: 56.0KiB in 3 requests, 4 reads waited")


def test_the_toc_parser_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _doc()
    doc["toc_parser"] = {"worker_pid": 4242, "parsed_in_worker": 5, "parsed_in_daemon": 1}
    _write(tmp_path, doc)
    assert _status(tmp_path) == 0
    out = capsys.readouterr().out
    assert "toc parser: worker pid 4242; 5 parsed there, 1 in the daemon" in out
    doc["toc_parser"]["worker_pid"] = None
    _write(tmp_path, doc)
    assert _status(tmp_path) == 0
    assert "toc parser: no worker; 5 parsed there" in capsys.readouterr().out
