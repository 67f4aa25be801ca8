"""Composition root of `lazysnap serve`: wires config, core, service, FUSE and registry.

Threads and trio: the main thread runs `trio.run`, which owns signals, the FUSE
repository mount, registry fetches and the chunk cache; grpcio serves containerd from its
own thread pool and reaches trio only through `bridge.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from snapshotter import metrics
from snapshotter.bridge import FuseRemoteLayers, find_in_roots
from snapshotter.cache.chunks import ChunkCache
from snapshotter.cli.status import STATUS_FILE
from snapshotter.config import Config
from snapshotter.control import CONTROL_SOCKET, ControlServer, prefetch_handler
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.cri import CredentialStore, ImageServiceProxy
from snapshotter.fs.handoff import HOLDER_SOCKET
from snapshotter.fs.mount import run_repository
from snapshotter.fs.repository import Repository
from snapshotter.profiles import start_layer_hooks
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.tls import ssl_context
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.warm import HostPool
from snapshotter.service.server import SnapshotServer

__all__ = ["run", "setup_logging"]

log = logging.getLogger("lazysnap")

STATUS_INTERVAL = 2.0
TOC_TRIM_INTERVAL = 600.0  # seconds between trims of the TOC store (and one at start)
# The threads that wait on the outside world (the trio loop serving FUSE and sockets, the
# gRPC handlers) share the interpreter with threads that inflate, verify and store chunks.
# Each time a waiting thread wants the interpreter back, CPython may make it wait a whole
# switch interval behind a busy one: at the default 5 ms, a Prepare's metadata commit (a
# dozen such hand-backs) took 20-60 ms while a cold start's chunks arrived, ~15 ms at 1 ms;
# pyslim's pull 0.68 -> 0.62 s (11 alternating pairs), pystack's 1.42 -> 1.20 s (4 pairs).
SWITCH_INTERVAL = 0.001


def setup_logging(level: str) -> None:
    """Plain lines on stderr: journald adds its own timestamps, terminals get ours."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    # httpx logs every request at INFO; one line per chunk is noise for an operator.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


def _write_status(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


async def _status_loop(
    cfg: Config, remote: FuseRemoteLayers | None, cache: ChunkCache,
    store: CredentialStore | None = None,
) -> None:
    path = cfg.root / STATUS_FILE
    failing = False
    while True:
        doc: dict[str, Any] = remote.status() if remote is not None else {"layers": []}
        if store is not None:
            # Which images have kubelet's credentials, and until when; never the secrets.
            doc["credentials"] = [dataclasses.asdict(e) for e in store.entries()]
        stats = cache.statistics()
        doc["cache"] = {
            "entries": stats.entries, "bytes": stats.bytes, "max_bytes": cache.max_bytes,
            "hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions,
        }
        doc["time"] = time.time()
        doc["pid"] = os.getpid()
        try:
            await trio.to_thread.run_sync(_write_status, path, doc)
        except OSError as exc:
            # A full disk must not stop the daemon: every lazy container depends on it.
            if not failing:
                log.warning("cannot write status file %s: %s", path, exc)
            failing = True
        else:
            if failing:
                log.info("status file %s written again", path)
            failing = False
        await trio.sleep(STATUS_INTERVAL)


async def _trim_tocs_loop(remote: FuseRemoteLayers) -> None:
    while True:
        try:
            files, freed = await trio.to_thread.run_sync(remote.trim_tocs)
        except OSError as exc:
            log.warning("toc store: not trimmed: %s", exc)
        else:
            if files:
                log.info("toc store: removed %d TOCs of layers no snapshot uses (%d bytes)",
                         files, freed)  # fmt: skip
        await trio.sleep(TOC_TRIM_INTERVAL)


async def _serve(cfg: Config) -> None:
    cfg.root.mkdir(parents=True, exist_ok=True)
    cache = ChunkCache(cfg.root / "cache", cfg.cache_bytes)
    # Credentials kubelet sent through the CRI proxy win over docker's config.json.
    store = None
    if cfg.cri_proxy_address:
        store = CredentialStore(cfg.root / "cri", cfg.credentials_ttl)
    client = RegistryClient(
        hosts_dir=cfg.hosts_dir,
        docker_config=Path(cfg.docker_config) if cfg.docker_config else None,
        timeout=cfg.fetch_timeout,
        extra_credentials=store,
    )
    ssl_context(None)  # the CA bundle, parsed now rather than in the first lazy Prepare
    server: SnapshotServer | None = None
    proxy: ImageServiceProxy | None = None
    sn: Snapshotter | None = None
    metrics.watch_cache(cache.statistics)
    metrics_server: metrics.MetricsServer | None = None
    try:
        if cfg.metrics_address:
            metrics_server = metrics.serve(cfg.metrics_address)
        # Signals are queued from the start: a SIGTERM during a long restore then stops
        # the daemon cleanly once it is up, instead of killing it with the mount in place.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                remote = None
                # The repository mount outlives the daemon (a holder process keeps it, see
                # fs/handoff.py); a restarted daemon takes it over and must re-attach the
                # layers before it answers the kernel, whose requests wait meanwhile.
                restored = trio.Event()
                if cfg.lazy:
                    repo = Repository(readahead_bytes=cfg.readahead_bytes,
                                      fetch_window=cfg.fetch_window_bytes)
                    await nursery.start(
                        partial(run_repository, read_timeout=cfg.read_timeout,
                                holder=cfg.root / HOLDER_SOCKET, serve_after=restored,
                                listing_entries=cfg.listing_entries),
                        cfg.root / "repo", repo,
                    )
                    # Every range request to a registry host, whoever makes it, shares
                    # one bound (`max_connections_per_host`).
                    hosts = HostPool(cfg.max_connections_per_host)
                    ahead: dict[str, RemoteBlob] = {}  # profiles' blobs, adopted on attach
                    hooks = await start_layer_hooks(nursery, cfg, repo, client, cache,
                                                    restored=restored,
                                                    fetcher=_fetcher(client, hosts),
                                                    elsewhere=partial(_in_roots, cfg),
                                                    blobs=ahead)
                    remote = FuseRemoteLayers(
                        cfg, repository=repo, client=client, cache=cache,
                        token=trio.lowlevel.current_trio_token(), hooks=hooks, hosts=hosts,
                        blobs=ahead,
                    )
                    # Before restore: restored layers resume their background fetch.
                    await nursery.start(remote.warmer.run)
                    await nursery.start(remote.tocs_ahead.run)
                    await nursery.start(remote.toc_parser.run)
                    metrics.watch_layers(
                        partial(_layer_rows, remote, trio.lowlevel.current_trio_token()))
                # In a worker thread: recovery restores remote layers through the bridge,
                # which calls back into this trio loop.
                sn = await trio.to_thread.run_sync(lambda: Snapshotter(cfg.root, remote=remote))
                restored.set()
                if remote is not None:
                    remote.restore_done()
                    # After the restore, which reads the stored TOCs.
                    nursery.start_soon(_trim_tocs_loop, remote)
                server = SnapshotServer(sn, cfg.address, mode=int(cfg.socket_mode, 8))
                server.start()
                if store is not None:
                    proxy = ImageServiceProxy(Path(cfg.cri_proxy_address), cfg.containerd_address,
                                              store, mode=int(cfg.socket_mode, 8))
                    proxy.start()
                nursery.start_soon(_status_loop, cfg, remote, cache, store)
                await nursery.start(ControlServer(cfg.root / CONTROL_SOCKET, {
                    "prefetch": prefetch_handler(
                        cfg, client, cache,
                        _fetcher(client, remote.hosts) if remote is not None else None),
                }).run)
                log.info("lazysnap ready (root %s, lazy %s)", cfg.root, "on" if cfg.lazy else "off")
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
                await trio.to_thread.run_sync(server.stop)
                server = None
                nursery.cancel_scope.cancel()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        metrics.watch_cache(None)
        metrics.watch_layers(None)
        if proxy is not None:
            await trio.to_thread.run_sync(proxy.stop)
        if server is not None:
            await trio.to_thread.run_sync(server.stop)
        if sn is not None:
            sn.close()
        await client.aclose()
        cache.close()
        (cfg.root / STATUS_FILE).unlink(missing_ok=True)
        log.info("stopped")


def _layer_rows(
    remote: FuseRemoteLayers, token: trio.lowlevel.TrioToken
) -> list[dict[str, Any]]:
    """For a scrape (the metrics server's thread): status rows are built in the trio
    thread, where the layer hooks' state lives, as for the status file."""
    try:
        return list(trio.from_thread.run_sync(remote.status, trio_token=token)["layers"])
    except trio.RunFinishedError:
        return []


def _fetcher(client: RegistryClient, hosts: HostPool) -> Any:
    """Range reads of a layer blob under the per-host request bound (`lazysnap prefetch`,
    profiles fetched ahead, and the lazy layers themselves share it)."""
    return partial(hosts.blob_reader, client)


def _in_roots(cfg: Config, layer_digest: str) -> bool:
    return find_in_roots(cfg.repository_roots, layer_digest) is not None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def run(cfg: Config) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        trio.run(_serve, cfg)
    except BaseExceptionGroup as group:
        # One failure inside the nursery is the common case (socket in use, bad root):
        # surface it as itself so the CLI maps it to a message and exit code.
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
