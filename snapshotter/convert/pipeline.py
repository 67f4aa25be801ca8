"""The conversion of one image: read the source's documents, convert the layers in
parallel, then write configs, manifests and (last, under the tag) the root document.

Nothing is written under the destination's name until every layer has converted and
every blob and child manifest is in place: a failure leaves the tag as it was.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from snapshotter import errors
from snapshotter.convert.errors import UnsupportedMediaType
from snapshotter.convert.layer import ConversionStopped, LayerOutput, convert_layer
from snapshotter.convert.mediatypes import (
    DOCKER_CONFIG,
    OCI_CONFIG,
    compression_of,
    is_foreign,
)
from snapshotter.convert.progress import ConvertProgress, NullProgress
from snapshotter.convert.rewrite import (
    NewBlob,
    config_diff_ids,
    layer_media_type,
    new_config,
    new_index,
    new_layer_descriptor,
    new_manifest,
)
from snapshotter.convert.stores import (
    ImageDestination,
    ImageSource,
    open_destination,
    open_source,
)
from snapshotter.digest import Digest
from snapshotter.format.build import DEFAULT_CHUNK_SIZE
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import PlatformNotFound
from snapshotter.registry.manifest import Descriptor, Index, Manifest, Platform

__all__ = ["ConvertOptions", "ConvertSummary", "convert_image"]


_ATTESTATION = ("vnd.docker.reference.type", "attestation-manifest")
_MAX_DEPTH = 3
_GC_INTERVAL = 0.5  # seconds


@dataclass(frozen=True)
class ConvertOptions:
    """`platforms` empty: every platform of an index. `prioritized`: tar paths in access
    order, written first in each layer with a landmark; None: no landmarks at all."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    prioritized: tuple[str, ...] | None = None
    platforms: tuple[Platform, ...] = ()
    jobs: int = 4
    compression_level: int = 9
    oci: bool = False
    tmp_dir: Path | None = None


@dataclass(frozen=True)
class ConvertSummary:
    source: str
    destination: str
    digest: Digest  # of the root manifest or index, as written under the tag
    media_type: str
    platforms: tuple[str, ...]
    layers: int  # distinct layers converted
    uploaded: int  # blobs uploaded (layers and configs)
    present: int  # blobs that were at the destination already
    size_before: int  # compressed bytes of the distinct source layers
    size_after: int
    seconds: float


async def convert_image(
    src: str,
    dst: str,
    *,
    client: RegistryClient,
    options: ConvertOptions | None = None,
    progress: ConvertProgress | None = None,
) -> ConvertSummary:
    """Convert the image `src` names into eStargz and store it as `dst`.

    SRC and DST are registry references or `oci:DIR[:tag]`. Example::

        async with ...:
            summary = await convert_image(
                "127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1-esgz", client=client
            )
    """
    job = _Job(open_source(src, client), open_destination(dst, client),
               options or ConvertOptions(), progress or NullProgress())
    try:
        return await job.run()
    finally:
        job.progress.close()


@dataclass
class _Node:
    """A manifest or index to write, with the children chosen from an index."""

    doc: Manifest | Index
    children: list[tuple[int, _Node]] = field(default_factory=list)
    config: bytes = b""
    platform: str = ""


@dataclass
class _Layer:
    desc: Descriptor
    what: str
    diff_id: Digest
    output: LayerOutput | None = None


class _Job:
    def __init__(
        self, src: ImageSource, dst: ImageDestination, opts: ConvertOptions,
        progress: ConvertProgress,
    ) -> None:
        if opts.jobs < 1:
            raise errors.InvalidArgument(f"jobs {opts.jobs} must be at least 1")
        self.src, self.dst, self.opts, self.progress = src, dst, opts, progress
        self.layers: dict[Digest, _Layer] = {}
        self.uploaded = self.present = 0
        self.stop = threading.Event()

    async def run(self) -> ConvertSummary:
        started = time.monotonic()
        root = await self._read(await self.src.root(), None, 0)
        manifests = list(_manifests(root))
        if not manifests:
            wanted = ", ".join(str(p) for p in self.opts.platforms)
            raise PlatformNotFound(f"{self.src.name}: no image for platform {wanted}")
        todo = [layer for layer in self.layers.values() if not is_foreign(layer.desc.media_type)]
        self.progress.start(len(todo), sum(layer.desc.size for layer in todo))
        tmp = Path(tempfile.mkdtemp(prefix="lazysnap-convert-", dir=self.opts.tmp_dir))
        try:
            await self._convert_all(todo, tmp)
        finally:
            with trio.CancelScope(shield=True):  # also when interrupted: no temp data left
                await trio.to_thread.run_sync(partial(shutil.rmtree, tmp, ignore_errors=True))
        written = await self._write(root, tagged=True)
        return ConvertSummary(
            source=self.src.name,
            destination=self.dst.name,
            digest=written.digest,
            media_type=written.media_type,
            platforms=tuple(n.platform for n in manifests if n.platform),
            layers=len(todo),
            uploaded=self.uploaded,
            present=self.present,
            size_before=sum(layer.desc.size for layer in todo),
            size_after=sum(layer.output.build.size for layer in todo if layer.output),
            seconds=time.monotonic() - started,
        )

    # -- reading the source's documents ---------------------------------------------

    async def _read(self, doc: Manifest | Index, desc: Descriptor | None, depth: int) -> _Node:
        if depth > _MAX_DEPTH:
            raise UnsupportedMediaType(f"{self.src.name}: indexes nested too deeply")
        node = _Node(doc, platform=str(desc.platform) if desc and desc.platform else "")
        if isinstance(doc, Index):
            for i, child in enumerate(doc.manifests):
                if child.annotations.get(_ATTESTATION[0]) == _ATTESTATION[1]:
                    # It attests the source manifest's digest, which the result no longer has.
                    self.progress.note(f"dropping attestation manifest {child.digest}")
                    continue
                if self.opts.platforms and child.platform is not None and not any(
                    child.platform.matches(p) for p in self.opts.platforms
                ):
                    continue
                sub = await self._read(await self.src.child(child), child, depth + 1)
                if isinstance(sub.doc, Index) or not self.opts.platforms or child.platform:
                    node.children.append((i, sub))
            return node
        what = f"manifest {doc.digest} of {self.src.name}"
        if doc.config.media_type not in (OCI_CONFIG, DOCKER_CONFIG):
            raise UnsupportedMediaType(
                f"{what}: config media type {doc.config.media_type!r} is not an image config"
            )
        node.config = await self.src.blob(doc.config, f"config {doc.config.digest} of {what}")
        diff_ids = config_diff_ids(node.config, len(doc.layers), f"config of {what}")
        for n, (layer, diff_id) in enumerate(zip(doc.layers, diff_ids, strict=True), 1):
            layer_what = f"layer {n} ({layer.digest}) of {self.src.name}"
            if not is_foreign(layer.media_type):
                compression_of(layer.media_type, layer_what)
            self.layers.setdefault(layer.digest, _Layer(layer, layer_what, diff_id))
        return node

    # -- converting layers -----------------------------------------------------------

    async def _convert_all(self, todo: Sequence[_Layer], tmp: Path) -> None:
        limiter = trio.CapacityLimiter(self.opts.jobs)
        converted = False

        async def stop_when_cancelled() -> None:
            # A running thread cannot be interrupted, and trio waits for it (so none
            # outlives the temp dir); but each converting thread checks `self.stop` at
            # its next read. Set it when cancellation arrives (Ctrl-C), not at the end.
            try:
                await trio.sleep_forever()
            finally:
                if not converted:
                    self.stop.set()

        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(stop_when_cancelled)
                outer.start_soon(_collect_cycles)
                async with trio.open_nursery() as nursery:
                    for i, layer in enumerate(todo):
                        nursery.start_soon(self._convert_one, layer, tmp / str(i), limiter)
                converted = True
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _convert_one(self, layer: _Layer, tmp: Path, limiter: trio.CapacityLimiter) -> None:
        key = str(layer.desc.digest)
        async with limiter:
            try:
                self.progress.layer_started(key, layer.desc.size)
                src = await self.src.fetch_layer(
                    layer.desc, tmp.with_suffix(".src"), layer.what,
                    partial(self.progress.fetched, key),
                )
                self.progress.phase(key, "convert")
                layer.output = await trio.to_thread.run_sync(
                    partial(
                        convert_layer,
                        src,
                        compression_of(layer.desc.media_type, layer.what),
                        tmp.with_suffix(".esgz"),
                        what=layer.what,
                        chunk_size=self.opts.chunk_size,
                        prioritized=self.opts.prioritized,
                        compression_level=self.opts.compression_level,
                        expected_diff_id=layer.diff_id,
                        stop=self.stop,
                        on_bytes=partial(self.progress.advance, key),
                    )
                )
                tmp.with_suffix(".src").unlink(missing_ok=True)
                self.progress.phase(key, "push")
                uploaded = await self._push(layer.output.path, layer.output.build.blob_digest)
                layer.output.path.unlink()
                self.progress.layer_done(key, layer.desc.size, layer.output.build.size, uploaded)
            except BaseException as exc:
                self.stop.set()  # the other layers' threads give up at their next read
                if (
                    isinstance(exc, errors.LazysnapError)
                    and not isinstance(exc, ConversionStopped)
                    and layer.what not in str(exc)
                ):
                    raise _in_context(exc, layer.what) from exc
                raise

    async def _push(self, data: bytes | Path, digest: Digest) -> bool:
        uploaded = await self.dst.push_blob(data, digest, mount_from=self.src.registry_repo)
        if uploaded:
            self.uploaded += 1
        else:
            self.present += 1
        return uploaded

    # -- writing documents -----------------------------------------------------------

    async def _write(self, node: _Node, *, tagged: bool) -> NewBlob:
        doc = node.doc
        what = f"manifest {doc.digest} of {self.src.name}"
        if isinstance(doc, Index):
            children = [(i, await self._write(c, tagged=False)) for i, c in node.children]
            raw, media_type = new_index(
                doc.raw, doc.media_type, children, oci=self.opts.oci, what=what
            )
        else:
            layers = []
            for old_raw, desc in zip(_raw_layers(doc), doc.layers, strict=True):
                layer = self.layers[desc.digest]
                if layer.output is None:  # foreign: its blob stays where its urls say
                    layers.append(old_raw)
                    continue
                build = layer.output.build
                blob = NewBlob(
                    build.blob_digest, build.size, layer_media_type(doc.media_type, self.opts.oci)
                )
                layers.append(
                    new_layer_descriptor(old_raw, blob, build.toc_digest, build.uncompressed_size)
                )
            diff_ids = [
                self.layers[d.digest].output.build.diff_id  # type: ignore[union-attr]
                if self.layers[d.digest].output
                else self.layers[d.digest].diff_id
                for d in doc.layers
            ]
            config = new_config(node.config, diff_ids, f"config of {what}")
            config_digest = Digest.of(config)
            await self._push(config, config_digest)
            raw, media_type = new_manifest(
                doc.raw,
                doc.media_type,
                NewBlob(config_digest, len(config), doc.config.media_type),
                layers,
                oci=self.opts.oci,
                what=what,
            )
        digest = await self.dst.put_manifest(raw, media_type, tagged=tagged)
        return NewBlob(digest, len(raw), media_type)


async def _collect_cycles() -> None:
    """Free upload buffers that only the cyclic GC can free, while layers upload.

    Each httpx response is in a reference cycle with its stream (Response ->
    BoundAsyncStream -> Response), and holds its request, so every 16 MiB PATCH body
    of `RegistryClient.push_blob` stays alive until the cyclic GC runs: a 1 GiB layer
    upload peaked at ~400 MiB. Collecting twice a second bounds that; drop this once
    the registry session breaks the cycle itself.
    """
    while True:
        await trio.sleep(_GC_INTERVAL)
        gc.collect()


def _manifests(node: _Node):  # type: ignore[no-untyped-def]
    if isinstance(node.doc, Manifest):
        yield node
    for _, child in node.children:
        yield from _manifests(child)


def _raw_layers(doc: Manifest) -> list[dict]:
    return list(json.loads(doc.raw)["layers"])


def _in_context(exc: errors.LazysnapError, what: str) -> errors.LazysnapError:
    cat = errors.category(exc) or errors.LazysnapError
    return cat(f"{what}: {exc}")


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that started it: not a layer that merely stopped because of it."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                walk(e)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if not isinstance(exc, ConversionStopped | trio.Cancelled):
            return exc
    # Cancelled from outside: re-raise it, so the cancel scope that asked catches it.
    return next((e for e in leaves if isinstance(e, trio.Cancelled)), leaves[0])
