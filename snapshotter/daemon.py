"""Composition root of `lazysnap serve`: wires config, core, service and (later) FUSE.

Threads and trio: the main thread runs `trio.run`, which owns signals and (with lazy
pulling) the FUSE repository mount; grpcio serves containerd from its own thread pool
and reaches trio only through `bridge.py`.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from snapshotter.config import Config
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.service.server import SnapshotServer

__all__ = ["run", "setup_logging"]

log = logging.getLogger("lazysnap")


def setup_logging(level: str) -> None:
    """Plain lines on stderr: journald adds its own timestamps, terminals get ours."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


async def _serve(cfg: Config) -> None:
    cfg.root.mkdir(parents=True, exist_ok=True)
    sn = Snapshotter(cfg.root)
    server = SnapshotServer(sn, cfg.address, mode=int(cfg.socket_mode, 8))
    try:
        server.start()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            log.info("lazysnap ready (root %s)", cfg.root)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                break
    finally:
        await trio.to_thread.run_sync(server.stop)
        sn.close()
        log.info("stopped")


def run(cfg: Config) -> None:
    trio.run(_serve, cfg)
