"""The benchmark images: recipes, their layer trees, and building them into a registry.

Every image is pushed twice to a registry whose storage lives in the cache directory: as
plain gzip (what `overlayfs` pulls) and as eStargz (what `lazysnap` pulls lazily). A rerun
finds both tags and builds nothing. The smoke set has the same image names with tiny
synthetic contents (busybox + a few MB), so every part runs the same code in CI.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.bench.convert import Converter
from tests.bench.oci import LayerFile, dir_to_layer, push_layers
from tests.bench.rootfs import apt_layer, debootstrap_rootfs
from tests.e2e.harness import Registry
from tests.e2e.images import BUSYBOX_APPLETS, MEDIA_MANIFEST

__all__ = ["BuiltImage", "Catalog", "Recipe", "recipes"]

# Bump when a recipe changes, so cached images from the old recipe are not reused.
RECIPE_VERSION = "v1"
KiB, MiB, GiB = 1024, 1024**2, 1024**3
SCIPY_STACK = ("python3-numpy", "python3-scipy", "python3-pandas")


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: tuple[str, ...]  # layer names, bottom first (see Catalog.layer_dir)
    cmd: tuple[str, ...]  # the workload: the image's command
    level: int = 6  # gzip level of the plain image (docker's default is 6)


def recipes(smoke: bool) -> dict[str, Recipe]:
    find_files = ("sh", "-c", "find / -xdev -type f | wc -l")
    if smoke:
        rs = [
            Recipe("pyslim", ("busybox", "smoke-data"), ("sh", "-c", "cat /data/f0 | wc -c")),
            Recipe("pystack", ("busybox", "smoke-data", "smoke-extra"),
                   ("sh", "-c", "cat /extra/* | wc -c")),
            Recipe("manyfiles", ("busybox", "manyfiles"), find_files),
            Recipe("entries", ("busybox", "entries"), ("sh", "-c", "find / -xdev | wc -l")),
            Recipe("bigfile", ("busybox", "bigfile"), ("wc", "-c", "/data/big.bin"), level=1),
        ]
    else:
        rs = [
            Recipe("pyslim", ("debian-python",), ("python3", "-c", 'print("hello")')),
            Recipe("pystack", ("debian-python", "scipy-stack"),
                   ("python3", "-c", "import numpy, scipy, pandas; print('ok')")),
            Recipe("manyfiles", ("busybox", "manyfiles"), find_files),
            Recipe("entries", ("busybox", "entries"), ("sh", "-c", "find / -xdev | wc -l")),
            Recipe("bigfile", ("busybox", "bigfile"), ("wc", "-c", "/data/big.bin"), level=1),
        ]
    return {r.name: r for r in rs}


@dataclass(frozen=True)
class BuiltImage:
    """One recipe, pushed as gzip and as eStargz; `layer_dirs` are its trees on native disk."""

    recipe: Recipe
    repo: str
    gzip_tag: str
    esgz_tag: str
    gzip_layers: tuple[LayerFile, ...]
    esgz_manifest: dict = field(repr=False)
    layer_dirs: tuple[Path, ...]

    @property
    def name(self) -> str:
        return self.recipe.name

    def ref(self, host: str, esgz: bool) -> str:
        return f"{host}/{self.repo}:{self.esgz_tag if esgz else self.gzip_tag}"

    def size(self, esgz: bool) -> int:
        """Compressed bytes of all layers: what a full pull downloads."""
        if esgz:
            return sum(int(d["size"]) for d in self.esgz_manifest["layers"])
        return sum(layer.size for layer in self.gzip_layers)

    def esgz_layer_sizes(self) -> list[int]:
        return [int(d["size"]) for d in self.esgz_manifest["layers"]]


def _tree_manyfiles(dest: Path, files: int) -> None:
    """`files` small text-like files, 3 levels deep, sizes 64 B .. 4 KiB."""
    rng = random.Random(30_000)
    words = [rng.randbytes(rng.randint(2, 8)).hex().encode() for _ in range(512)]
    per_dir = 100
    for i in range(files):
        d = dest / "files" / f"d{i // (per_dir * 10):03d}" / f"s{(i // per_dir) % 10}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(64, 4 * KiB)
        body = b" ".join(rng.choice(words) for _ in range(size // 8))[:size]
        (d / f"f{i:06d}.txt").write_bytes(body)


def _tree_entries(dest: Path, entries: int) -> None:
    """`entries` tiny files in directories of 1000: the TOC-size (memory) layer."""
    for i in range(entries):
        d = dest / "entries" / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"e{i:07d}").write_bytes(b"%d\n" % i)


def _tree_bigfile(dest: Path, size: int) -> None:
    """One incompressible file: read throughput is then the chunk path, not the inflater."""
    (dest / "data").mkdir(parents=True)
    rng = random.Random(1 << 30)
    with open(dest / "data" / "big.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rng.randbytes(n))
            left -= n


def _tree_busybox(dest: Path) -> None:
    for d in ("bin", "dev", "etc", "proc", "sys", "root", "tmp"):
        (dest / d).mkdir(parents=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", dest / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")


def _tree_random_files(dest: Path, sub: str, count: int, size: int, seed: int) -> None:
    (dest / sub).mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(count):
        (dest / sub / f"f{i}").write_bytes(rng.randbytes(size))


class Catalog:
    """Builds (or finds in the cache) every image of one mode, and serves the registry.

        with Catalog(cache_dir, smoke=True, converter=CtrRemoteConverter()) as cat:
            img = cat.image("pyslim")          # built on first use, cached after
            ref = img.ref(proxy.host, esgz=True)
    """

    def __init__(self, cache: Path, smoke: bool, converter: Converter,
                 log: Callable[[str], None] = print) -> None:
        self.cache = cache / ("smoke" if smoke else "full")
        self.smoke = smoke
        self.converter = converter
        self.log = log
        self.recipes = recipes(smoke)
        self.registry = Registry(self.cache / "registry")
        self._built: dict[str, BuiltImage] = {}

    def __enter__(self) -> Catalog:
        self.cache.mkdir(parents=True, exist_ok=True)
        self.registry.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.registry.stop()

    # -- layers -------------------------------------------------------------------------

    def layer_dir(self, name: str) -> Path:
        """The tree of layer `name` on native disk, built once and kept in the cache."""
        trees = self.cache / "trees"
        dest = trees / name
        marker = trees / f"{name}.complete"
        if name == "debian-python":
            return debootstrap_rootfs(dest, self.cache.parent / "debs")
        if name == "scipy-stack":
            base = self.layer_dir("debian-python")
            return apt_layer(base, dest, SCIPY_STACK, self.cache.parent / "debs")
        if marker.exists():
            return dest
        builders: dict[str, Callable[[Path], None]] = {
            "busybox": _tree_busybox,
            "manyfiles": lambda d: _tree_manyfiles(d, 2_000 if self.smoke else 30_000),
            "entries": lambda d: _tree_entries(d, 5_000 if self.smoke else 100_000),
            "bigfile": lambda d: _tree_bigfile(d, 32 * MiB if self.smoke else GiB),
            "smoke-data": lambda d: _tree_random_files(d, "data", 4, 512 * KiB, seed=1),
            "smoke-extra": lambda d: _tree_random_files(d, "extra", 4, 1 * MiB, seed=2),
        }
        if name not in builders:
            raise ValueError(f"layer {name!r}: no such layer recipe")
        shutil.rmtree(dest, ignore_errors=True)
        self.log(f"building layer tree {name} in {dest}")
        builders[name](dest)
        marker.write_text("")
        return dest

    def layer_file(self, name: str, level: int) -> LayerFile:
        path = self.cache / "layers" / f"{name}-gz{level}.tar.gz"
        found = LayerFile.load(path)
        if found is not None:
            return found
        src = self.layer_dir(name)
        self.log(f"packing layer {name} (gzip -{level})")
        return dir_to_layer(src, path, level)

    # -- images -------------------------------------------------------------------------

    def _manifest(self, repo: str, tag: str) -> dict | None:
        resp = httpx.get(f"{self.registry.url}/v2/{repo}/manifests/{tag}",
                         headers={"Accept": MEDIA_MANIFEST}, timeout=30)
        return resp.json() if resp.status_code == 200 else None

    def image(self, name: str) -> BuiltImage:
        if name in self._built:
            return self._built[name]
        recipe = self.recipes[name]
        repo = f"bench/{name}"
        gzip_tag = f"{RECIPE_VERSION}-gz"
        esgz_tag = f"{RECIPE_VERSION}-esgz-{self.converter.name}"
        layers = tuple(self.layer_file(n, recipe.level) for n in recipe.layers)
        if self._manifest(repo, gzip_tag) is None:
            self.log(f"pushing {repo}:{gzip_tag}")
            push_layers(self.registry.url, repo, gzip_tag, layers, recipe.cmd)
        esgz = self._manifest(repo, esgz_tag)
        if esgz is None:
            missing = self.converter.missing()
            if missing:
                raise RuntimeError(f"cannot convert {repo} to eStargz: {missing}")
            self.log(f"converting {repo} to eStargz with {self.converter.name}")
            started = time.monotonic()
            work = self.cache / "convert-work"
            shutil.rmtree(work, ignore_errors=True)
            self.converter.convert(self.registry, repo, gzip_tag, esgz_tag, work)
            shutil.rmtree(work, ignore_errors=True)
            self.log(f"converted {repo} in {time.monotonic() - started:.0f}s")
            esgz = self._manifest(repo, esgz_tag)
            if esgz is None:
                raise RuntimeError(f"converter {self.converter.name} pushed no {repo}:{esgz_tag}")
        built = BuiltImage(recipe, repo, gzip_tag, esgz_tag, layers, esgz,
                           tuple(self.layer_dir(n) for n in recipe.layers))
        self._built[name] = built
        return built
