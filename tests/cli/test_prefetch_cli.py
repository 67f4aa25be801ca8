"""`lazysnap prefetch`: asks a running daemon over its control socket and prints what
happened; with no daemon it opens the cache itself, and refuses when someone else holds
it. The real thing against a daemon, registry and containerd is tests/e2e/test_prefetch.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.cache.chunks import ChunkCache
from snapshotter.cli import EXIT_CODES, main
from snapshotter.control import CONTROL_SOCKET, ControlServer
from snapshotter.errors import FailedPrecondition, NotFound, Unavailable

SUMMARY = {"images": 1, "layers": 2, "skipped": 1, "bytes_fetched": 3 << 20,
           "bytes_cached": 1 << 20, "bytes_over_quota": 0, "failed_chunks": 0, "seconds": 1.25}


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'hosts_dir = "{tmp_path / "certs.d"}"\nfetch_timeout = 2.0\n')
    return cfg


async def test_asks_the_daemon_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asked: list[dict[str, Any]] = []

    async def handler(req: dict[str, Any], send: Any) -> dict[str, Any]:
        asked.append(req)
        send({"event": "layer", "image": "r/app:v1", "layer": "sha256:" + "a" * 64,
              "reason": "landmark", "total": 100, "cached": 0})
        send({"event": "skip", "image": "r/app:v1", "layer": "sha256:" + "c" * 64,
              "reason": "no TOC digest annotation (not eStargz)"})
        send({"event": "layer-done", "layer": "sha256:" + "a" * 64, "fetched": 100,
              "failed": 0})
        return SUMMARY

    async with trio.open_nursery() as nursery:
        await nursery.start(ControlServer(tmp_path / CONTROL_SOCKET, {"prefetch": handler}).run)
        argv = ["prefetch", "--root", str(tmp_path), "--config", str(_config(tmp_path)),
                "--all", "r/app:v1"]
        code = await trio.to_thread.run_sync(main, argv)
        nursery.cancel_scope.cancel()
    assert code == 0
    assert asked == [{"op": "prefetch", "images": ["r/app:v1"], "all": True}]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("r/app:v1 sha256:cccccccccccc: skipped (no TOC digest")
    assert lines[1] == "r/app:v1 sha256:aaaaaaaaaaaa: landmark, 100B fetched"
    assert lines[2] == ("prefetched 2 layers of 1 images in 1.2s: 3.0MiB fetched, 1.0MiB "
                        "already cached, 1 layers skipped")


async def test_daemon_errors_keep_their_category(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def handler(req: dict[str, Any], send: Any) -> dict[str, Any]:
        raise NotFound("image r/app:nope: not found")

    async with trio.open_nursery() as nursery:
        await nursery.start(ControlServer(tmp_path / CONTROL_SOCKET, {"prefetch": handler}).run)
        argv = ["prefetch", "--root", str(tmp_path), "--config", str(_config(tmp_path)),
                "r/app:nope"]
        code = await trio.to_thread.run_sync(main, argv)
        nursery.cancel_scope.cancel()
    assert code == EXIT_CODES[NotFound]
    assert "image r/app:nope: not found" in capsys.readouterr().err


def test_without_a_daemon_a_held_cache_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ChunkCache(tmp_path / "cache", 1 << 20):  # a daemon without a control socket
        code = main(["prefetch", "--root", str(tmp_path), "--config", str(_config(tmp_path)),
                     "127.0.0.1:1/app:v1"])
    assert code == EXIT_CODES[FailedPrecondition]
    assert "holds the cache" in capsys.readouterr().err


@pytest.mark.allow_log_errors
def test_without_a_daemon_the_cache_is_opened_directly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens on port 1: the registry is unreachable, which shows the command went
    # on to the registry itself with the cache opened (and closed again) here.
    code = main(["prefetch", "--root", str(tmp_path), "--config", str(_config(tmp_path)),
                 "127.0.0.1:1/app:v1"])
    assert code == EXIT_CODES[Unavailable], capsys.readouterr()
    assert (tmp_path / "cache").is_dir()
    with ChunkCache(tmp_path / "cache", 1 << 20):  # released again
        pass


def test_progress_bars_follow_the_events() -> None:
    from snapshotter.cli.prefetch import _Bars

    layer = "sha256:" + "a" * 64
    with _Bars() as bars:
        bars({"event": "layer", "image": "r/app:v1", "layer": layer, "reason": "all",
              "total": 1000, "cached": 100})
        task = bars.tasks[layer]
        bars({"event": "progress", "layer": layer, "done": 600})
        assert bars.progress.tasks[task].completed == 600
        bars({"event": "skip", "image": "r/app:v1", "layer": "sha256:" + "b" * 64,
              "reason": "not eStargz"})
        bars({"event": "layer-done", "layer": layer, "fetched": 900, "failed": 0})
        assert bars.progress.tasks[task].completed == 1000
