"""What every benchmark part gets: the images, the results, scratch space and the settings;
plus the daemon-side views the parts share (status.json, layer mount paths, VmHWM)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.catalog import BuiltImage, Catalog
from tests.bench.link import Condition
from tests.bench.modes import Mode
from tests.bench.results import Results
from tests.e2e.harness import wait_for
from tests.e2e.stack import Stack

__all__ = ["Context", "children_vm_kib", "daemon_status", "layer_path", "vm_kib"]


@dataclass
class Context:
    catalog: Catalog
    results: Results
    scratch: Path
    reps: int
    conditions: Sequence[Condition]
    modes: Sequence[Mode]  # cold-start modes; the baseline (overlayfs) first
    smoke: bool
    log: Callable[[str], None] = print
    _count: int = 0

    def workdir(self, name: str) -> Path:
        """A fresh, empty directory for one stack: nothing is reused between runs.

        Numbered rather than named: the daemon puts unix sockets under its root, and
        sun_path holds 108 bytes. `name` goes into a file inside, for whoever looks.
        """
        self._count += 1
        d = self.scratch / f"{self._count:04d}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "what").write_text(name + "\n")
        return d

    def image(self, name: str) -> BuiltImage:
        return self.catalog.image(name)


def daemon_status(stack: Stack, newer_than: float, timeout: float = 15.0) -> dict[str, Any]:
    """lazysnap's status.json, rewritten after `newer_than` (time.time()); it lags by ~2 s."""
    assert stack.lazysnap is not None, "status.json is lazysnap's"
    path = stack.lazysnap.root / "status.json"
    found: dict[str, Any] = {}

    def fresh() -> bool:
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        if doc.get("time", 0) <= newer_than:
            return False
        found.update(doc)
        return True

    wait_for(fresh, timeout, f"a fresh {path}", interval=0.2)
    return found


def layer_path(stack: Stack, image: BuiltImage, index: int = -1) -> Path:
    """Where lazysnap serves layer `index` of `image` (eStargz), from status.json."""
    digest = image.esgz_manifest["layers"][index]["digest"]
    doc = daemon_status(stack, time.time())
    for row in doc.get("layers", []):
        if row["layer_digest"] == digest:
            return Path(row["path"])
    reasons = [f"{f['reason']}: {f['detail']}" for f in doc.get("fallbacks", [])
               if f["layer_digest"] == digest]
    raise RuntimeError(f"layer {digest} of {image.name} is not served lazily "
                       f"({'; '.join(reasons) or 'no status row'})")


def children_vm_kib(pid: int, field: str) -> int:
    """`vm_kib` summed over the children of `pid` (the daemon's TOC parser), 0 if none."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError, KeyError):
                total += vm_kib(int(child), field)
    return total


def vm_kib(pid: int, field: str) -> int:
    """A `Vm*` line of /proc/<pid>/status in KiB (VmHWM: peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {field}")
