"""A shaped loopback link to the registry: bandwidth shared by all connections, added RTT.

`tests/e2e/proxy.py` pays its RTT on every 64 KiB it forwards, which is right for "is the
link slow" tests but caps one bulk transfer near 50 Mbit/s whatever the bandwidth, and its
bucket lets a full second of bandwidth through in a burst after an idle gap. A benchmark
needs the link to behave like a WAN path, so here each direction is a delay line: bytes
enter a queue stamped `now + rtt/2`, leave no earlier than that, and serialise through one
token bucket per direction with a small burst. Throughput of a single connection is then
the bandwidth, and a request/response costs one RTT, as on a real path.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from dataclasses import dataclass

from tests.e2e.proxy import Counts

__all__ = ["CONDITIONS", "Condition", "Counts", "ShapedLink"]

_BUF = 64 * 1024
_QUEUE_BYTES = 2 * 1024 * 1024  # bounds memory and gives the sender backpressure
_POLL = 0.2


@dataclass(frozen=True)
class Condition:
    """A network condition: `bandwidth` in bytes/s per direction (None: unlimited)."""

    name: str
    bandwidth: float | None
    rtt: float

    def describe(self) -> str:
        if self.bandwidth is None and not self.rtt:
            return "loopback, unshaped"
        bw = f"{self.bandwidth * 8 / 1e6:.0f} Mbit/s" if self.bandwidth else "unlimited"
        return f"{bw}, {self.rtt * 1000:.0f} ms RTT"


CONDITIONS = {
    "unshaped": Condition("unshaped", None, 0.0),
    "100mbit-20ms": Condition("100mbit-20ms", 100e6 / 8, 0.020),
}


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        # A few ms of burst: enough to not stall on scheduling jitter, too little to hide
        # the bandwidth after an idle gap.
        self.burst = max(_BUF, rate * 0.005)
        self.tokens = self.burst
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
            # Reserve the time under the lock: the next taker queues behind us.
        if wait:
            time.sleep(wait)


class _Pipe:
    """One direction of one connection: reader stamps chunks, writer releases them on time."""

    def __init__(self, link: ShapedLink, src: socket.socket, dst: socket.socket,
                 direction: str) -> None:
        self.link, self.src, self.dst, self.direction = link, src, dst, direction
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.eof = False

    def read_loop(self) -> None:
        try:
            while not self.link.stopped.is_set():
                with self.cond:
                    while self.queued > _QUEUE_BYTES and not self.link.stopped.is_set():
                        self.cond.wait(_POLL)
                try:
                    data = self.src.recv(_BUF)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                with self.cond:
                    self.queue.append((time.monotonic() + self.link.rtt / 2, data))
                    self.queued += len(data)
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def write_loop(self) -> None:
        bucket = self.link.buckets[self.direction]
        try:
            while not self.link.stopped.is_set():
                with self.cond:
                    while not self.queue and not self.eof:
                        self.cond.wait(_POLL)
                        if self.link.stopped.is_set():
                            return
                    if not self.queue:
                        with contextlib.suppress(OSError):
                            self.dst.shutdown(socket.SHUT_WR)
                        return
                    due, data = self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if bucket is not None:
                    bucket.take(len(data))
                try:
                    self.dst.sendall(data)
                except OSError:
                    return
                self.link.count(self.direction, len(data))
        finally:
            self.link.forget(self.src, self.dst)


class ShapedLink:
    """127.0.0.1:<port> -> `upstream`, shaped by `condition`, counting bytes each way.

        with ShapedLink(("127.0.0.1", registry.port), CONDITIONS["100mbit-20ms"]) as link:
            ... pull f"{link.host}/repo:tag" ...
            link.counts().down  # bytes delivered from the registry to the client
    """

    def __init__(self, upstream: tuple[str, int], condition: Condition) -> None:
        self.upstream = upstream
        self.condition = condition
        self.rtt = condition.rtt
        bw = condition.bandwidth
        self.buckets = {"up": _Bucket(bw) if bw else None, "down": _Bucket(bw) if bw else None}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._bytes = {"up": 0, "down": 0}
        self._connections = 0
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def count(self, direction: str, n: int) -> None:
        with self._lock:
            self._bytes[direction] += n

    def counts(self) -> Counts:
        with self._lock:
            return Counts(self._bytes["up"], self._bytes["down"], self._connections)

    def reset(self) -> Counts:
        with self._lock:
            before = Counts(self._bytes["up"], self._bytes["down"], self._connections)
            self._bytes = {"up": 0, "down": 0}
            self._connections = 0
        return before

    def forget(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._sockets.discard(s)

    def start(self) -> ShapedLink:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self.stopped.set()
        _close(self._listener)
        with self._lock:
            doomed = list(self._sockets)
        for s in doomed:
            _close(s)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> ShapedLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _close(client)
                continue
            for s in (client, server):
                # Blocking: a slow reader must not time a send out; stop() unblocks by
                # shutting the sockets down.
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += 1
                self._sockets.update((client, server))
            for pipe in (_Pipe(self, client, server, "up"), _Pipe(self, server, client, "down")):
                self._spawn(pipe.read_loop)
                self._spawn(pipe.write_loop)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
