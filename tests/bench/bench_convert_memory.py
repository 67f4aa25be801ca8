"""Peak memory of `lazysnap convert` on one large generated layer (issue 4's 1 GiB target).

Standalone: `python -m tests.bench.bench_convert_memory [--smoke] [--size 1GiB] [--registry]`.
It writes an OCI layout holding one gzip layer of `--size` uncompressed bytes (large and
small files, half incompressible, half text-like), converts it with `python -m snapshotter
convert` as a child process (layout to layout, or with `--registry` registry to registry
through a loopback docker-registry), and reads the child's peak RSS (getrusage). It prints
the peak, the peak per layer byte, and the baseline of the same command on a tiny layer;
it exits 1 if the peak is over `--limit` (default 200 MiB). `--smoke` uses 64 MiB.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def vm_kib(field: str) -> int:
    """VmHWM/VmRSS of this process in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


# VmHWM, not getrusage: Linux carries ru_maxrss across execve, so a child would report
# its parent's peak (e.g. after push_layout) if that was higher.
_CHILD = (
    "import sys\n"
    "from snapshotter.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(next(int(x.split()[1]) for x in open('/proc/self/status') if x[:6] == 'VmHWM:'))\n"
    "sys.exit(rc)\n"
)


class _HashingWriter:
    """The tar stream on its way into gzip: its sha256 is the layer's diff_id."""

    def __init__(self, out: gzip.GzipFile) -> None:
        self.out, self.sha = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.out.write(data)


class _Content:
    """`size` bytes made on demand: incompressible or text-like, never all in memory."""

    def __init__(self, size: int, seed: int, text: bool) -> None:
        self.left, self.rng, self.text = size, random.Random(seed), text

    def read(self, n: int = -1) -> bytes:
        n = min(self.left if n < 0 else n, self.left, MiB)
        self.left -= n
        if self.text:
            words = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "
            return (words * (n // len(words) + 1))[:n]
        return self.rng.randbytes(n)


def _files(total: int) -> list[tuple[str, int, bool]]:
    """A few big files (several chunks each) and many small ones, like real images."""
    files, used, i = [], 0, 0
    big = max(total // 4, 1)
    while used < total:
        size = min(big if i < 3 else 64 * 1024 + i % 4096, total - used)
        files.append((f"data/{'big' if i < 3 else 'small'}/f{i:06d}", size, i % 2 == 1))
        used += size
        i += 1
    return files


def write_layout(root: Path, size: int) -> None:
    blobs = root / "blobs/sha256"
    blobs.mkdir(parents=True)
    layer = root / "layer.tmp"
    with gzip.GzipFile(layer, "wb", compresslevel=1, mtime=0) as gz:
        sink = _HashingWriter(gz)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
            for d in ("data", "data/big", "data/small"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            for i, (name, n, text) in enumerate(_files(size)):
                info = tarfile.TarInfo(name)
                info.size, info.mode = n, 0o644
                tf.addfile(info, _Content(n, i, text))
    diff_id = "sha256:" + sink.sha.hexdigest()
    blob_sha = hashlib.sha256()
    with open(layer, "rb") as f:
        while piece := f.read(MiB):
            blob_sha.update(piece)
    layer_digest = "sha256:" + blob_sha.hexdigest()
    layer.rename(blobs / blob_sha.hexdigest())

    def put(doc: dict) -> tuple[str, int]:
        raw = json.dumps(doc).encode()
        h = hashlib.sha256(raw).hexdigest()
        (blobs / h).write_bytes(raw)
        return "sha256:" + h, len(raw)

    config, config_size = put({"architecture": "amd64", "os": "linux",
                               "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    manifest, manifest_size = put({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                   "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": (blobs / layer_digest.removeprefix("sha256:")).stat().st_size}],
    })
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
        "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))


def push_layout(root: Path, ref: str) -> None:
    """Upload an OCI layout's image to a registry as is (blobs stream from disk)."""
    import trio

    from snapshotter.digest import Digest
    from snapshotter.registry.client import RegistryClient
    from snapshotter.registry.reference import Reference

    index = json.loads((root / "index.json").read_text())
    top = index["manifests"][0]
    raw = (root / "blobs/sha256" / top["digest"].removeprefix("sha256:")).read_bytes()
    manifest = json.loads(raw)

    async def main() -> None:
        client = RegistryClient(hosts_dir=None)
        target = Reference.parse(ref)
        try:
            for desc in [manifest["config"], *manifest["layers"]]:
                path = root / "blobs/sha256" / desc["digest"].removeprefix("sha256:")
                await client.push_blob(target, path, Digest.parse(desc["digest"]))
            await client.put_manifest(target, raw, top["mediaType"])
        finally:
            await client.aclose()

    trio.run(main)


def peak_rss_of_convert(
    src: str, dst: str, tmp: Path, level: int, extra: tuple[str, ...] = ()
) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one `lazysnap convert` child."""
    code = _CHILD
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code, "convert", "-q", "--compression-level", str(level),
         "--tmp-dir", str(tmp), *extra, src, dst],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    took = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"convert failed ({result.returncode}):\n{result.stderr}")
    return int(result.stdout.split()[-1]) * 1024, took


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.lower().removesuffix("b").removesuffix("i")
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="uncompressed layer size (default 1GiB)")
    parser.add_argument("--smoke", action="store_true", help="64MiB layer: a quick check")
    parser.add_argument("--limit", default="200MiB", help="peak RSS allowed (default 200MiB)")
    parser.add_argument("--level", type=int, default=9, help="gzip level for the output")
    parser.add_argument("--workdir", type=Path, default=None, help="where layouts go")
    parser.add_argument("--registry", action="store_true",
                        help="convert registry to registry (docker-registry on loopback)")
    parser.add_argument("--prioritize", action="store_true",
                        help="put two files first (the spooling path of the converter)")
    args = parser.parse_args()
    size = 64 * MiB if args.smoke else _size(args.size)
    limit = _size(args.limit)
    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "scratch").mkdir()
        registry = None
        if args.registry:
            from tests.e2e.harness import Registry

            registry = Registry(work / "registry").start()

        def location(name: str) -> str:
            if registry is None:
                return f"oci:{work / name}:v1"
            return f"{registry.host}/bench/{name}:v1"

        try:
            write_layout(work / "tiny", 64 * 1024)
            started = time.monotonic()
            write_layout(work / "src", size)
            made = time.monotonic() - started
            if registry is not None:
                push_layout(work / "tiny", location("tiny"))
                push_layout(work / "src", location("src"))
                print(f"(pushing the source with RegistryClient.push_blob: this process's "
                      f"peak RSS {vm_kib('VmHWM') / 1024:.1f} MiB)")
            baseline, _ = peak_rss_of_convert(location("tiny"), location("tiny-out"),
                                              work / "scratch", args.level)
            extra: tuple[str, ...] = ()
            if args.prioritize:
                (work / "prio.txt").write_text(f"{_files(size)[-1][0]}\ndata/big/f000001\n")
                extra = ("--prioritize", str(work / "prio.txt"))
            peak, took = peak_rss_of_convert(location("src"), location("out"),
                                             work / "scratch", args.level, extra)
            leftovers = list((work / "scratch").iterdir())
        finally:
            if registry is not None:
                registry.stop()
    print(f"layer: {size / MiB:.0f} MiB uncompressed (generated in {made:.1f}s)"
          + (", with --prioritize" if args.prioritize else "")
          + (", registry to registry" if args.registry else ", OCI layout to layout"))
    print(f"convert: {took:.1f}s, {size / MiB / took:.1f} MiB/s at gzip level {args.level}")
    print(f"peak RSS: {peak / MiB:.1f} MiB (baseline on a tiny layer {baseline / MiB:.1f} MiB, "
          f"+{(peak - baseline) / MiB:.1f} MiB for this layer)")
    print(f"peak RSS / layer size: {peak / size:.3f}")
    ok = peak <= limit and not leftovers
    print(f"{'PASS' if ok else 'FAIL'}: limit {limit / MiB:.0f} MiB"
          + (f"; temp files left: {leftovers}" if leftovers else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
