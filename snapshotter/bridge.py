"""The one crossing from gRPC threads into trio, and the remote-layer policy behind it.

`FuseRemoteLayers` implements core's `RemoteLayers` Protocol. It decides, per layer,
between three ways of providing it — a directory in a configured repository root (no
download at all), a lazily fetched eStargz layer in the FUSE repository mount, or
fallback to an ordinary snapshot — logs and counts every decision, and does the async
work (registry, TOC, attach) on the trio loop via `trio.from_thread.run`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from snapshotter import errors, metrics
from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.core.remote import RemoteRequired
from snapshotter.digest import Digest
from snapshotter.format.estargz import InvalidFooter
from snapshotter.format.toc import Toc
from snapshotter.fs.repository import Repository
from snapshotter.fs.tree import LayerTree
from snapshotter.labels import LayerSource, MissingSourceLabels, layer_source
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.reference import Reference
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.layer import TocDigestMissing, load_toc
from snapshotter.remote.tocahead import TocsAhead
from snapshotter.remote.tocparse import TocParser
from snapshotter.remote.tocstore import TocStore
from snapshotter.remote.warm import HostPool, Warmer, WarmHooks, WarmPolicy

__all__ = ["FuseRemoteLayers", "LayerFallback", "LayerHooks", "find_in_roots"]

log = logging.getLogger("lazysnap.remote")

T = TypeVar("T")


class LayerFallback(RemoteRequired):
    """A layer could not be served lazily and `require_lazy` forbids the download."""


class LayerHooks(Protocol):
    """Told about lazy layers (`profiles.ProfileService`, `native.NativeLayers`).

    `preparing` runs in the trio thread when containerd prepares a lazy layer (before a
    new layer's TOC is fetched, so that image-wide work can overlap that fetch; also for
    a layer attached for another image) and must not block;
    `attached` runs in the trio thread right after a layer is attached (or restored) and
    must not block; `lowerdir(digest)` (any thread) may name another directory holding
    the same tree for new mounts, or None; `released(digest)` (any thread) comes after
    the layer's last snapshot is gone; `restored(in_use)` (trio thread) comes once the
    daemon's start-up restore is over, with the digest of every layer a snapshot uses
    (work left by layers released while the daemon was down can go); `status(digest)`
    adds fields to the status row.
    """

    def preparing(self, source: LayerSource) -> None: ...

    def attached(self, layer_id: str, source: LayerSource, toc: Toc, blob: RemoteBlob) -> None:
        ...

    def lowerdir(self, digest: str) -> str | None: ...

    def released(self, digest: str) -> None: ...

    def restored(self, in_use: frozenset[str]) -> None: ...

    def status(self, digest: str) -> dict[str, Any]: ...


@dataclass
class _Attached:
    """One layer in the repository, shared by every snapshot whose handle names it."""

    dir: str
    source: LayerSource
    blob_size: int
    blob: RemoteBlob | None = None
    refs: int = 0
    error: str = ""


def _generation(source: LayerSource) -> int:
    """Tells the kernel a reused dir id holds another layer now (fs/repository.py)."""
    return int(Digest.parse(source.layer_digest).hex[:8], 16)


def _warm_policy(cfg: Config) -> WarmPolicy:
    return WarmPolicy(
        prefetch=cfg.prefetch, prefetch_size=cfg.prefetch_bytes, prefetch_wait=cfg.prefetch_wait,
        prefetch_parallel=cfg.prefetch_parallel, background=cfg.background_fetch,
        background_quiet=cfg.background_quiet, background_rate=cfg.background_bytes_per_second,
        background_concurrency=cfg.background_concurrency,
    )


def _reason(exc: BaseException) -> str:
    """A short, countable reason code for a fallback."""
    if isinstance(exc, MissingSourceLabels):
        return "no-source-labels"
    if isinstance(exc, TocDigestMissing):
        return "no-toc-digest"
    if isinstance(exc, InvalidFooter):
        return "not-estargz"
    if isinstance(exc, errors.DataLoss):
        return "verification-failed"
    if isinstance(exc, errors.PermissionDenied):
        return "unauthorized"
    if isinstance(exc, errors.NotFound):
        return "not-found"
    if isinstance(exc, errors.Unavailable):
        return "registry-unavailable"
    if isinstance(exc, errors.InvalidArgument):
        return "invalid-layer"
    return "internal-error"


def find_in_roots(roots: Sequence[str], layer_digest: str) -> Path | None:
    """The layer's unpacked tree in a repository root (`<hex[:2]>/<hex>/layerfs`, as
    CernVM-FS's unpacked.cern.ch `.layers`), if one has it."""
    if not roots:
        return None
    d = Digest.parse(layer_digest)
    for root in roots:
        candidate = Path(root) / d.hex[:2] / d.hex / "layerfs"
        if candidate.is_dir():
            return candidate
    return None


class FuseRemoteLayers:
    """Remote layers served from one FUSE repository mounted at `<root>/repo`."""

    def __init__(
        self,
        cfg: Config,
        *,
        repository: Repository,
        client: RegistryClient,
        cache: ChunkCache,
        token: trio.lowlevel.TrioToken,
        hooks: Sequence[LayerHooks] = (),
        hosts: HostPool | None = None,
        blobs: dict[str, RemoteBlob] | None = None,
    ) -> None:
        self._cfg = cfg
        # Layer digest -> a blob a layer hook already fetched through before the layer was
        # attached (profiles fetch ahead); adopted on attach so its statistics carry over.
        self._fetched_ahead = {} if blobs is None else blobs
        # Prefetch and background completion of each attached layer (remote/warm.py; the
        # daemon runs `warmer.run`); every range request goes through `hosts`.
        self.warmer = Warmer(_warm_policy(cfg))
        self.hosts = hosts or HostPool(cfg.max_connections_per_host)
        self._hooks = (*hooks, WarmHooks(self.warmer, token))
        self._repo = repository
        self._client = client
        self._cache = cache
        self._token = token
        self._mountpoint = cfg.root / "repo"
        self._tocs = TocStore(cfg.root / "tocs")
        # TOCs are parsed in a worker process (the daemon runs `toc_parser.run`).
        self.toc_parser = TocParser(preload=("snapshotter.fs._treebuild",))
        # The TOCs of an image's later layers, loaded once its first layer is prepared
        # (the daemon runs `tocs_ahead.run`).
        self.tocs_ahead = TocsAhead(client, self._load_tree)
        self._lock = threading.Lock()
        self._layers: dict[str, _Attached] = {}  # by layer digest
        # Layers found in a repository root, by digest: [source, path, snapshots].
        self._paths: dict[str, list[Any]] = {}
        self._next_dir = 1
        # One attach or restore per layer digest at a time (trio thread only): two images
        # sharing a layer are often pulled at once, and both would attach the same dir.
        self._attaching: dict[str, trio.Lock] = {}
        self.fallbacks: collections.Counter[str] = collections.Counter()
        self.recent_fallbacks: collections.deque[dict[str, str]] = collections.deque(maxlen=100)

    # -- RemoteLayers, called from gRPC threads ---------------------------------------
    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> str | None:
        digest = labels.get("containerd.io/snapshot/cri.layer-digest") or labels.get(
            "containerd.io/snapshot/remote/stargz.digest", "?"
        )
        if not self._cfg.lazy:
            return None
        try:
            source = layer_source(labels)
            path = self._find_in_roots(source.layer_digest)
            if path is not None:
                log.info("layer %s: served from repository path %s", source.layer_digest, path)
                handle = json.dumps({"mode": "path", "path": str(path),
                                     "digest": source.layer_digest, "ref": source.image_ref})
                self._count_path(json.loads(handle), +1)
                return handle
            handle = self._run(self._attach, source)
        except errors.LazysnapError as exc:
            return self._fallback(digest, labels, exc)
        except Exception as exc:
            log.exception("layer %s: unexpected error while preparing it remotely", digest)
            return self._fallback(digest, labels, exc)
        log.info("layer %s: lazy (image %s)", digest, source.image_ref)
        return handle

    def lowerdir(self, handle: str) -> str:
        h = json.loads(handle)
        if h["mode"] == "path":
            return h["path"]
        for hook in self._hooks:
            other = hook.lowerdir(h["digest"])
            if other is not None:
                return other
        return str(self._mountpoint / h["dir"])

    def check(self, handle: str) -> None:
        h = json.loads(handle)
        if h["mode"] == "path":
            if not os.path.isdir(h["path"]):
                raise errors.Unavailable(f"layer {h['digest']}: {h['path']} is gone")
            return
        with self._lock:
            layer = self._layers.get(h["digest"])
            attached = layer is not None and layer.blob is not None
        if not attached:
            # Restore found the registry unreachable; try again now that it is needed.
            self._run(self._restore, h)
        # A container is about to start: its layers' prefetch gets a bounded head start.
        self._run(self.warmer.wait_ready, h["digest"])

    def release(self, handle: str) -> None:
        h = json.loads(handle)
        if h["mode"] == "path":
            self._count_path(h, -1)
            return
        with self._lock:
            layer = self._layers.get(h["digest"])
            if layer is None:
                return
            layer.refs -= 1
            if layer.refs > 0:
                return
            del self._layers[h["digest"]]
        for hook in self._hooks:
            hook.released(h["digest"])
        if layer.blob is not None:
            self._run(self._detach, layer.dir)

    def restore(self, handle: str) -> None:
        h = json.loads(handle)
        if h["mode"] == "path":
            self._count_path(h, +1)
            return
        with self._lock:
            self._next_dir = max(self._next_dir, int(h["dir"]) + 1)
        try:
            # No network at boot: a silent registry would hold up the start per layer.
            self._run(self._restore, h, True, False)
        except errors.LazysnapError as exc:
            log.warning("layer %s: not restored now (%s); will retry on first use",
                        h["digest"], exc)

    # -- status -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            layers = list(self._layers.values())
            paths = list(self._paths.values())
            fallbacks, counts = list(self.recent_fallbacks), dict(self.fallbacks)
        rows = [{
            "image_ref": source.image_ref, "layer_digest": source.layer_digest,
            "mode": "path", "path": path, "size": 0, "bytes_fetched": 0,
            "percent_fetched": 0.0, "cache_hits": 0, "snapshots": refs, "error": "",
        } for source, path, refs in paths]
        for layer in layers:
            stats = layer.blob.statistics() if layer.blob is not None else None
            fetched = stats.bytes_fetched if stats else 0
            rows.append({
                "image_ref": layer.source.image_ref,
                "layer_digest": layer.source.layer_digest,
                "mode": "lazy" if layer.blob is not None else "lazy (not restored)",
                "path": str(self._mountpoint / layer.dir),
                "size": layer.blob_size,
                "bytes_fetched": fetched,
                "percent_fetched": round(100 * fetched / layer.blob_size, 1)
                if layer.blob_size else 0.0,
                "cache_hits": stats.cache_hits if stats else 0,
                "snapshots": layer.refs,
                "error": layer.error,
            })
            for hook in self._hooks:
                rows[-1].update(hook.status(layer.source.layer_digest))
        return {
            "layers": rows,
            "fallbacks": fallbacks,
            "fallback_counts": counts,
            "toc_parser": self.toc_parser.status(),
        }

    def restore_done(self) -> None:
        """The daemon's restore is over: every layer a snapshot uses is in `_layers`
        (restored, or waiting for its TOC); the hooks may drop what belongs to no other."""
        with self._lock:
            in_use = frozenset(self._layers)
        for hook in self._hooks:
            try:
                hook.restored(in_use)
            except Exception:  # hooks are optimisations, never fatal
                log.exception("%s: restored failed", type(hook).__name__)

    def trim_tocs(self) -> tuple[int, int]:
        """Bound the TOC store (`toc_store_size`), keeping the TOCs of every layer a
        snapshot uses; `(files, bytes)` removed. Blocking: run it in a thread."""
        with self._lock:
            keep = {Digest.parse(layer.source.toc_digest).hex
                    for layer in self._layers.values() if layer.source.toc_digest}  # fmt: skip
        return self._tocs.trim(keep, self._cfg.toc_store_bytes)

    # -- internals ----------------------------------------------------------------------
    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def _fallback(self, digest: str, labels: Mapping[str, str], exc: BaseException) -> None:
        reason = _reason(exc)
        metrics.count_fallback(reason)
        ref = labels.get("containerd.io/snapshot/cri.image-ref") or labels.get(
            "containerd.io/snapshot/remote/stargz.reference", "")
        with self._lock:  # gRPC threads fall back concurrently; Counter += is not atomic
            self.fallbacks[reason] += 1
            self.recent_fallbacks.append(
                {"image_ref": ref, "layer_digest": digest, "reason": reason, "detail": str(exc)}
            )
        if self._cfg.require_lazy:
            log.error("layer %s: cannot be served lazily (%s: %s); require_lazy is set",
                      digest, reason, exc)
            raise LayerFallback(f"layer {digest}: cannot be served lazily: {exc}") from exc
        log.info("layer %s: fallback to a full download (%s: %s)", digest, reason, exc)
        return None

    def _count_path(self, h: dict[str, Any], delta: int) -> None:
        with self._lock:
            entry = self._paths.setdefault(
                h["digest"], [LayerSource(image_ref=h["ref"], layer_digest=h["digest"]),
                              h["path"], 0])
            entry[2] += delta
            if entry[2] <= 0:
                del self._paths[h["digest"]]

    def _find_in_roots(self, layer_digest: str) -> Path | None:
        return find_in_roots(self._cfg.repository_roots, layer_digest)

    async def _load_tree(
        self, source: LayerSource, size: int | None, *, allow_unverified: bool = False
    ) -> LayerTree:
        """A layer's tree, from its TOC verified against its label's digest (unverified
        only when `allow_unverified` and the label has none) and kept in the TOC store: for
        an attach, a restore and `tocs_ahead` alike. `size` None: the registry tells it.
        The tree is built where the TOC is parsed (the parser's worker process), off the
        daemon's GIL while the image's first chunks arrive: an 8k-entry tree took 60-70
        ms there during a cold start, 26 ms alone."""
        ref, digest = Reference.parse(source.image_ref), Digest.parse(source.layer_digest)
        tail = self.hosts.limited(ref.host, partial(self._client.read_blob_tail, ref, digest))
        return await load_toc(
            self._fetcher(source), blob_size=size, fetch_tail=tail,
            toc_digest=Digest.parse(source.toc_digest) if source.toc_digest else None,
            max_toc_size=self._cfg.max_toc_bytes, max_entries=self._cfg.max_toc_entries,
            allow_unverified=allow_unverified, timeout=self._cfg.fetch_timeout,
            name=f"layer {source.layer_digest}", toc_store=self._tocs, parser=self.toc_parser,
            build=LayerTree.from_toc,
        )  # fmt: skip

    def _known(self, layer_digest: str) -> bool:
        """Attached already, or served from a repository root: no TOC to load ahead."""
        with self._lock:
            if layer_digest in self._layers:
                return True
        return self._find_in_roots(layer_digest) is not None

    def _fetcher(self, source: LayerSource) -> Callable[[int, int], Awaitable[bytes]]:
        ref = Reference.parse(source.image_ref)
        return self.hosts.blob_reader(self._client, ref, Digest.parse(source.layer_digest))

    async def _one_at_a_time(self, digest: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        lock = self._attaching.setdefault(digest, trio.Lock())
        try:
            async with lock:
                return await fn(*args)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._attaching.pop(digest, None)

    async def _attach(self, source: LayerSource) -> str:
        return await self._one_at_a_time(source.layer_digest, self._attach_locked, source)

    async def _attach_locked(self, source: LayerSource) -> str:
        with self._lock:
            layer = self._layers.get(source.layer_digest)
            if layer is not None and layer.blob is not None:
                layer.refs += 1
                handle = self._handle(layer)
            else:
                handle = None
        self._tell_preparing(source)
        # The image's other layers' TOCs load now, beside this one's: a Prepare waits for
        # its TOC, and the next layer's is often the larger (more to fetch and parse).
        self.tocs_ahead.seen(source, self._known)
        if handle is not None:  # shared with an image pulled before
            return handle
        unverified_ok = self._cfg.allow_no_verification and source.skip_verify
        digest = Digest.parse(source.layer_digest)
        fetch = self._fetcher(source)
        tree = await self.tocs_ahead.take(source)  # None unless loaded for this TOC digest
        if tree is None:  # the blob's size comes with its footer (no HEAD first)
            tree = await self._load_tree(source, None, allow_unverified=unverified_ok)
        toc = tree.toc
        size = toc.blob_size
        with self._lock:
            layer = self._layers.get(source.layer_digest)
            if layer is None:
                layer = _Attached(dir=str(self._next_dir), source=source, blob_size=size)
                self._next_dir += 1
                self._layers[source.layer_digest] = layer
        try:
            blob = self._fetched_ahead.pop(source.layer_digest, None)
            if blob is None or blob.blob_size != size:
                blob = RemoteBlob(fetch, self._cache, blob_size=size,
                                  fetch_timeout=self._cfg.fetch_timeout, name=f"layer {digest}")
            self._repo.attach(layer.dir, tree, blob, generation=_generation(layer.source))
            self._tell_attached(layer.dir, layer.source, toc, blob)
        except BaseException:
            with self._lock:  # no snapshot uses it: leave no row behind in status
                if layer.refs == 0 and layer.blob is None:
                    self._layers.pop(source.layer_digest, None)
            raise
        with self._lock:
            layer.blob, layer.error = blob, ""
            layer.refs += 1
        return self._handle(layer)

    async def _restore(
        self, h: dict[str, Any], counting: bool = False, fetch_toc: bool = True
    ) -> None:
        await self._one_at_a_time(h["digest"], self._restore_locked, h, counting, fetch_toc)

    async def _restore_locked(self, h: dict[str, Any], counting: bool, fetch_toc: bool) -> None:
        """Attach a layer recorded in a handle: from the stored TOC when we have it (no
        network needed), else fetched again (unless `fetch_toc` is false: then `check`
        does it on first use)."""
        source = LayerSource(image_ref=h["ref"], layer_digest=h["digest"],
                             toc_digest=h.get("toc", ""))
        with self._lock:
            layer = self._layers.get(h["digest"])
            if layer is None:
                layer = _Attached(dir=h["dir"], source=source, blob_size=h["size"])
                self._layers[h["digest"]] = layer
            if counting:
                layer.refs += 1
            if layer.blob is not None:
                return
        fetch = self._fetcher(source)
        tree = None
        if source.toc_digest:
            tree = await trio.to_thread.run_sync(
                self._stored_tree, Digest.parse(source.toc_digest), h["size"]
            )
        if tree is None and not fetch_toc:
            layer.error = "toc not stored; fetched on first use"
            log.info("layer %s: %s", h["digest"], layer.error)
            return
        try:
            if tree is None:  # fetched, and stored so that the next start needs no network
                tree = await self._load_tree(
                    source, h["size"], allow_unverified=not source.toc_digest)
        except errors.LazysnapError as exc:
            layer.error = str(exc)
            raise errors.Unavailable(f"layer {h['digest']}: cannot restore: {exc}") from exc
        blob = RemoteBlob(fetch, self._cache, blob_size=h["size"],
                          fetch_timeout=self._cfg.fetch_timeout, name=f"layer {h['digest']}")
        self._repo.attach(layer.dir, tree, blob, generation=_generation(layer.source))
        self._tell_attached(layer.dir, layer.source, tree.toc, blob)
        with self._lock:
            layer.blob, layer.error = blob, ""

    def _stored_tree(self, toc_digest: Digest, size: int) -> LayerTree | None:
        toc = self._tocs.load(toc_digest, blob_size=size, max_entries=self._cfg.max_toc_entries)
        return None if toc is None else LayerTree.from_toc(toc)

    def _tell_preparing(self, source: LayerSource) -> None:
        self._tell(source, lambda hook: hook.preparing(source))

    def _tell_attached(self, dir_: str, source: LayerSource, toc: Toc, blob: RemoteBlob) -> None:
        self._tell(source, lambda hook: hook.attached(dir_, source, toc, blob))

    def _tell(self, source: LayerSource, call: Callable[[LayerHooks], None]) -> None:
        for hook in self._hooks:
            try:
                call(hook)
            except Exception:  # profiles and native dirs are optimisations, never fatal
                log.exception("layer %s: %s failed", source.layer_digest, type(hook).__name__)

    async def _detach(self, dir_: str) -> None:
        self._repo.detach(dir_)

    def _handle(self, layer: _Attached) -> str:
        return json.dumps({
            "mode": "lazy", "dir": layer.dir, "digest": layer.source.layer_digest,
            "ref": layer.source.image_ref, "toc": layer.source.toc_digest,
            "size": layer.blob_size,
        })
