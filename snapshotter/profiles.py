"""Learned access profiles in the daemon: where they are kept, when they are learned, and
when they are applied.

`ProfileStore` keeps one verified profile per image manifest digest on disk (the CLI uses
it directly). `ProfileService` is told of every attached layer (by `bridge.py`): it
finds the image's manifest digest, looks for a profile (the store, then the registry),
prefetches the layer's chunks the profile lists, or, when there is none, records the
image's reads during its first `profile_window` seconds and stores what it learned.
Everything here is an optimisation: a failure is logged, and the container still starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.digest import Digest
from snapshotter.errors import DataLoss, InvalidArgument, LazysnapError, NotFound
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.fs.repository import Repository
from snapshotter.labels import LayerSource
from snapshotter.native import NativeLayers
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import Manifest
from snapshotter.registry.reference import Reference
from snapshotter.remote.blob import FetchRange, RemoteBlob
from snapshotter.remote.prefetch import PrefetchResult, prefetch, prefetch_steps
from snapshotter.remote.profile import (
    Profile,
    Recorder,
    decode_profile,
    encode_profile,
    plan_image_profile,
    plan_profile,
)
from snapshotter.remote.profile_oci import find_profile
from snapshotter.remote.taskhost import TaskHost

__all__ = ["PROFILES_DIR", "ProfileService", "ProfileStore", "start_layer_hooks"]

log = logging.getLogger("lazysnap.profiles")

PROFILES_DIR = "profiles"
_RESOLVE_TTL = 60.0  # seconds a tag -> manifest digest answer is reused for a pull's layers
# An image found without a profile is looked up again by a Prepare this many seconds later
# (one may have been pushed or imported since: a first rollout often comes before it), or
# sooner when the registry could not be asked at all.
LOOKUP_AGAIN = 600.0
LOOKUP_RETRY = 60.0
_UNADOPTED_BLOBS = 256  # fetched-ahead blobs kept for layers not attached yet


class ProfileStore:
    """Profiles by manifest digest: `<dir>/<algorithm>-<hex>.json`, in the portable form
    (`remote/profile.py` `encode_profile`). Writes are atomic (temp file, rename); reads
    check the profile's digest and that it names the manifest it is filed under."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, manifest: str) -> Path:
        d = Digest.parse(manifest)
        return self.directory / f"{d.algorithm}-{d.hex}.json"

    def raw(self, manifest: str) -> bytes | None:
        try:
            return self.path(manifest).read_bytes()
        except FileNotFoundError:
            return None

    def load(self, manifest: str) -> Profile | None:
        """The stored profile, or None; raises InvalidProfile/ProfileMismatch if damaged."""
        raw = self.raw(manifest)
        if raw is None:
            return None
        return decode_profile(raw, manifest=manifest, what=f"stored profile {self.path(manifest)}")

    def save_raw(self, raw: bytes, *, what: str = "profile") -> Profile:
        """Check `raw` (digest, format) and store it under the manifest it names."""
        profile = decode_profile(raw, what=what)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(profile.manifest)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
        return profile

    def save(self, profile: Profile) -> Path:
        self.save_raw(encode_profile(profile))
        return self.path(profile.manifest)

    def manifests(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem.replace("-", ":", 1) for p in self.directory.glob("*.json"))


@dataclass
class _Image:
    """What the service knows of one image (manifest digest)."""

    manifest: str
    profile: Profile | None = None
    source: str = ""  # where the profile came from: "store", "registry"
    recorder: Recorder | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    looked_up: bool = False  # a lookup ran (only the first may start a recorder)
    settled: bool = False  # the lookup is over: `profile` is what there is
    look_again: float = 0.0  # trio time from which a Prepare looks a missing profile up again
    ahead: trio.Event | None = None  # set once the image-wide prefetch (`_ahead`) is over
    document: Manifest | None = None  # the manifest, when resolving the tag fetched it


class ProfileService(TaskHost):
    """Learns and applies profiles for the layers attached to `repository`.

    Call `attached(layer_id, source, toc, blob)` in the trio thread right after a layer
    is attached; `released(layer_digest)` when it goes. Work runs in the nursery given to
    `run` (or as system tasks without it). `status()` says what was applied per layer.
    """

    def __init__(
        self,
        store: ProfileStore,
        repository: Repository,
        client: RegistryClient,
        *,
        window: float = 10.0,
        record: bool = True,
        apply: bool = True,
        lookup: bool = True,
        parallel: int = 4,
        after: trio.Event | None = None,
        fetcher: Callable[[Reference, Digest], FetchRange] | None = None,
        cache: ChunkCache | None = None,
        fetch_timeout: float = 30.0,
        elsewhere: Callable[[str], bool] = lambda layer_digest: False,
        blobs: dict[str, RemoteBlob] | None = None,
    ) -> None:
        self.store = store
        # Layer digest -> the RemoteBlob a fetch ahead used for a layer not attached yet;
        # the bridge adopts it on attach, so the layer's statistics include those bytes.
        self.blobs: dict[str, RemoteBlob] = {} if blobs is None else blobs
        self._attached_blobs: dict[str, RemoteBlob] = {}
        # With both, a found profile's chunks are fetched for all the image's layers at
        # once, before containerd prepares the later ones (`_ahead`), except the layers
        # `elsewhere` says will not be read through the repository (repository roots).
        self._fetcher, self._cache, self._fetch_timeout = fetcher, cache, fetch_timeout
        self._elsewhere = elsewhere
        self._after = after  # layers attached before it is set are left alone
        self._repo = repository
        self._client = client
        self.window = window
        self.record, self.apply, self.lookup = record, apply, lookup
        self.parallel = parallel
        self._images: dict[str, _Image] = {}
        self._layer_images: dict[str, set[str]] = {}  # layer digest -> manifest digests
        self._applied: dict[str, dict[str, Any]] = {}  # layer digest -> what was prefetched

    # -- called by the bridge (trio thread) ----------------------------------------------

    def preparing(self, source: LayerSource) -> None:
        """Look the image's profile up while the layer's TOC is fetched: the fetch ahead
        then starts a TOC's round trips and parse earlier (most of a small image's pull)."""
        if self.apply and self._active():
            self._spawn(self._early, source)

    def attached(self, layer_id: str, source: LayerSource, toc: Toc, blob: RemoteBlob) -> None:
        if not (self.record or self.apply) or not self._active():
            return
        self._attached_blobs[source.layer_digest] = blob
        self._spawn(self._start, layer_id, source, toc, blob)

    def lowerdir(self, layer_digest: str) -> str | None:
        return None  # profiles never change where a layer is read from

    def released(self, layer_digest: str) -> None:
        self._attached_blobs.pop(layer_digest, None)
        self._layer_images.pop(layer_digest, None)
        self._applied.pop(layer_digest, None)

    def restored(self, in_use: frozenset[str]) -> None:
        pass  # profiles belong to images, not to layers: none is dropped with a layer

    def status(self, layer_digest: str) -> dict[str, Any]:
        """`{"profile": {manifest, from, chunks, fetched_chunks, bytes, complete}}` once a
        profile was applied to the layer, else {}."""
        row = self._applied.get(layer_digest)
        return {"profile": dict(row)} if row else {}

    # -- internals ------------------------------------------------------------------------

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._guarded, fn, *args)
        else:
            trio.lowlevel.spawn_system_task(self._guarded, fn, *args)

    async def _guarded(self, fn: Any, *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:  # a system task must not raise; a profile is never fatal
            log.exception("profile work failed")

    def _active(self) -> bool:
        return self._after is None or self._after.is_set()

    async def _early(self, source: LayerSource) -> None:
        manifest = await self._manifest_of(source)
        if manifest is not None:
            await self._settle(self._image(manifest, source), source)

    async def _start(self, layer_id: str, source: LayerSource, toc: Toc, blob: RemoteBlob) -> None:
        manifest = await self._manifest_of(source)
        if manifest is None:
            return
        image = self._image(manifest, source)
        self._layer_images.setdefault(source.layer_digest, set()).add(manifest)
        layer = self._repo.layer(layer_id)
        if layer is not None:
            layer.observer = partial(self._on_read, source.layer_digest)
        await self._settle(image, source)
        if image.profile is not None and self.apply:
            await self._apply(image, source, toc, blob)

    def _image(self, manifest: str, source: LayerSource) -> _Image:
        image = self._images.setdefault(manifest, _Image(manifest))
        if self.record and not image.looked_up and image.recorder is None:
            # Record while the profile is looked up: a slow registry must not cost the
            # first reads. Dropped if a profile turns up.
            image.recorder = Recorder(manifest, self.window, image_ref=source.image_ref)
        return image

    async def _settle(self, image: _Image, source: LayerSource) -> None:
        """Find the image's profile (store, then registry; while there is none, again
        after `look_again`) and start its fetch ahead; later callers wait for the answer."""
        async with image.lock:
            again = image.profile is None and trio.current_time() >= image.look_again
            if not image.looked_up or again:
                image.looked_up = True
                await self._find(image, source)
                if image.profile is not None:
                    image.recorder = None
                    if self.apply and self._fetcher is not None and self._cache is not None:
                        image.ahead = trio.Event()
                        self._spawn(self._ahead, image, source)
                image.settled = True

    async def _manifest_of(self, source: LayerSource) -> str | None:
        """The image's manifest digest: CRI's label, else the reference resolved now (ctr
        and ctr-remote send no manifest digest); None if it cannot be had."""
        if source.manifest_digest:
            return source.manifest_digest
        try:
            ref = Reference.parse(source.image_ref)
            if ref.digest is not None and ref.tag is None:
                return str(ref.digest)
            # Reused for the image's other layers within the TTL, and shared with the TOCs
            # loaded ahead, which resolve the image at the same moment.
            document = await self._client.get_manifest(ref, max_age=_RESOLVE_TTL)
        except LazysnapError as exc:
            log.info("image %s: no manifest digest, so no profile (%s)", source.image_ref, exc)
            return None
        manifest = str(document.digest)
        image = self._images.setdefault(manifest, _Image(manifest))
        image.document = image.document or document
        return manifest

    async def _find(self, image: _Image, source: LayerSource) -> None:
        """The stored profile, else the registry's; when neither, `look_again` says when
        to ask again."""
        image.look_again = trio.current_time() + LOOKUP_AGAIN
        try:
            image.profile = await trio.to_thread.run_sync(self.store.load, image.manifest)
            image.source = "store"
        except InvalidArgument as exc:
            log.warning("image %s: stored profile rejected: %s", source.image_ref, exc)
        if image.profile is not None or not self.lookup:
            return
        try:
            raw = await find_profile(self._client, Reference.parse(source.image_ref),
                                     Digest.parse(image.manifest))
            if raw is None:
                log.info("image %s: no profile in the registry for %s", source.image_ref,
                         image.manifest)
                return
            what = f"registry profile for {source.image_ref}"
            image.profile = decode_profile(raw, manifest=image.manifest, what=what)
            image.source = "registry"
            await trio.to_thread.run_sync(partial(self.store.save_raw, raw, what=what))
            log.info("image %s: profile found in the registry (%d chunks)", source.image_ref,
                     len(image.profile.accesses))
        except (InvalidArgument, DataLoss) as exc:  # a profile was there and is bad
            log.warning("image %s: registry profile rejected: %s", source.image_ref, exc)
        except LazysnapError as exc:  # not found, unauthorized, unreachable: no profile
            log.info("image %s: no registry profile (%s)", source.image_ref, exc)
            if not isinstance(exc, NotFound):  # the registry did not say: ask sooner
                image.look_again = trio.current_time() + LOOKUP_RETRY

    async def _ahead(self, image: _Image, source: LayerSource) -> None:
        assert image.ahead is not None
        try:
            await self._fetch_ahead(image, source)
        finally:
            image.ahead.set()

    async def _fetch_ahead(self, image: _Image, source: LayerSource) -> None:
        """Fetch the profile's chunks of every layer of the image from the spans it
        recorded, in one first-access order, without waiting for the layers' TOCs: when
        containerd prepares a later layer, its startup chunks are already on the way.
        The manifest (fetched by the digest the profile was checked against) says which
        layers belong to the image and how large their blobs are."""
        assert image.profile is not None
        try:
            ref = Reference.parse(source.image_ref).with_digest(Digest.parse(image.manifest))
            # The tag's manifest has the digest the profile names: it is the same document.
            manifest = image.document or await self._client.get_manifest(ref)
        except LazysnapError as exc:
            log.info("image %s: profile applied per layer only (%s)", source.image_ref, exc)
            return
        sizes = {str(d.digest): d.size for d in manifest.layers
                 if not self._elsewhere(str(d.digest))}
        steps = plan_image_profile(image.profile, sizes)
        if not steps:
            return
        blobs = {layer: self._blob(ref, layer, sizes[layer])
                 for layer in dict.fromkeys(layer for layer, _ in steps)}
        results = await prefetch_steps([(blobs[layer], chunks) for layer, chunks in steps],
                                       parallel=self.parallel)
        for layer, blob in blobs.items():
            self._count(image, layer, results[blob])
        log.info("image %s: profile of %s prefetched ahead of the TOCs: %d chunks (%d bytes) "
                 "in %d layers", source.image_ref, image.manifest,
                 sum(r.chunks for r in results.values()),
                 sum(r.bytes_fetched for r in results.values()), len(blobs))

    def _blob(self, ref: Reference, layer: str, size: int) -> RemoteBlob:
        """The attached layer's blob, else one the bridge adopts when it attaches the
        layer (`blobs`), so that its statistics count what was fetched ahead."""
        blob = self._attached_blobs.get(layer) or self.blobs.get(layer)
        if blob is not None and blob.blob_size == size:
            return blob
        assert self._fetcher is not None and self._cache is not None
        blob = RemoteBlob(self._fetcher(ref, Digest.parse(layer)), self._cache,
                          blob_size=size, fetch_timeout=self._fetch_timeout,
                          name=f"layer {layer}")
        while len(self.blobs) >= _UNADOPTED_BLOBS:  # layers pulled and never attached
            del self.blobs[next(iter(self.blobs))]
        self.blobs[layer] = blob
        return blob

    async def _apply(self, image: _Image, source: LayerSource, toc: Toc, blob: RemoteBlob) -> None:
        """The profile's chunks of this layer, located by its verified TOC, that are not
        in the cache nor on their way (from `_ahead`, or profiles without spans)."""
        assert image.profile is not None
        plan = await trio.to_thread.run_sync(plan_profile, image.profile, source.layer_digest, toc)
        row = self._row(image, source.layer_digest)
        row["chunks"] = len(plan.chunks)
        if not plan.chunks:
            return
        if image.ahead is not None:
            await image.ahead.wait()
        todo = tuple(c for c in plan.chunks
                     if not blob.cache.has_or_fetching(Digest.parse(c.digest)))
        if todo:
            result = await prefetch(blob, replace(plan, chunks=todo), parallel=self.parallel)
            self._count(image, source.layer_digest, result)
            log.info("%s: profile of %s prefetched %d chunks (%d bytes)", blob.name,
                     image.manifest, result.chunks, result.bytes_fetched)
        # Set last: status readers take its presence to mean the prefetch is over.
        row["complete"] = all(Digest.parse(c.digest) in blob.cache for c in plan.chunks)

    def _row(self, image: _Image, layer_digest: str) -> dict[str, Any]:
        return self._applied.setdefault(layer_digest, {
            "manifest": image.manifest, "from": image.source, "chunks": 0,
            "fetched_chunks": 0, "bytes": 0})

    def _count(self, image: _Image, layer_digest: str, result: PrefetchResult) -> None:
        row = self._row(image, layer_digest)
        row["fetched_chunks"] += result.chunks
        row["bytes"] += result.bytes_fetched

    def _on_read(self, layer_digest: str, entry: Entry, chunk: Chunk) -> None:
        for manifest in self._layer_images.get(layer_digest, ()):
            image = self._images.get(manifest)
            rec = image.recorder if image is not None else None
            if rec is None:
                continue
            first = rec.started is None
            rec.read(layer_digest, entry, chunk, trio.current_time())
            if first:
                self._spawn(self._finish, manifest)

    async def _finish(self, manifest: str) -> None:
        await trio.sleep(self.window)
        image = self._images.get(manifest)
        if image is None or image.recorder is None:
            return
        profile = image.recorder.profile()
        image.recorder = None
        if not profile.accesses:
            return
        path = await trio.to_thread.run_sync(self.store.save, profile)
        image.profile, image.source = profile, "learned"
        log.info("image %s: profile learned (%d chunks of %d files in %gs): %s",
                 profile.image_ref or manifest, len(profile.accesses), len(profile.files()),
                 self.window, path)


async def start_layer_hooks(
    nursery: trio.Nursery, cfg: Config, repository: Repository, client: RegistryClient,
    cache: ChunkCache, *, restored: trio.Event | None = None,
    fetcher: Callable[[Reference, Digest], FetchRange] | None = None,
    elsewhere: Callable[[str], bool] = lambda layer_digest: False,
    blobs: dict[str, RemoteBlob] | None = None,
) -> list[Any]:
    """The daemon's layer hooks (bridge.LayerHooks) as configured, started in `nursery`.

    Layers restored at start (before `restored` is set) are not profiled: that is no cold
    start, and their containers may have been running for long.
    """
    hooks: list[Any] = []
    if cfg.profile_record or cfg.profile_apply:
        service = ProfileService(
            ProfileStore(cfg.root / PROFILES_DIR), repository, client,
            window=cfg.profile_window, record=cfg.profile_record, apply=cfg.profile_apply,
            lookup=cfg.profile_lookup, after=restored, parallel=cfg.prefetch_parallel,
            fetcher=fetcher, cache=cache, fetch_timeout=cfg.fetch_timeout,
            elsewhere=elsewhere, blobs=blobs,
        )
        await nursery.start(service.run)
        hooks.append(service)
    if cfg.native_layers:
        # Not before a profile is learned: copying the layer reads all of it.
        delay = cfg.profile_window + 1.0 if cfg.profile_record else 0.0
        native = NativeLayers(cfg.root, cache, cfg.root / "repo", interval=2.0, delay=delay,
                              repository=repository)
        await nursery.start(native.run)
        hooks.append(native)
    return hooks
