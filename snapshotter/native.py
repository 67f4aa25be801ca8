"""Fully fetched layers as plain directories, so new containers read them at native speed.

`NativeLayers` watches each attached lazy layer; once every chunk is in the cache it
copies the layer's FUSE view (whose bytes are verified chunk by chunk) into
`<root>/native/<algorithm>-<hex>/`, checks each regular file against the digest in the
TOC, and renames it into place. From then on `lowerdir(digest)` answers that directory,
and core hands it to overlayfs for new mounts; containers already running keep the FUSE
lowerdir they were given.

Budget: a native layer's bytes are taken from the chunk cache's budget (`cache.max_bytes`
shrinks by them, so the cache evicts to make room). Safety: once `lowerdir` has handed a
directory out, a mount may use it until the layer's last snapshot is removed, so it is
deleted only by `released`; directories never handed out can be evicted at any time to
make room for another layer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from snapshotter.cache.chunks import ChunkCache
from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, LazysnapError
from snapshotter.format.toc import Toc
from snapshotter.fs.repository import Repository
from snapshotter.labels import LayerSource
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.prefetch import missing_chunks
from snapshotter.remote.taskhost import TaskHost

__all__ = ["NATIVE_DIR", "NativeLayers"]

log = logging.getLogger("lazysnap.native")

NATIVE_DIR = "native"
MAX_SHARE = 0.5  # native layers may take at most this share of the cache budget
_COPY_TIMEOUT = 600.0
_HIDDEN = frozenset({".prefetch.landmark", ".no.prefetch.landmark"})
_LAYER_DIR = re.compile(r"[a-z0-9]+-[0-9a-f]{32,128}")  # `path(digest).name`


@dataclass
class _Native:
    digest: str
    path: Path
    size: int = 0
    ready: bool = False
    handed_out: bool = False
    gone: bool = False


class NativeLayers(TaskHost):
    """Materialises complete layers; thread-safe `lowerdir`/`released` for gRPC threads."""

    def __init__(
        self, root: Path, cache: ChunkCache, mountpoint: Path, *,
        interval: float = 5.0, delay: float = 0.0, repository: Repository | None = None,
    ) -> None:
        self.directory = root / NATIVE_DIR
        self._cache = cache
        self._budget = cache.max_bytes
        self._mountpoint = mountpoint
        self._repo = repository
        self.interval = interval
        self.delay = delay  # before the first check, e.g. while a profile is recorded
        self._lock = threading.Lock()
        self._layers: dict[str, _Native] = {}

    def path(self, digest: str) -> Path:
        d = Digest.parse(digest)
        return self.directory / f"{d.algorithm}-{d.hex}"

    # -- trio thread ------------------------------------------------------------------------

    def preparing(self, source: LayerSource) -> None:
        pass  # a native directory needs the layer's TOC

    def attached(self, layer_id: str, source: LayerSource, toc: Toc, blob: RemoteBlob) -> None:
        digest = source.layer_digest
        with self._lock:
            if digest in self._layers and not self._layers[digest].gone:
                return
            state = _Native(digest, self.path(digest))
            self._layers[digest] = state
            if state.path.is_dir():
                # Left by an earlier run: a container started then may still use it.
                state.ready = state.handed_out = True
                state.size = toc_size(toc)
                self._charge(state.size)
                log.info("layer %s: native directory %s kept from before", digest, state.path)
                return
        if self._nursery is not None:
            self._nursery.start_soon(self._watch, state, layer_id, toc, blob)
        else:
            trio.lowlevel.spawn_system_task(self._watch, state, layer_id, toc, blob)

    # -- any thread -------------------------------------------------------------------------

    def lowerdir(self, digest: str) -> str | None:
        """The native directory of a layer if it is ready; it is then kept until released."""
        with self._lock:
            state = self._layers.get(digest)
            if state is None or not state.ready or state.gone:
                return None
            state.handed_out = True
            return str(state.path)

    def released(self, digest: str) -> None:
        """The layer's last snapshot is gone: no mount can use its native directory."""
        with self._lock:
            state = self._layers.pop(digest, None)
            if state is None:
                return
            state.gone = True
            was_ready = state.ready
            state.ready = False
        if was_ready:
            self._remove(state)

    def restored(self, in_use: frozenset[str]) -> None:
        """Remove the native directories (and half-made copies) of layers no snapshot uses:
        their snapshots were removed while the daemon was down (or it died mid-copy), so
        no mount can use them. Anything not named like a layer's directory is left."""
        with self._lock:
            keep = {self.path(d).name for d in (*in_use, *self._layers)}
        if self._nursery is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self._sweep, keep)

    def _sweep(self, keep: set[str]) -> None:
        try:
            found = list(self.directory.iterdir())
        except FileNotFoundError:
            return
        for path in found:
            name = path.name.removesuffix(".tmp")
            if name in keep or not _LAYER_DIR.fullmatch(name):
                continue
            log.info("native directory %s: its layer is no longer used; removed", path)
            _rmtree(path)

    def status(self, digest: str) -> dict[str, Any]:
        with self._lock:
            state = self._layers.get(digest)
            if state is None:
                return {}
            return {"native": str(state.path) if state.ready else "",
                    "native_in_use": state.handed_out}

    # -- internals --------------------------------------------------------------------------

    async def _watch(self, state: _Native, layer_id: str, toc: Toc, blob: RemoteBlob) -> None:
        try:
            await trio.sleep(self.delay)
            last = None
            while not state.gone:
                stats = blob.statistics()
                seen = (stats.reads, stats.chunks_fetched, self._cache.statistics().entries)
                if seen != last:
                    last = seen
                    missing = await trio.to_thread.run_sync(missing_chunks, blob, toc)
                    if not missing:
                        await self._materialise(state, layer_id, toc)
                        return
                await trio.sleep(self.interval)
        except Exception:  # may run as a system task: nothing may escape
            log.exception("layer %s: native materialisation failed", state.digest)

    async def _materialise(self, state: _Native, layer_id: str, toc: Toc) -> None:
        size = toc_size(toc)
        if not self._make_room(size):
            log.info("layer %s: complete, but %d bytes do not fit the native share of the "
                     "cache budget; staying lazy", state.digest, size)
            return
        src = self._mountpoint / layer_id
        tmp = state.path.with_name(state.path.name + ".tmp")
        # The copy reads every file: it must not be mistaken for a container's reads
        # when a profile is being learned.
        attached = self._repo.layer(layer_id) if self._repo is not None else None
        observer = attached.observer if attached is not None else None
        if attached is not None:
            attached.observer = None
        try:
            with trio.fail_after(_COPY_TIMEOUT):
                await trio.to_thread.run_sync(_copy_and_verify, src, tmp, toc, state.digest)
        except (LazysnapError, OSError, subprocess.CalledProcessError, trio.TooSlowError) as exc:
            log.warning("layer %s: not materialised: %s", state.digest, exc)
            self._uncharge(size)
            await trio.to_thread.run_sync(_rmtree, tmp)
            return
        finally:
            if attached is not None and attached.observer is None:
                attached.observer = observer
        with self._lock:
            if state.gone:
                ready = False
            else:
                os.replace(tmp, state.path)
                state.ready, state.size, ready = True, size, True
        if not ready:
            self._uncharge(size)
            await trio.to_thread.run_sync(_rmtree, tmp)
            return
        log.info("layer %s: materialised as %s (%d bytes); new containers read it natively",
                 state.digest, state.path, size)

    def _make_room(self, size: int) -> bool:
        """Charge `size` to the budget, evicting native layers not handed out if needed."""
        evict: list[_Native] = []
        with self._lock:
            limit = int(self._budget * MAX_SHARE)
            used = sum(s.size for s in self._layers.values() if s.ready)
            for s in sorted(self._layers.values(), key=lambda s: s.size, reverse=True):
                if used + size <= limit:
                    break
                if s.ready and not s.handed_out:
                    s.ready = False
                    used -= s.size
                    evict.append(s)
            fits = used + size <= limit
            if fits:
                self._charge(size)
        for s in evict:
            log.info("layer %s: native directory evicted to make room", s.digest)
            self._remove(s)
        return fits

    def _charge(self, size: int) -> None:
        self._cache.max_bytes = max(0, self._cache.max_bytes - size)

    def _uncharge(self, size: int) -> None:
        self._cache.max_bytes = min(self._budget, self._cache.max_bytes + size)

    def _remove(self, state: _Native) -> None:
        _rmtree(state.path)
        self._uncharge(state.size)
        state.size = 0


def toc_size(toc: Toc) -> int:
    """Bytes of file content in the layer (from the size column: no Entry per row, as
    this runs in the trio thread)."""
    return sum(toc.columns.size)


def _rmtree(path: Path) -> None:
    """Remove a directory; best effort (logged), since a failure only leaks disk space."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _copy_and_verify(src: Path, dst: Path, toc: Toc, digest: str) -> None:
    """Copy the layer's view with owners, modes, times, xattrs, devices and hardlinks,
    then check every regular file with a whole-file digest against the TOC."""
    _rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.mkdir()
    subprocess.run(["cp", "-a", "--", f"{src}/.", str(dst)], check=True,
                   capture_output=True, timeout=_COPY_TIMEOUT)
    for entry in toc.entries:
        if entry.type != "reg" or not entry.digest:
            continue
        path = dst / entry.name.lstrip("/")
        base = path.name
        if base.startswith(".wh.") or base in _HIDDEN:
            continue  # shown as overlay whiteouts, or not at all
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if f"sha256:{h.hexdigest()}" != entry.digest:
            raise DataLoss(f"layer {digest}: native copy of {entry.name!r} does not match "
                           f"its digest {entry.digest}")
