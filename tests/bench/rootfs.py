"""Debian root filesystems for the benchmark images: debootstrap, then apt on an overlay.

`debootstrap_rootfs` makes the base (minimal Debian + python3); `apt_layer` installs more
packages on an overlayfs whose lower dir is that base, so the upper dir is exactly the layer
diff (whiteouts included) that `oci.dir_to_layer` turns into a tar. Results are built in a
temp dir and renamed into place, so an interrupted build is rebuilt rather than reused.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["MIRROR", "SUITE", "apt_layer", "debootstrap_rootfs"]

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Caches and indexes that apt leaves behind and no image should ship.
_JUNK = ("var/cache/apt", "var/lib/apt/lists", "var/cache/debconf/templates.dat-old",
         "var/log/apt", "var/log/dpkg.log", "var/log/alternatives.log")


def _run(argv: Sequence[str], what: str, timeout: float) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"{what}: {' '.join(argv)} exited {done.returncode}\n{tail}")


def _clean(root: Path) -> None:
    for rel in _JUNK:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            # Keep the directories (apt expects them), drop their contents.
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif p.exists():
            p.unlink()


def _done(dest: Path) -> Path:
    """Completion marker beside (not inside) a tree, so it never ends up in a layer."""
    return dest.with_name(dest.name + ".complete")


def debootstrap_rootfs(dest: Path, debs: Path, include: Sequence[str] = ("python3",)) -> Path:
    """Minimal Debian (`--variant=minbase`) plus `include`, at `dest`; reused if complete."""
    if _done(dest).exists():
        return dest
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    debs.mkdir(parents=True, exist_ok=True)
    argv = ["debootstrap", "--variant=minbase", f"--cache-dir={debs}"]
    if include:
        argv.append("--include=" + ",".join(include))
    _run([*argv, SUITE, str(tmp), MIRROR], "debootstrap", timeout=1800)
    _clean(tmp)
    tmp.rename(dest)
    _done(dest).write_text("")
    return dest


@contextlib.contextmanager
def _overlay_chroot(lower: Path, upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], "overlay", 60)
    binds: list[Path] = []
    try:
        for src in ("/proc", "/dev"):
            target = merged / src.lstrip("/")
            _run(["mount", "--rbind", src, str(target)], "bind", 60)
            binds.append(target)
        yield merged
    finally:
        for target in reversed(binds):
            subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True, timeout=60)
        subprocess.run(["umount", str(merged)], capture_output=True, timeout=60)


def apt_layer(base: Path, dest: Path, packages: Sequence[str], debs: Path) -> Path:
    """The upper dir of `apt-get install packages` on top of `base`, at `dest`.

    `debs` is bind-mounted as apt's archive cache so a rebuild does not download again.
    """
    if _done(dest).exists():
        return dest
    scratch = dest.with_name(dest.name + ".build")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    archives = debs / "apt-archives"
    archives.mkdir(parents=True, exist_ok=True)
    with _overlay_chroot(base, upper, work, merged) as root:
        resolv = root / "etc/resolv.conf"
        had_resolv = resolv.exists() or resolv.is_symlink()
        if not had_resolv and Path("/etc/resolv.conf").exists():
            shutil.copy("/etc/resolv.conf", resolv)
        cache = root / "var/cache/apt/archives"
        cache.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(archives), str(cache)], "bind apt cache", 60)
        try:
            env = ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C"]
            _run(["chroot", str(root), *env, "apt-get", "update"], "apt-get update", 900)
            _run(["chroot", str(root), *env, "apt-get", "install", "-y",
                  "--no-install-recommends", *packages], "apt-get install", 3600)
        finally:
            subprocess.run(["umount", str(cache)], capture_output=True, timeout=60)
        _clean(root)
        if not had_resolv:
            resolv.unlink(missing_ok=True)
    upper.rename(dest)
    shutil.rmtree(scratch, ignore_errors=True)
    _done(dest).write_text("")
    return dest
