"""A loopback TCP proxy in front of the registry that counts bytes and can misbehave on purpose.

Tests measure what lazysnap fetched by pointing image references at the proxy; benchmarks use
its bandwidth and RTT shaping to look like a far-away registry. Faults are whole-link modes:
`refuse` (connections are closed at once) and `blackhole` (connections stay open, silent),
so "the registry went away mid-read" is one call, and `forward` brings it back.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

__all__ = ["Counts", "TcpProxy"]

_MODES = ("forward", "refuse", "blackhole")
_POLL = 0.1  # seconds: how quickly pumps notice a mode change or stop()
_BUF = 64 * 1024


@dataclass(frozen=True)
class Counts:
    """Bytes moved since the last reset: `down` is registry -> client (what was fetched)."""

    up: int
    down: int
    connections: int


class _Bucket:
    """Token bucket shared by all connections in one direction, like one network link."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            debt = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if debt:
            time.sleep(debt)


class TcpProxy:
    """Forward 127.0.0.1:<free port> to `upstream`, counting and optionally shaping traffic.

    `bandwidth` is bytes per second per direction (None: unlimited); `rtt` seconds of added
    round-trip time, paid half on each forwarded chunk in each direction.

        proxy = TcpProxy(("127.0.0.1", registry.port)).start()
        ... pull f"{proxy.host}/repo:tag" ...
        proxy.counts().down   # bytes the client received from the registry
        proxy.stop()
    """

    def __init__(
        self, upstream: tuple[str, int], bandwidth: float | None = None, rtt: float = 0.0
    ) -> None:
        self.upstream = upstream
        self.rtt = rtt
        self._buckets = {
            "up": _Bucket(bandwidth) if bandwidth else None,
            "down": _Bucket(bandwidth) if bandwidth else None,
        }
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._bytes = {"up": 0, "down": 0}
        self._connections = 0
        self._mode = "forward"
        self._generation = 0  # bumped when connections must be dropped
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()

    def start(self) -> TcpProxy:
        self._spawn(self._accept_loop)
        return self

    def counts(self) -> Counts:
        with self._lock:
            return Counts(self._bytes["up"], self._bytes["down"], self._connections)

    def reset(self) -> Counts:
        """Zero the counters; returns what they were."""
        with self._lock:
            before = Counts(self._bytes["up"], self._bytes["down"], self._connections)
            self._bytes = {"up": 0, "down": 0}
            self._connections = 0
        return before

    def set_mode(self, mode: str) -> None:
        """Switch fault mode; any switch drops open connections so clients start afresh."""
        if mode not in _MODES:
            raise ValueError(f"proxy mode {mode!r}: expected one of {_MODES}")
        with self._lock:
            self._mode = mode
            self._generation += 1
            doomed = list(self._sockets) if mode != "blackhole" else []
        for s in doomed:
            _close(s)

    def stop(self) -> None:
        self._stopped.set()
        _close(self._listener)
        with self._lock:
            doomed = list(self._sockets)
        for s in doomed:
            _close(s)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                mode, generation = self._mode, self._generation
            if mode == "refuse":
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._connections += 1
                self._sockets.update((client, server))
            for s in (client, server):
                s.settimeout(_POLL)
            self._spawn(self._pump, client, server, "up", generation)
            self._spawn(self._pump, server, client, "down", generation)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, gen: int) -> None:
        bucket = self._buckets[direction]
        try:
            while not self._stopped.is_set():
                with self._lock:
                    if self._generation != gen and self._mode != "blackhole":
                        return
                    frozen = self._mode == "blackhole"
                if frozen:
                    time.sleep(_POLL)
                    continue
                try:
                    data = src.recv(_BUF)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                if bucket is not None:
                    bucket.take(len(data))
                if self.rtt:
                    time.sleep(self.rtt / 2)
                with self._lock:
                    self._bytes[direction] += len(data)
                try:
                    dst.sendall(data)
                except OSError:
                    return
        finally:
            for s in (src, dst):
                with self._lock:
                    self._sockets.discard(s)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
