"""The gRPC server on a unix socket: ownership of the socket path, thread pool, stop."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from snapshotter.core.snapshotter import Snapshotter
from snapshotter.errors import AlreadyExists, InvalidArgument
from snapshotter.service._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from snapshotter.service.snapshots import SnapshotsServicer

__all__ = ["AddressInUse", "SnapshotServer", "bind_unix"]

log = logging.getLogger(__name__)

# Leave room for the "unix:" prefix; the kernel limit is 108 bytes including NUL.
_MAX_SOCKET_PATH = 107


class AddressInUse(AlreadyExists):
    """Another live process answers on our socket."""


def _claim(path: Path) -> None:
    """Remove a stale socket left by a crash, but never steal a live one."""
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        raise InvalidArgument(f"socket path {str(path)!r} is longer than {_MAX_SOCKET_PATH}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() or path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise AddressInUse(f"socket {path}: cannot tell whether it is in use: {exc}") from exc
    finally:
        probe.close()
    raise AddressInUse(f"socket {path} is in use by another process (is lazysnap running?)")


def bind_unix(server: grpc.Server, address: Path, mode: int) -> None:
    """Claim `address` (never stealing a live socket) and bind `server` to it.

    The socket is created under a umask giving exactly `mode`, so there is no window in
    which it is more open than asked.
    """
    _claim(address)
    old = os.umask(0o777 & ~mode)
    try:
        port = server.add_insecure_port(f"unix://{address}")
    finally:
        os.umask(old)
    if port == 0:
        raise AddressInUse(f"socket {address}: could not bind")


class SnapshotServer:
    def __init__(
        self, sn: Snapshotter, address: Path, *, mode: int = 0o660, workers: int = 16
    ) -> None:
        self.address = Path(address)
        self._mode = mode
        self._bound = False
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(sn), self._server)

    def start(self) -> None:
        bind_unix(self._server, self.address, self._mode)
        self._bound = True
        self._server.start()
        os.chmod(self.address, self._mode)
        log.info("serving containerd.services.snapshots.v1.Snapshots on %s", self.address)

    def stop(self, grace: float = 5.0) -> None:
        self._server.stop(grace).wait()
        # Only our own socket: a start that failed because another daemon owns the path
        # must leave that daemon reachable.
        if self._bound:
            self._bound = False
            with contextlib.suppress(FileNotFoundError):
                self.address.unlink()
