"""The daemon's control socket: local commands (`lazysnap prefetch`) run inside the
daemon that owns the chunk cache, so they share its cache, connections and quota.

Protocol, one connection per request: the client sends one JSON object on one line,
`{"op": "prefetch", ...}`; the server answers with JSON lines, any number of
`{"event": ...}` progress lines, then exactly one `{"result": {...}}` or
`{"error": {"category": "NotFound", "message": "..."}}`. The socket is mode 0600 in
the daemon's 0700 root: whoever can use it can already read the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from snapshotter import errors
from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.digest import Digest
from snapshotter.profiles import PROFILES_DIR, ProfileStore
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.remote.imageprefetch import FetchRange, ImagePrefetch, prefetch_images
from snapshotter.remote.profile import Profile

__all__ = [
    "CONTROL_SOCKET",
    "ControlServer",
    "Handler",
    "NoDaemon",
    "prefetch_handler",
    "prefetch_locally",
    "request",
]

log = logging.getLogger("lazysnap.control")

CONTROL_SOCKET = "control.sock"
MAX_REQUEST = 1 << 20
IDLE_TIMEOUT = 300.0  # a client waits this long for the next line before giving up

class NoDaemon(errors.Unavailable):
    """Nothing listens on the control socket: the daemon is not running."""


Send = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Send], Awaitable[dict[str, Any]]]
"""`await handler(request, send_event) -> result`; raises error categories."""


class ControlServer:
    """Serves `handlers` (by op name) on a unix socket until cancelled; removes it then."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)  # a dead daemon's socket; the cache lock is ours
        try:
            with _addressable(self.path) as address:
                await sock.bind(address)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._serve, [listener])
                task_status.started()
        finally:
            sock.close()
            self.path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                req = json.loads(await _read_line(stream))
                if not isinstance(req, dict):
                    raise errors.InvalidArgument("control request is not a JSON object")
                handler = self.handlers.get(str(req.get("op")))
                if handler is None:
                    raise errors.InvalidArgument(f"control request: unknown op {req.get('op')!r}")
            except (ValueError, errors.LazysnapError) as exc:
                await _send(stream, _error(exc))
                return
            lines, pending = trio.open_memory_channel[bytes](math.inf)

            def send(event: dict[str, Any]) -> None:
                lines.send_nowait(_line({"event": event}))

            async def run_handler() -> None:
                async with lines:
                    try:
                        result = await handler(req, send)
                    except errors.LazysnapError as exc:
                        lines.send_nowait(_error(exc))
                    except Exception as exc:
                        log.exception("control request %r failed", req.get("op"))
                        lines.send_nowait(_error(exc))
                    else:
                        lines.send_nowait(_line({"result": result}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_handler)
                async for line in pending:
                    if not await _send(stream, line):
                        # The client went away: its request's work goes with it.
                        nursery.cancel_scope.cancel()
                        break


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """`path` as a unix socket address: sun_path holds 107 bytes, deep roots (test trees)
    need more, so reach long ones through their directory's /proc/self/fd link."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    with trio.fail_after(10):
        while b"\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                break
            buf += data
            if len(buf) > MAX_REQUEST:
                raise errors.InvalidArgument("control request too large")
    return bytes(buf).split(b"\n", 1)[0]


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def _error(exc: BaseException) -> bytes:
    cat = errors.category(exc) if isinstance(exc, errors.LazysnapError) else None
    if cat is None and isinstance(exc, ValueError):
        cat = errors.InvalidArgument
    return _line({"error": {"category": (cat or errors.Unavailable).__name__,
                            "message": str(exc)}})


async def _send(stream: trio.SocketStream, line: bytes) -> bool:
    try:
        await stream.send_all(line)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


_CATEGORIES: dict[str, type[errors.LazysnapError]] = {
    c.__name__: c for c in (
        errors.NotFound, errors.AlreadyExists, errors.FailedPrecondition,
        errors.InvalidArgument, errors.Unavailable, errors.NotImplementedYet,
        errors.PermissionDenied, errors.DataLoss, errors.ClosedError,
    )
}


def request(
    path: Path, doc: dict[str, Any], on_event: Callable[[dict[str, Any]], None] | None = None,
    *, idle_timeout: float = IDLE_TIMEOUT,
) -> dict[str, Any]:
    """Send one request to the daemon at `path` (blocking); events go to `on_event`.

    Raises Unavailable if nobody listens there (FileNotFoundError/ConnectionRefused are
    the causes), and the daemon's error as its category otherwise.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(idle_timeout)
        try:
            with _addressable(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoDaemon(f"{path}: no daemon listening") from exc
        except PermissionError:
            raise errors.PermissionDenied(f"{path}: permission denied (run as the daemon's "
                                          "user)") from None
        sock.sendall(_line(doc))
        reader = sock.makefile("rb")
        try:
            for raw in reader:
                msg = json.loads(raw)
                if "event" in msg:
                    if on_event is not None:
                        on_event(msg["event"])
                elif "result" in msg:
                    return dict(msg["result"])
                elif "error" in msg:
                    err = msg["error"]
                    raise _CATEGORIES.get(err.get("category"), errors.Unavailable)(
                        err.get("message", "daemon error"))
        except TimeoutError:
            raise errors.Unavailable(f"{path}: daemon silent for {idle_timeout:g}s") from None
        except ValueError as exc:
            raise errors.DataLoss(f"{path}: malformed answer: {exc}") from None
    raise errors.Unavailable(f"{path}: daemon closed the connection without an answer")


# -- the prefetch op --------------------------------------------------------------------


def _prefetch_how(
    cfg: Config, client: RegistryClient, cache: ChunkCache, req: dict[str, Any], send: Send,
    fetcher: Callable[[Reference, Digest], FetchRange] | None = None,
) -> tuple[list[str], ImagePrefetch]:
    images = req.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise errors.InvalidArgument("prefetch: 'images' must be a non-empty list of names")
    how = ImagePrefetch(
        client=client, cache=cache, whole=bool(req.get("all")), size=cfg.prefetch_bytes,
        parallel=cfg.prefetch_parallel, per_host=cfg.max_connections_per_host,
        timeout=cfg.fetch_timeout,
        max_toc_bytes=cfg.max_toc_bytes, max_toc_entries=cfg.max_toc_entries,
        fetcher=fetcher, on_event=send, profiles=_stored_profiles(cfg),
    )
    return images, how


def _stored_profiles(cfg: Config) -> Callable[[str], Profile | None]:
    store = ProfileStore(cfg.root / PROFILES_DIR)

    def load(manifest: str) -> Profile | None:
        try:
            return store.load(manifest)
        except errors.InvalidArgument as exc:  # a hint only: plan without it
            log.warning("prefetch: stored profile of %s not used: %s", manifest, exc)
            return None

    return load


def prefetch_handler(
    cfg: Config, client: RegistryClient, cache: ChunkCache,
    fetcher: Callable[[Reference, Digest], FetchRange] | None = None,
) -> Handler:
    """The daemon's "prefetch" op: `{"op": "prefetch", "images": [...], "all": false}`."""

    async def handle(req: dict[str, Any], send: Send) -> dict[str, Any]:
        images, how = _prefetch_how(cfg, client, cache, req, send, fetcher)
        summary = await prefetch_images(images, how)
        log.info("prefetch of %s: %s", ", ".join(images), summary)
        return summary.as_dict()

    return handle


def prefetch_locally(
    cfg: Config, images: list[str], whole: bool, on_event: Send
) -> dict[str, Any]:
    """The prefetch op with no daemon running: open the cache directly (its lock makes
    this fail with CacheInUse if a daemon without a control socket holds it)."""

    async def main() -> dict[str, Any]:
        client = RegistryClient(
            hosts_dir=cfg.hosts_dir,
            docker_config=Path(cfg.docker_config) if cfg.docker_config else None,
            timeout=cfg.fetch_timeout,
        )
        try:
            with ChunkCache(cfg.root / "cache", cfg.cache_bytes) as cache:
                req = {"images": images, "all": whole}
                images_, how = _prefetch_how(cfg, client, cache, req, on_event)
                return (await prefetch_images(images_, how)).as_dict()
        finally:
            await client.aclose()

    return trio.run(main)
