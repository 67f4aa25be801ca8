"""The proxy's counts are what the lazy-pull tests assert on, and its faults are what the
failure tests rely on: check both against a tiny echo server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.proxy import TcpProxy


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()
    stop.set()
    t.join(5)
    server.close()


def _roundtrip(proxy: TcpProxy, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_counts_bytes_in_each_direction(echo: tuple[str, int]) -> None:
    with TcpProxy(echo) as proxy:
        assert _roundtrip(proxy, b"x" * 100_000) == b"x" * 100_000
        time.sleep(0.05)
        counts = proxy.reset()
        assert (counts.up, counts.down, counts.connections) == (100_000, 100_000, 1)
        assert proxy.counts().down == 0


def test_refuse_closes_connections_and_forward_recovers(echo: tuple[str, int]) -> None:
    with TcpProxy(echo) as proxy:
        proxy.set_mode("refuse")
        assert _roundtrip(proxy, b"hello") == b""
        proxy.set_mode("forward")
        assert _roundtrip(proxy, b"hello") == b"hello"


def test_blackhole_stays_silent_until_forward(echo: tuple[str, int]) -> None:
    with TcpProxy(echo) as proxy:
        proxy.set_mode("blackhole")
        with pytest.raises(TimeoutError):
            _roundtrip(proxy, b"hello", timeout=0.5)
        proxy.set_mode("forward")
        assert _roundtrip(proxy, b"hello") == b"hello"


def test_bandwidth_limit_slows_transfers(echo: tuple[str, int]) -> None:
    with TcpProxy(echo, bandwidth=1_000_000) as proxy:
        started = time.monotonic()
        assert _roundtrip(proxy, b"y" * 500_000) == b"y" * 500_000
        assert time.monotonic() - started > 0.4
