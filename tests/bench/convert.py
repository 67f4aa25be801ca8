"""eStargz converters, pluggable: `ctr-remote` today, `lazysnap convert` when it lands.

A converter reads `<registry>/<repo>:<src_tag>` (a plain gzip image already pushed) and
pushes `<repo>:<dst_tag>` as eStargz with TOC digest annotations. The catalog names the
eStargz tag after the converter, so images from two converters can be compared side by side.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from tests.e2e.harness import REPO_ROOT, Registry
from tests.e2e.stack import REFERENCE, start_stack

__all__ = ["CONVERTERS", "CommandConverter", "Converter", "CtrRemoteConverter", "make_converter"]

_TIMEOUT = 3600.0


class Converter(Protocol):
    """Turns a pushed gzip image into a pushed eStargz image in the same registry."""

    name: str

    def missing(self) -> str | None:
        """Why this converter cannot run here, or None."""

    def convert(self, registry: Registry, repo: str, src_tag: str, dst_tag: str,
                workdir: Path) -> None: ...


class CtrRemoteConverter:
    """stargz-snapshotter's `ctr-remote image convert --estargz --oci` in a scratch containerd."""

    name = "ctr-remote"

    def __init__(self, level: int = 9) -> None:
        # Level 9 is ctr-remote's default and what published eStargz images use.
        self.level = level

    def missing(self) -> str | None:
        return None if shutil.which("ctr-remote") else "ctr-remote (stargz-snapshotter) not found"

    def convert(self, registry: Registry, repo: str, src_tag: str, dst_tag: str,
                workdir: Path) -> None:
        src = f"{registry.host}/{repo}:{src_tag}"
        dst = f"{registry.host}/{repo}:{dst_tag}"
        with start_stack(workdir, REFERENCE, show_logs=False) as stack:
            stack.ctr("content", "fetch", "--plain-http", src, timeout=_TIMEOUT)
            stack.containerd.ctr(
                "images", "convert", "--estargz", "--oci",
                "--estargz-compression-level", str(self.level), src, dst,
                tool="ctr-remote", timeout=_TIMEOUT,
            )
            stack.push(dst, timeout=_TIMEOUT)


class CommandConverter:
    """Any command line with `{src}` and `{dst}` placeholders (full references, plain HTTP).

    `--converter lazysnap` runs `python -m snapshotter convert --plain-http {src} {dst}`
    (issue 4) from the repository root.
    """

    def __init__(self, name: str, template: str) -> None:
        self.name = name
        self.template = template

    def missing(self) -> str | None:
        argv = shlex.split(self.template)
        return None if argv and shutil.which(argv[0]) else f"{argv[0] if argv else '?'} not found"

    def convert(self, registry: Registry, repo: str, src_tag: str, dst_tag: str,
                workdir: Path) -> None:
        argv = [a.format(src=f"{registry.host}/{repo}:{src_tag}",
                         dst=f"{registry.host}/{repo}:{dst_tag}", registry=registry.host)
                for a in shlex.split(self.template)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                              stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"converter {self.name}: {' '.join(argv)} exited "
                               f"{done.returncode}\n{done.stdout}{done.stderr}")


CONVERTERS = ("ctr-remote", "lazysnap")


def make_converter(name: str, command: str | None = None, level: int = 9) -> Converter:
    if command:
        return CommandConverter(name, command)
    if name == "ctr-remote":
        return CtrRemoteConverter(level)
    if name == "lazysnap":
        python = shlex.quote(sys.executable)
        return CommandConverter(
            name, f"{python} -m snapshotter convert --plain-http {{src}} {{dst}}")
    raise ValueError(f"converter {name!r}: expected one of {CONVERTERS} or a --convert-cmd")
