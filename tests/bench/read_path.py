"""Read path and metadata: a lazily-mounted layer read from the host against native disk.

The layer is read where lazysnap serves it (`<root>/repo/<id>/`, found via status.json),
and the native baseline is the same tree in the image cache on the same disk.
Read path, for the big-file image: sequential reads in 1 MiB blocks and 4 KiB random
preads, in three states: `cold` (chunks come from the registry through the shaped link),
`cached` (chunks in lazysnap's cache, page cache dropped; native: page cache dropped) and
`warm` (page cache hot); and, once the layer is complete and copied out by
`native_layers`, the copy (`lazysnap native dir`, page cache dropped). Cold sequential is
compared with the link's bandwidth when shaped. Metadata, for manyfiles: `find -ls` (a stat
per entry) over the 30,000-file tree, first traversal after a page-cache drop and second
traversal, against native and against a trivial in-memory pyfuse3 tree of the same shape
(`trivialfs.py`), the floor for FUSE.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.bench.catalog import BuiltImage
from tests.bench.context import Context, daemon_status, layer_path
from tests.bench.link import CONDITIONS, Condition, ShapedLink
from tests.bench.modes import MODES, drop_caches, open_stack, pull
from tests.bench.results import Record
from tests.e2e.harness import REPO_ROOT, wait_for

__all__ = ["run", "run_metadata"]

_BLOCK = 1024 * 1024
_PAGE = 4096


def _seq_read(path: Path) -> tuple[int, float]:
    buf = bytearray(_BLOCK)
    total = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total, time.perf_counter() - t


def _random_reads(path: Path, offsets: list[int]) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, _PAGE, off)) != _PAGE:
                raise RuntimeError(f"{path}: short read at {off}")
        return time.perf_counter() - t
    finally:
        os.close(fd)


def _offsets(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, size // _PAGE) * _PAGE for _ in range(count)]


def _read_condition(ctx: Context) -> Condition:
    shaped = [c for c in ctx.conditions if c.bandwidth]
    return shaped[0] if shaped else CONDITIONS["unshaped"]


def run(ctx: Context) -> None:
    image = ctx.image("bigfile")
    native = image.layer_dirs[-1] / "data" / "big.bin"
    size = native.stat().st_size
    cond = _read_condition(ctx)
    n_random = 2_000 if ctx.smoke else 5_000
    n_cold_random = 8 if ctx.smoke else 32
    mode = MODES["lazysnap"]

    def add(case: str, variant: str, value: float, rep: int, baseline: str = "native",
            unit: str = "MB/s") -> None:
        metric = {"MB/s": "throughput", "IOPS": "iops", "ms/read": "latency"}[unit]
        ctx.results.add(Record("read_path", case, variant, metric, value, unit, rep, baseline,
                               higher_is_better=unit != "ms/read"))
        ctx.log(f"read_path {case} {variant} rep {rep}: {value:.1f} {unit}")

    for rep in range(ctx.reps):
        offsets = _offsets(size, n_random, seed=rep)
        cold_offsets = _offsets(size, n_cold_random, seed=1000 + rep)
        # Native first: drop, read (disk), read again (page cache).
        drop_caches()
        n, s = _seq_read(native)
        add("seq cached (page cache dropped)", "native", n / s / 1e6, rep)
        n, s = _seq_read(native)
        add("seq warm", "native", n / s / 1e6, rep)
        drop_caches()
        add("rand4k cached (page cache dropped)", "native",
            len(offsets) / _random_reads(native, offsets), rep, unit="IOPS")
        add("rand4k warm", "native", len(offsets) / _random_reads(native, offsets), rep,
            unit="IOPS")
        if cond.bandwidth:
            add(f"seq cold @ {cond.name}", "link", cond.bandwidth / 1e6, rep, baseline="link")

        with open_stack(mode, ctx.workdir(f"read-{rep}")) as stack, \
                ShapedLink(("127.0.0.1", ctx.catalog.registry.port), cond) as link:
            pull(stack, mode, image.ref(link.host, esgz=True))
            lazy = layer_path(stack, image) / "data" / "big.bin"
            drop_caches()
            link.reset()
            n, s = _seq_read(lazy)
            if n != size:
                raise RuntimeError(f"{lazy}: read {n} bytes, expected {size}")
            add(f"seq cold @ {cond.name}", "lazysnap", n / s / 1e6, rep,
                baseline="link" if cond.bandwidth else "")
            ctx.results.add(Record("read_path", f"seq cold @ {cond.name}", "lazysnap",
                                   "fetch_amplification", link.counts().down / n, "x", rep))
            drop_caches()
            n, s = _seq_read(lazy)
            add("seq cached (page cache dropped)", "lazysnap", n / s / 1e6, rep)
            n, s = _seq_read(lazy)
            add("seq warm", "lazysnap", n / s / 1e6, rep)
            drop_caches()
            add("rand4k cached (page cache dropped)", "lazysnap",
                len(offsets) / _random_reads(lazy, offsets), rep, unit="IOPS")
            add("rand4k warm", "lazysnap", len(offsets) / _random_reads(lazy, offsets), rep,
                unit="IOPS")

        _native_dir_read(ctx, image, size, rep, add)

        # Cold random reads need a cache that the sequential pass has not filled.
        with open_stack(mode, ctx.workdir(f"read-rand-{rep}")) as stack, \
                ShapedLink(("127.0.0.1", ctx.catalog.registry.port), cond) as link:
            pull(stack, mode, image.ref(link.host, esgz=True))
            lazy = layer_path(stack, image) / "data" / "big.bin"
            drop_caches()
            link.reset()
            s = _random_reads(lazy, cold_offsets)
            add(f"rand4k cold @ {cond.name}", "lazysnap", s / len(cold_offsets) * 1000, rep,
                baseline="", unit="ms/read")
            ctx.results.add(Record("read_path", f"rand4k cold @ {cond.name}", "lazysnap",
                                   "bytes", link.counts().down, "B", rep))


def _native_dir_read(ctx: Context, image: BuiltImage, size: int, rep: int,
                     add: Callable[..., None]) -> None:
    """Issue 6: once every chunk of a layer is cached, `native_layers` copies it out to a
    plain directory that new containers use as their lowerdir. Fill the cache over an
    unshaped link, wait for the copy, then read it with the page cache dropped (in its own
    stack, so the copy cannot disturb the measurements above). Its baseline is a copy of
    the native file written just before, on the same disk: a file written seconds ago is
    still in the virtual disk's host-side cache even with the guest's page cache
    dropped, so against the months-old image file it would read several times faster
    than native, which measures the host and not lazysnap."""
    mode = MODES["lazysnap"]
    args = ("--native-layers", "--background-fetch")
    digest = image.esgz_manifest["layers"][-1]["digest"]
    with open_stack(mode, ctx.workdir(f"read-native-{rep}"), extra_daemon_args=args) as stack, \
            ShapedLink(("127.0.0.1", ctx.catalog.registry.port), CONDITIONS["unshaped"]) as link:
        pull(stack, mode, image.ref(link.host, esgz=True))
        n, _ = _seq_read(layer_path(stack, image) / "data" / "big.bin")
        if n != size:
            raise RuntimeError(f"read {n} bytes of big.bin, expected {size}")
        found: dict[str, str] = {}

        def ready() -> bool:
            for row in daemon_status(stack, time.time()).get("layers", []):
                if row["layer_digest"] == digest and row.get("native"):
                    found["dir"] = row["native"]
                    return True
            return False

        wait_for(ready, 600, f"the native directory of {digest}", interval=2.0)
        native_copy = Path(found["dir"]) / "data" / "big.bin"
        fresh = ctx.workdir(f"read-native-{rep}") / "big-fresh.bin"
        shutil.copyfile(image.layer_dirs[-1] / "data" / "big.bin", fresh)
        case = "seq cached, files just written (page cache dropped)"
        for variant, path in (("native", fresh), ("lazysnap native dir", native_copy)):
            drop_caches()
            n, s = _seq_read(path)
            add(case, variant, n / s / 1e6, rep)
        fresh.unlink()


def _find(path: Path) -> tuple[float, int]:
    t = time.perf_counter()
    done = subprocess.run(["find", str(path), "-ls"], capture_output=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"find {path}: {done.stderr.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t, done.stdout.count(b"\n")


@contextlib.contextmanager
def _trivial_mount(src: Path, mountpoint: Path) -> Iterator[Path]:
    """The same tree served by `trivialfs` (pyfuse3, all in memory)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.trivialfs", str(src),
                             str(mountpoint)], stdout=subprocess.PIPE, cwd=REPO_ROOT)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"trivialfs on {mountpoint} did not start")
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True,
                       timeout=60)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_metadata(ctx: Context) -> None:
    image = ctx.image("manyfiles")
    native = image.layer_dirs[-1] / "files"
    mode = MODES["lazysnap"]

    def add(case: str, variant: str, seconds: float, entries: int, rep: int) -> None:
        ctx.results.add(Record("metadata", case, variant, "s", seconds, "s", rep, "native",
                               extra={"entries": entries}))
        if variant != "native":
            # The target is against the pyfuse3 floor, so compare with it as well.
            ctx.results.add(Record("metadata", f"{case} (vs pyfuse3 floor)", variant, "s",
                                   seconds, "s", rep, "pyfuse3-trivial"))
        ctx.log(f"metadata {case} {variant} rep {rep}: {seconds:.3f}s ({entries} entries)")

    for rep in range(ctx.reps):
        drop_caches()
        s1, n1 = _find(native)
        s2, n2 = _find(native)
        add("find -ls, first", "native", s1, n1, rep)
        add("find -ls, second", "native", s2, n2, rep)
        with _trivial_mount(native, ctx.workdir(f"trivial-{rep}") / "mnt") as mnt:
            drop_caches()
            s1, t1 = _find(mnt)
            s2, t2 = _find(mnt)
        if (t1, t2) != (n1, n1):
            raise RuntimeError(f"find over trivialfs saw {t1}/{t2} entries, native {n1}")
        add("find -ls, first", "pyfuse3-trivial", s1, t1, rep)
        add("find -ls, second", "pyfuse3-trivial", s2, t2, rep)
        with open_stack(mode, ctx.workdir(f"meta-{rep}")) as stack, \
                ShapedLink(("127.0.0.1", ctx.catalog.registry.port),
                           CONDITIONS["unshaped"]) as link:
            pull(stack, mode, image.ref(link.host, esgz=True))
            lazy = layer_path(stack, image) / "files"
            drop_caches()
            s1, m1 = _find(lazy)
            s2, m2 = _find(lazy)
        if (m1, m2) != (n1, n1):
            raise RuntimeError(f"find over the lazy layer saw {m1}/{m2} entries, native {n1}")
        add("find -ls, first", "lazysnap", s1, m1, rep)
        add("find -ls, second", "lazysnap", s2, m2, rep)
