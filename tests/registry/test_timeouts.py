"""Never hang: real sockets to servers that stall, drip or die mid-body."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from snapshotter.digest import Digest
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import RegistryUnavailable
from snapshotter.registry.reference import Reference
from snapshotter.registry.retry import RetryPolicy

DIGEST = Digest.of(b"whatever")
TIMEOUT = 1.0
RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01, total_time=30.0)


Behaviour = Callable[[trio.SocketStream], object]


async def stall(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await trio.sleep_forever()


async def drip(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-99/100\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    for _ in range(100):
        await stream.send_all(b"x")
        await trio.sleep(TIMEOUT / 4)  # each read is quick; the whole is too slow


async def die_mid_body(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-99/100\r\n"
        b"Content-Length: 100\r\n\r\n" + b"x" * 10
    )
    await stream.aclose()


@pytest.fixture
async def serve(
    tmp_path: Path,
) -> AsyncIterator[Callable[[Behaviour], Awaitable[RegistryClient]]]:
    """Starts a raw TCP server with `behaviour` and returns a client pointed at it."""
    async with trio.open_nursery() as nursery:
        clients: list[RegistryClient] = []

        async def _start(behaviour: Behaviour) -> RegistryClient:
            async def handler(stream: trio.SocketStream) -> None:
                # the client giving up on us is the point of these tests
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await behaviour(stream)  # type: ignore[misc]

            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            host = f"127.0.0.1:{port}"
            (tmp_path / host).mkdir()
            (tmp_path / host / "hosts.toml").write_text(f'server = "http://{host}"\n')
            client = RegistryClient(
                hosts_dir=tmp_path,
                docker_config=tmp_path / "none.json",
                timeout=TIMEOUT,
                retry=RETRY,
            )
            clients.append(client)
            client.test_host = host  # type: ignore[attr-defined]
            return client

        yield _start
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("behaviour", [stall, drip, die_mid_body])
async def test_bounded_failure(serve, behaviour: Behaviour) -> None:  # type: ignore[no-untyped-def]
    client = await serve(behaviour)
    ref = Reference.parse(f"{client.test_host}/app:v1")
    start = trio.current_time()
    with pytest.raises(RegistryUnavailable):
        await client.read_blob_range(ref, DIGEST, 0, 100)
    elapsed = trio.current_time() - start
    # two attempts, each cut at TIMEOUT, plus scheduling slack
    assert elapsed < RETRY.max_attempts * TIMEOUT + 2.0
