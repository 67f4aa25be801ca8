"""Keeping the repository's FUSE connection alive while no daemon serves it.

A holder process keeps a duplicate of the `/dev/fuse` descriptor. While any descriptor of
a FUSE connection is open the kernel keeps the mount and queues requests (readers pause)
instead of failing them; the next daemon fetches the descriptor from the holder and
serves the same connection (see `fs.mount.run_repository`). Stdlib only: the holder
imports nothing else, so a daemon upgrade or a broken dependency cannot break it.

Wire protocol on the holder's unix socket: one request per connection, one datagram-like
message each way on a SOCK_STREAM socket (small JSON; the descriptor travels as
SCM_RIGHTS). Requests: {"op": "ping"}, {"op": "get"}, {"op": "put", "init": hex,
"device": "0:52"} with the descriptor attached. Every answer carries the holder's "pid".
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from snapshotter.errors import Unavailable

__all__ = [
    "HOLDER_SOCKET",
    "Held",
    "HolderUnavailable",
    "deposit",
    "ensure_holder",
    "fetch",
    "holder_pid",
    "resend_pending",
    "serve_holder",
]

log = logging.getLogger("lazysnap.holder")

HOLDER_SOCKET = "fuse-holder.sock"  # under the daemon's root
_MAX_MESSAGE = 1 << 16
_FUSE_NOTIFY_RESEND = 7  # include/uapi/linux/fuse.h, kernel >= 6.9 (protocol 7.40)


class HolderUnavailable(Unavailable):
    """No holder answers on the socket, or it answered nonsense."""


@dataclass(frozen=True, slots=True)
class Held:
    """A live FUSE connection as the holder keeps it.

    `fd` is a descriptor of the connection's `/dev/fuse` file (the caller owns and closes
    it); `init` is the kernel's FUSE_INIT request as read from it at mount time (libfuse
    needs an INIT before it answers anything, and the kernel sends only one per mount);
    `device` is the mount's "major:minor", to check that it is still the mount at the
    mountpoint.
    """

    fd: int
    init: bytes
    device: str


def _send(sock: socket.socket, doc: dict[str, object], fd: int | None = None) -> None:
    rights = [] if fd is None else [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sock.sendmsg([json.dumps(doc).encode()], rights)


def _receive(sock: socket.socket) -> tuple[dict[str, object], int | None]:
    data, ancdata, _, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    for extra in fds[1:]:  # never leak what a confused peer sent along
        os.close(extra)
    if not data:
        if fds:
            os.close(fds[0])
        raise HolderUnavailable("fuse holder closed the connection without answering")
    return json.loads(data), (fds[0] if fds else None)


def _ask(path: Path, doc: dict[str, object], fd: int | None = None,
         timeout: float = 5.0) -> tuple[dict[str, object], int | None]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            _send(sock, doc, fd)
            return _receive(sock)
        except (OSError, ValueError) as exc:
            raise HolderUnavailable(f"fuse holder at {str(path)!r}: {exc}") from exc


def holder_pid(path: Path) -> int | None:
    """The pid of the holder listening at `path`, or None when none answers."""
    try:
        answer, _ = _ask(path, {"op": "ping"}, timeout=2.0)
    except HolderUnavailable:
        return None
    return int(answer["pid"])  # type: ignore[call-overload]


def fetch(path: Path) -> Held | None:
    """The connection the holder at `path` keeps, or None (no holder, or it holds none)."""
    if not os.path.exists(path):
        return None
    try:
        answer, fd = _ask(path, {"op": "get"})
    except HolderUnavailable as exc:
        log.info("%s", exc)
        return None
    if fd is None:
        return None
    return Held(fd, bytes.fromhex(str(answer["init"])), str(answer["device"]))


def deposit(path: Path, held: Held) -> None:
    """Give the holder at `path` a duplicate of `held.fd` (it replaces what it had)."""
    answer, _ = _ask(path, {"op": "put", "init": held.init.hex(), "device": held.device},
                     fd=held.fd)
    if not answer.get("ok"):
        raise HolderUnavailable(f"fuse holder at {str(path)!r} refused the connection")


def ensure_holder(path: Path, timeout: float = 10.0) -> int:
    """The pid of a holder at `path`, starting one first if none answers.

    The holder runs in a session of its own and is reparented away from the daemon
    (`setsid -f`), so neither a SIGKILL of the daemon nor of its process group reaches
    it, and no zombie is left behind when it exits.
    """
    pid = holder_pid(path)
    if pid is not None:
        return pid
    argv = [sys.executable, "-m", "snapshotter.fs.handoff", os.fspath(path)]
    subprocess.run(["setsid", "-f", *argv], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, cwd="/", timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = holder_pid(path)
        if pid is not None:
            log.info("started fuse holder (pid %d) at %s", pid, path)
            return pid
        time.sleep(0.05)
    raise HolderUnavailable(f"fuse holder at {str(path)!r} did not start within {timeout:g} s")


def resend_pending(fd: int) -> bool:
    """Ask the kernel to queue again every request a dead daemon read but never answered.

    Without it a reader whose request was in flight when the daemon died waits forever.
    False if the kernel does not know FUSE_NOTIFY_RESEND (before Linux 6.9).
    """
    header = struct.pack("<IiQ", 16, _FUSE_NOTIFY_RESEND, 0)  # len, notify code, unique 0
    try:
        os.write(fd, header)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


# -- the holder process ---------------------------------------------------------------------


def _notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: lets a Type=notify unit order the daemon after us."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class _Holder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.init = ""
        self.device = ""

    def drop(self, why: str) -> None:
        if self.fd is not None:
            log.info("releasing fuse connection %s: %s", self.device, why)
            os.close(self.fd)
            self.fd = None

    def answer(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        request, fd = _receive(conn)
        op = request.get("op")
        reply: dict[str, object] = {"pid": os.getpid(), "ok": True}
        if op == "put" and fd is not None:
            self.drop("replaced")
            self.fd, self.init, self.device = fd, str(request["init"]), str(request["device"])
            log.info("holding fuse connection %s", self.device)
            fd = None
        elif op == "get" and self.fd is not None:
            reply.update(init=self.init, device=self.device)
            _send(conn, reply, self.fd)
            return
        elif op not in ("ping", "get"):
            reply["ok"] = False
        if fd is not None:
            os.close(fd)
        _send(conn, reply)


def serve_holder(path: Path) -> int:
    """Run a holder at `path` until its socket file goes or the connection dies.

    It exits when the socket file is removed or replaced (the root is gone), when the
    connection it holds is aborted (unmounted), or on SIGTERM. Exit code 0 also when
    another holder answers at `path` already.
    """
    if holder_pid(path) is not None:
        log.info("a fuse holder answers at %s already", path)
        _notify_systemd("READY=1")  # nothing to wait for: that holder is ready
        return 0
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.fspath(path))
    os.chmod(path, 0o600)  # the descriptor lets its holder serve any file under the mount
    listener.listen(8)
    inode = os.stat(path).st_ino
    holder = _Holder(path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C meant the daemon
    _notify_systemd("READY=1")
    try:
        while True:
            poller = select.poll()
            poller.register(listener, select.POLLIN)
            if holder.fd is not None:
                poller.register(holder.fd, 0)  # /dev/fuse reports POLLERR once aborted
            for fd, events in poller.poll(1000):
                if fd == holder.fd and events & (select.POLLERR | select.POLLHUP):
                    holder.drop("the connection was aborted or unmounted")
                    return 0
                if fd == listener.fileno():
                    conn, _ = listener.accept()
                    with conn, contextlib.suppress(OSError, ValueError, HolderUnavailable):
                        holder.answer(conn)
            try:
                if os.stat(path).st_ino != inode:
                    return 0
            except FileNotFoundError:
                return 0
    finally:
        holder.drop("holder exits")
        listener.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m snapshotter.fs.handoff SOCKET", file=sys.stderr)
        return 64
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    return serve_holder(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
