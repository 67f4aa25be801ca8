"""`FuseRemoteLayers`, the remote-layer policy, on a real trio loop with real parts below it:
the RegistryClient over an in-memory registry (`httpx.MockTransport`), eStargz blobs built
by `format/build.py`, a real chunk cache and repository, and the real mount where the
kernel's view matters. No containerd: Prepare's labels are written here as ctr-remote
and CRI send them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import random
import tarfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from snapshotter import labels as L
from snapshotter.bridge import FuseRemoteLayers, LayerFallback
from snapshotter.cache.chunks import ChunkCache
from snapshotter.config import Config
from snapshotter.core.remote import RemoteRequired
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.errors import AlreadyExists, FailedPrecondition, Unavailable
from snapshotter.format.build import build_estargz
from snapshotter.format.estargz import TOC_NAME, footer_bytes
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.fs.mount import mounted, run_repository
from snapshotter.fs.repository import Repository
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.retry import RetryPolicy
from tests.registry.fakeregistry import FakeRegistry

FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_time=3.0)
IMAGE = "registry.test/app:v1"
CHUNK = 64 << 10
FILES = {
    "etc/hello.txt": b"hello from a lazy layer\n",
    "usr/big.bin": random.Random(5).randbytes(3 * CHUNK + 17),
}


def _tar(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class Layer:
    digest: str
    toc_digest: str
    size: int


def _push_estargz(fake: FakeRegistry, files: Mapping[str, bytes] = FILES) -> Layer:
    out = io.BytesIO()
    result = build_estargz(io.BytesIO(_tar(files)), out, chunk_size=CHUNK)
    return Layer(fake.add_blob(out.getvalue()), str(result.toc_digest), result.size)


def _blob_with_toc(toc: dict[str, object]) -> tuple[bytes, str]:
    """An eStargz-shaped blob whose TOC is `toc`, verbatim, with its true digest."""
    raw = json.dumps(toc).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(raw)
        tf.addfile(info, io.BytesIO(raw))
    # A leading member, so the TOC does not start at offset 0 like nothing real does.
    blob = gzip.compress(b"\0" * 512) + gzip.compress(buf.getvalue())
    toc_offset = len(gzip.compress(b"\0" * 512))
    return blob + footer_bytes(toc_offset), "sha256:" + hashlib.sha256(raw).hexdigest()


def _labels(layer: str, toc: str = "", *, cri: bool = False, ref: str = IMAGE) -> dict[str, str]:
    """Prepare's labels: ctr-remote's `remote/stargz.*` keys, or the CRI ones."""
    chain = "sha256:" + hashlib.sha256(layer.encode()).hexdigest()
    out = {L.SNAPSHOT_REF: chain, L.GC_ROOT: "2024-01-01T00:00:00Z"}
    if cri:
        out |= {L.CRI_IMAGE_REF: ref, L.CRI_LAYER_DIGEST: layer, L.CRI_IMAGE_LAYERS: layer}
    else:
        out |= {L.STARGZ_REFERENCE: ref, L.STARGZ_DIGEST: layer, L.STARGZ_LAYERS: layer}
    if toc:
        out[L.TOC_DIGEST] = toc
    return out


@dataclass
class Bench:
    """One bridge on the running trio loop, called from worker threads like gRPC does."""

    bridge: FuseRemoteLayers
    repo: Repository
    fake: FakeRegistry
    cfg: Config
    keys: list[int] = field(default_factory=lambda: [0])

    async def prepare(self, labels: Mapping[str, str]) -> str | None:
        self.keys[0] += 1
        key = f"default/{self.keys[0]}/extract {labels.get(L.SNAPSHOT_REF, '')}"
        return await trio.to_thread.run_sync(self.bridge.prepare, key, "", labels)

    async def call(self, method: str, handle: str) -> None:
        await trio.to_thread.run_sync(getattr(self.bridge, method), handle)


MakeBench = Callable[..., Bench]


@pytest.fixture
async def make_bench(tmp_path: Path) -> AsyncIterator[MakeBench]:
    """Benches share the root (so a second one is "the daemon after a restart"), the
    cache, and by default the registry."""
    clients: list[RegistryClient] = []
    default_fake = FakeRegistry()
    with ChunkCache(tmp_path / "root" / "cache", max_bytes=64 << 20) as cache:

        def make(fake: FakeRegistry | None = None, **cfg: object) -> Bench:
            fake = fake or default_fake
            config = Config(root=tmp_path / "root", fetch_timeout=5.0, **cfg)  # type: ignore[arg-type]
            client = RegistryClient(
                hosts_dir=None, docker_config=tmp_path / "no-config.json",
                retry=FAST_RETRY, transport=fake.transport(),
            )
            clients.append(client)
            repo = Repository()
            bridge = FuseRemoteLayers(
                config, repository=repo, client=client, cache=cache,
                token=trio.lowlevel.current_trio_token(),
            )
            return Bench(bridge, repo, fake, config)

        try:
            yield make
        finally:
            for client in clients:
                await client.aclose()


@pytest.fixture
def bench(make_bench: MakeBench) -> Bench:
    return make_bench()


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "lazysnap.remote" and "fallback" in r.getMessage()]


# -- decisions ------------------------------------------------------------------------


@pytest.mark.parametrize("cri", [False, True], ids=["ctr-remote-labels", "cri-labels"])
async def test_estargz_layer_is_lazy(bench: Bench, cri: bool) -> None:
    layer = _push_estargz(bench.fake)
    handle = await bench.prepare(_labels(layer.digest, layer.toc_digest, cri=cri))
    assert handle is not None
    h = json.loads(handle)
    assert (h["mode"], h["digest"], h["size"]) == ("lazy", layer.digest, layer.size)
    assert bench.repo.layer_ids() == [h["dir"]]
    assert bench.bridge.lowerdir(handle) == str(bench.cfg.root / "repo" / h["dir"])
    status = bench.bridge.status()
    assert status["fallback_counts"] == {}
    [row] = status["layers"]
    assert (row["image_ref"], row["layer_digest"], row["mode"]) == (IMAGE, layer.digest, "lazy")
    assert (row["size"], row["snapshots"], row["bytes_fetched"]) == (layer.size, 1, 0)
    # Only the footer and the TOC member were fetched, with Range requests.
    gets = [s for s in bench.fake.seen if s.method == "GET"]
    assert len(gets) == 2 and all(s.headers.get("range") for s in gets)


def _no_ref(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = _push_estargz(fake)
    labels = _labels(layer.digest, layer.toc_digest)
    del labels[L.STARGZ_REFERENCE]
    return labels, layer.digest


def _no_toc(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = _push_estargz(fake)
    return _labels(layer.digest), layer.digest


def _plain_gzip(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    digest = fake.add_blob(gzip.compress(_tar(FILES)))
    return _labels(digest, "sha256:" + "0" * 64), digest


def _unreachable(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = _push_estargz(fake)
    fake.script(f"/v2/app/blobs/{layer.digest}", ["connect"] * 10)
    return _labels(layer.digest, layer.toc_digest), layer.digest


def _hostile(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    blob, toc = _blob_with_toc(
        {"version": 1, "entries": [{"name": "../../etc/shadow", "type": "reg", "size": 0}]}
    )
    digest = fake.add_blob(blob)
    return _labels(digest, toc), digest


def _wrong_toc_digest(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = _push_estargz(fake)
    return _labels(layer.digest, "sha256:" + "1" * 64), layer.digest


def _unauthorized(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    layer = _push_estargz(fake)
    fake.auth, fake.users = "basic", {"someone": "else"}
    return _labels(layer.digest, layer.toc_digest), layer.digest


def _missing_blob(fake: FakeRegistry) -> tuple[dict[str, str], str]:
    return _labels("sha256:" + "2" * 64, "sha256:" + "3" * 64), "sha256:" + "2" * 64


CASES = {
    "no-source-labels": _no_ref,
    "no-toc-digest": _no_toc,
    "not-estargz": _plain_gzip,
    "registry-unavailable": _unreachable,
    "invalid-layer": _hostile,
    "verification-failed": _wrong_toc_digest,
    "unauthorized": _unauthorized,
    "not-found": _missing_blob,
}


@pytest.mark.parametrize("reason", list(CASES))
async def test_fallback_is_counted_and_logged_with_the_layer_digest(
    bench: Bench, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lazysnap.remote")
    labels, digest = CASES[reason](bench.fake)
    assert await bench.prepare(labels) is None
    status = bench.bridge.status()
    assert status["fallback_counts"] == {reason: 1}
    [fb] = status["fallbacks"]
    assert (fb["layer_digest"], fb["reason"]) == (digest, reason)
    assert fb["detail"]
    [line] = _fallback_lines(caplog)
    assert digest in line and reason in line
    assert status["layers"] == [] and bench.repo.layer_ids() == []


async def test_fallbacks_accumulate_per_reason(bench: Bench) -> None:
    for make in (_no_toc, _no_toc, _plain_gzip):
        labels, _ = make(bench.fake)
        assert await bench.prepare(labels) is None
    assert bench.bridge.status()["fallback_counts"] == {"no-toc-digest": 2, "not-estargz": 1}


async def test_concurrent_fallbacks_are_all_counted(bench: Bench) -> None:
    labels = [_no_toc(bench.fake)[0] for _ in range(32)]
    async with trio.open_nursery() as nursery:
        for one in labels:
            nursery.start_soon(bench.prepare, one)
    status = bench.bridge.status()
    assert status["fallback_counts"] == {"no-toc-digest": 32}
    assert len(status["fallbacks"]) == 32


async def test_unverified_layer_only_with_skipverify_and_allow_no_verification(
    make_bench: MakeBench,
) -> None:
    allowing = make_bench(allow_no_verification=True)
    layer = _push_estargz(allowing.fake)
    skip = _labels(layer.digest) | {L.STARGZ_SKIPVERIFY: "true"}
    assert await allowing.prepare(_labels(layer.digest)) is None  # the label is needed too
    assert await allowing.prepare(skip) is not None
    strict = make_bench()
    assert await strict.prepare(skip) is None  # and so is the config switch
    assert strict.bridge.status()["fallback_counts"] == {"no-toc-digest": 1}


async def test_lazy_off_makes_every_layer_ordinary(make_bench: MakeBench) -> None:
    bench = make_bench(lazy=False)
    layer = _push_estargz(bench.fake)
    assert await bench.prepare(_labels(layer.digest, layer.toc_digest)) is None
    assert bench.fake.seen == []


@pytest.mark.allow_log_errors
@pytest.mark.parametrize("reason", ["no-toc-digest", "registry-unavailable", "invalid-layer"])
async def test_require_lazy_refuses_instead_of_falling_back(
    make_bench: MakeBench, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    bench = make_bench(require_lazy=True)
    labels, digest = CASES[reason](bench.fake)
    with pytest.raises(LayerFallback) as refused:
        await bench.prepare(labels)
    assert isinstance(refused.value, RemoteRequired)
    assert isinstance(refused.value, FailedPrecondition)
    assert digest in str(refused.value)
    assert bench.bridge.status()["fallback_counts"] == {reason: 1}
    assert any(r.levelno == logging.ERROR and digest in r.getMessage() for r in caplog.records)


@pytest.mark.allow_log_errors
async def test_require_lazy_reaches_the_caller_of_core_prepare(make_bench: MakeBench) -> None:
    """Core passes RemoteRequired on (gRPC: FAILED_PRECONDITION) and creates nothing."""
    bench = make_bench(require_lazy=True)
    labels, _ = _no_toc(bench.fake)
    sn = await trio.to_thread.run_sync(partial(Snapshotter, bench.cfg.root, remote=bench.bridge))
    try:
        with pytest.raises(RemoteRequired):
            await trio.to_thread.run_sync(sn.prepare, "extract-1", "", labels)
        assert await trio.to_thread.run_sync(sn.walk) == []
    finally:
        sn.close()


async def test_core_commits_a_lazy_layer_and_answers_already_exists(bench: Bench) -> None:
    layer = _push_estargz(bench.fake)
    labels = _labels(layer.digest, layer.toc_digest)
    sn = await trio.to_thread.run_sync(partial(Snapshotter, bench.cfg.root, remote=bench.bridge))
    try:
        with pytest.raises(AlreadyExists):
            await trio.to_thread.run_sync(sn.prepare, "extract-1", "", labels)
        info = await trio.to_thread.run_sync(sn.stat, labels[L.SNAPSHOT_REF])
        assert info.labels[L.REMOTE] == L.REMOTE_VALUE
        assert len(bench.repo.layer_ids()) == 1
    finally:
        sn.close()


# -- sharing ------------------------------------------------------------------------------


async def test_snapshots_of_one_layer_share_one_repository_dir(bench: Bench) -> None:
    layer = _push_estargz(bench.fake)
    first = await bench.prepare(_labels(layer.digest, layer.toc_digest))
    # The same layer in another image: another reference, another chain.
    second = await bench.prepare(
        _labels(layer.digest, layer.toc_digest, cri=True, ref="registry.test/other:v2")
    )
    assert first is not None and second is not None
    assert bench.bridge.lowerdir(first) == bench.bridge.lowerdir(second)
    assert len(bench.repo.layer_ids()) == 1
    assert [r["snapshots"] for r in bench.bridge.status()["layers"]] == [2]

    await bench.call("release", first)
    assert len(bench.repo.layer_ids()) == 1
    await bench.call("check", second)
    await bench.call("release", second)
    assert bench.repo.layer_ids() == [] and bench.bridge.status()["layers"] == []

    third = await bench.prepare(_labels(layer.digest, layer.toc_digest))
    assert third is not None and json.loads(third)["dir"] != json.loads(first)["dir"]


async def test_concurrent_prepares_of_one_layer_share_it(bench: Bench) -> None:
    """Two images with a common layer pulled at once: both lazy, one dir."""
    layer = _push_estargz(bench.fake)
    handles: list[str | None] = []

    async def one(ref: str) -> None:
        handles.append(await bench.prepare(_labels(layer.digest, layer.toc_digest, ref=ref)))

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, f"registry.test/app{i}:v1")
    assert None not in handles
    assert len({json.loads(h)["dir"] for h in handles if h}) == 1
    assert bench.bridge.status()["fallback_counts"] == {}
    assert [r["snapshots"] for r in bench.bridge.status()["layers"]] == [4]
    assert len(bench.repo.layer_ids()) == 1


# -- repository roots ---------------------------------------------------------------------


async def test_layer_found_in_a_repository_root_is_used_as_is(
    make_bench: MakeBench, tmp_path: Path
) -> None:
    roots = [tmp_path / "empty-root", tmp_path / "unpacked"]
    bench = make_bench(repository_roots=[str(r) for r in roots])
    layer = _push_estargz(bench.fake)
    hexd = layer.digest.removeprefix("sha256:")
    layerfs = roots[1] / hexd[:2] / hexd / "layerfs"
    layerfs.mkdir(parents=True)
    handle = await bench.prepare(_labels(layer.digest, layer.toc_digest))
    assert handle is not None
    assert bench.bridge.lowerdir(handle) == str(layerfs)
    assert bench.fake.seen == [] and bench.repo.layer_ids() == []
    await bench.call("check", handle)
    [row] = bench.bridge.status()["layers"]
    assert (row["layer_digest"], row["path"]) == (layer.digest, str(layerfs))
    assert row["mode"].startswith("path")

    layerfs.rmdir()
    with pytest.raises(Unavailable):
        await bench.call("check", handle)
    await bench.call("release", handle)
    assert bench.bridge.status()["layers"] == []


# -- restart ------------------------------------------------------------------------------


def _down() -> FakeRegistry:
    """A registry that refuses every connection."""
    fake = FakeRegistry()
    fake.transport = lambda: httpx.MockTransport(_refuse)  # type: ignore[method-assign]
    return fake


def _refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_restart_restores_from_the_stored_toc_without_the_registry(
    make_bench: MakeBench,
) -> None:
    before = make_bench()
    layer = _push_estargz(before.fake)
    handle = await before.prepare(_labels(layer.digest, layer.toc_digest))
    assert handle is not None

    after = make_bench()  # same root: the daemon after a restart
    asked = len(after.fake.seen)
    await after.call("restore", handle)
    await after.call("check", handle)
    assert len(after.fake.seen) == asked, "restore went to the registry"
    assert after.repo.layer_ids() == [json.loads(handle)["dir"]]
    [row] = after.bridge.status()["layers"]
    assert (row["mode"], row["snapshots"]) == ("lazy", 1)
    # New layers get new dirs, not the restored one's.
    other = _push_estargz(after.fake, {"x": b"x"})
    new = await after.prepare(_labels(other.digest, other.toc_digest))
    assert new is not None and json.loads(new)["dir"] != json.loads(handle)["dir"]


async def test_restart_without_a_stored_toc_fetches_it_on_first_use(
    make_bench: MakeBench, tmp_path: Path
) -> None:
    """Boot never waits for the registry: a layer whose TOC is not on disk is attached
    by `check` (containerd's first Prepare or Mounts above it), and its TOC kept then."""
    before = make_bench()
    layer = _push_estargz(before.fake)
    handle = await before.prepare(_labels(layer.digest, layer.toc_digest))
    assert handle is not None
    for stored in (tmp_path / "root" / "tocs").iterdir():
        stored.unlink()

    broken = _down()
    after = make_bench(broken)
    await after.call("restore", handle)
    assert after.repo.layer_ids() == []
    [row] = after.bridge.status()["layers"]
    assert row["mode"] == "lazy (not restored)" and "first use" in row["error"]
    with pytest.raises(Unavailable):
        await after.call("check", handle)
    [row] = after.bridge.status()["layers"]
    assert row["mode"] == "lazy (not restored)" and row["error"]

    # The registry is back (a fresh client on the good registry stands in for that).
    back = make_bench()
    await back.call("restore", handle)
    await back.call("check", handle)
    assert back.repo.layer_ids() == [json.loads(handle)["dir"]]
    assert [r["error"] for r in back.bridge.status()["layers"]] == [""]
    # The TOC fetched on first use is stored: the next start needs no registry again.
    again = make_bench(_down())
    await again.call("restore", handle)
    assert again.repo.layer_ids() == [json.loads(handle)["dir"]]


# -- the kernel's view ---------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.root
async def test_released_snapshot_leaves_the_shared_layer_readable(bench: Bench) -> None:
    layer = _push_estargz(bench.fake)
    mountpoint = bench.cfg.root / "repo"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_repository, mountpoint, bench.repo, read_timeout=5))
        try:
            first = await bench.prepare(_labels(layer.digest, layer.toc_digest))
            second = await bench.prepare(_labels(layer.digest, layer.toc_digest, cri=True))
            assert first is not None and second is not None
            top = Path(bench.bridge.lowerdir(second))
            # What core does with a lazy parent: stat its root, name it as lowerdir.
            sn = await trio.to_thread.run_sync(
                partial(Snapshotter, bench.cfg.root / "core", remote=bench.bridge)
            )
            try:
                labels = _labels(layer.digest, layer.toc_digest, ref="registry.test/third:v3")
                with pytest.raises(AlreadyExists):
                    await trio.to_thread.run_sync(sn.prepare, "extract-1", "", labels)
                mounts = await trio.to_thread.run_sync(
                    sn.prepare, "container", labels[L.SNAPSHOT_REF], {}
                )
                assert f"lowerdir={top}" in mounts[0].options
                await trio.to_thread.run_sync(sn.remove, "container")
                await trio.to_thread.run_sync(sn.remove, labels[L.SNAPSHOT_REF])
            finally:
                sn.close()
            await bench.call("release", first)
            big = await trio.to_thread.run_sync((top / "usr/big.bin").read_bytes)
            assert big == FILES["usr/big.bin"]
            [row] = bench.bridge.status()["layers"]
            assert row["bytes_fetched"] > 0 and row["percent_fetched"] > 0
            await bench.call("release", second)
            assert not await trio.to_thread.run_sync(top.exists)
        finally:
            nursery.cancel_scope.cancel()
    assert mounted(mountpoint) == []


async def test_restart_restores_repository_path_layers(
    make_bench: MakeBench, tmp_path: Path
) -> None:
    roots = tmp_path / "unpacked"
    before = make_bench(repository_roots=[str(roots)])
    layer = _push_estargz(before.fake)
    hexd = layer.digest.removeprefix("sha256:")
    (roots / hexd[:2] / hexd / "layerfs").mkdir(parents=True)
    handle = await before.prepare(_labels(layer.digest, layer.toc_digest))
    assert handle is not None

    after = make_bench(repository_roots=[str(roots)])
    await after.call("restore", handle)
    assert [(r["mode"], r["snapshots"]) for r in after.bridge.status()["layers"]] == [("path", 1)]
    await after.call("release", handle)
    assert after.bridge.status()["layers"] == []


async def test_a_failed_attach_leaves_no_row_behind(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    """Something else holds the layer's dir in the repository: fall back, and forget it."""
    caplog.set_level(logging.INFO, logger="lazysnap.remote")
    squatter = _push_estargz(bench.fake, {"other": b"x"})
    first = await bench.prepare(_labels(squatter.digest, squatter.toc_digest))
    assert first is not None and json.loads(first)["dir"] == "1"
    bench.repo.detach("1")
    bench.repo.attach("2", Toc(entries=[Entry("", "dir", mode=0o755)]), _NoChunks())
    layer = _push_estargz(bench.fake)
    assert await bench.prepare(_labels(layer.digest, layer.toc_digest)) is None
    assert bench.bridge.status()["fallback_counts"] == {"internal-error": 1}
    assert [r["layer_digest"] for r in bench.bridge.status()["layers"]] == [squatter.digest]


class _NoChunks:
    async def read_chunk(self, chunk: Chunk) -> bytes:
        raise AssertionError(f"nothing should read {chunk}")
