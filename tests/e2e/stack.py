"""containerd wired to one snapshotter (lazysnap, or containerd's own overlayfs as a reference).

Tests talk to a `Stack` in containerd's own terms (pull, run, snapshots ls/info/tree) and
find snapshot directories in `snapshot_root`, laid out `snapshots/<id>/fs` by both
snapshotters, so the same assertions hold for lazysnap and for the reference.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import (
    Containerd,
    ContainerdError,
    Lazysnap,
    remove_tree,
    unmount_under,
    wait_for,
)

__all__ = ["REFERENCE", "Snapshot", "Stack", "start_stack"]

REFERENCE = "overlayfs"


@dataclass(frozen=True)
class Snapshot:
    """A row of `ctr snapshots ls`."""

    key: str
    parent: str
    kind: str


@dataclass
class Stack:
    snapshotter: str
    containerd: Containerd
    lazysnap: Lazysnap | None
    snapshot_root: Path

    def ctr(self, *args: str, **kw) -> str:  # type: ignore[no-untyped-def]
        return self.containerd.ctr(*args, **kw).stdout

    def snap(self, *args: str, **kw) -> str:  # type: ignore[no-untyped-def]
        """`ctr snapshots --snapshotter <ours> ...`"""
        return self.ctr("snapshots", "--snapshotter", self.snapshotter, *args, **kw)

    def pull(self, ref: str, *extra: str, tool: str = "ctr", verb: str = "pull") -> str:
        """`ctr images pull` (or `ctr-remote images rpull`) into our snapshotter."""
        return self.containerd.ctr(
            "images",
            verb,
            "--plain-http",
            "--snapshotter",
            self.snapshotter,
            *extra,
            ref,
            tool=tool,
        ).stdout

    def push(
        self, ref: str, tool: str = "ctr-remote", attempts: int = 3, timeout: float = 600.0
    ) -> None:
        """`images push --plain-http`, again on containerd's "unexpected EOF": seen once in
        CI right after a `ctr-remote` conversion (the content read back cut short), where
        the same push a moment later succeeds; anything else fails at once."""
        for attempt in range(1, attempts + 1):
            try:
                self.containerd.ctr("images", "push", "--plain-http", ref, tool=tool,
                                    timeout=timeout)
                return
            except ContainerdError as exc:
                if "unexpected EOF" not in str(exc) or attempt == attempts:
                    raise
                print(f"push {ref}: unexpected EOF (attempt {attempt}); pushing again")
                time.sleep(1)

    def run(self, ref: str, cid: str, *cmd: str, rm: bool = True, detach: bool = False) -> str:
        args = ["run", "--snapshotter", self.snapshotter]
        args += ["--rm"] if rm else []
        args += ["-d"] if detach else []
        return self.ctr(*args, ref, cid, *cmd)

    def snapshots(self) -> list[Snapshot]:
        rows = self.snap("ls").splitlines()[1:]
        return [Snapshot(*_columns(r, 3)) for r in rows if r.strip()]

    def info(self, key: str) -> dict[str, object]:
        return json.loads(self.snap("info", key))

    def mounts(self, key: str) -> dict[str, str]:
        """The mount containerd would make for `key`, options split into a dict."""
        line = self.snap("mounts", "/mnt", key).strip()
        # `mount -t overlay overlay /mnt -o lowerdir=...,upperdir=...` or `mount -t bind ...`
        m = re.match(r"mount -t (\S+) (\S+) /mnt -o (\S+)$", line)
        if m is None:
            raise AssertionError(f"unexpected mount line for {key!r}: {line!r}")
        opts: dict[str, str] = {"type": m.group(1), "source": m.group(2)}
        for opt in m.group(3).split(","):
            name, _, value = opt.partition("=")
            opts[name] = value
        return opts

    def snapshot_dirs(self) -> set[str]:
        d = self.snapshot_root / "snapshots"
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def task_rootfs(self, cid: str) -> Path:
        state = self.containerd.workdir / "state" / "io.containerd.runtime.v2.task"
        return state / self.containerd.namespace / cid / "rootfs"

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until containerd reaches the snapshotter again (its gRPC reconnect backs off)."""

        def answers() -> bool:
            try:
                self.snap("ls", timeout=10)
            except ContainerdError:
                return False
            return True

        wait_for(answers, timeout, f"containerd to reach snapshotter {self.snapshotter}", 0.2)

    def remove_image_and_gc(self, ref: str) -> None:
        # --sync waits for containerd's garbage collector, which removes unreferenced snapshots.
        self.ctr("images", "rm", "--sync", ref)


def _columns(row: str, n: int) -> list[str]:
    parts = row.split()
    if len(parts) == n - 1:  # a snapshot without a parent has an empty PARENT column
        parts.insert(1, "")
    return parts[:n]


@contextlib.contextmanager
def start_stack(
    workdir: Path,
    snapshotter: str = "lazysnap",
    show_logs: bool = True,
    lazysnap_args: Sequence[str] = (),
) -> Iterator[Stack]:
    """Start lazysnap (unless using the reference) and containerd; always tear both down.

    On exit, raises if any mount or process of ours survived the teardown.
    """
    sockdir = Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))
    lazysnap = None
    containerd = None
    try:
        plugins = {}
        if snapshotter != REFERENCE:
            lazysnap = Lazysnap(
                workdir / "lazysnap", str(sockdir / "lazysnap.sock"), extra_args=lazysnap_args
            ).start()
            plugins[snapshotter] = lazysnap.address
        containerd = Containerd(workdir / "containerd", sockdir, plugins).start()
        root = (
            lazysnap.root
            if lazysnap is not None
            else containerd.workdir / "root" / "io.containerd.snapshotter.v1.overlayfs"
        )
        stack = Stack(snapshotter, containerd, lazysnap, root)
        if lazysnap is not None:
            stack.wait_ready()
        yield stack
    finally:
        started = time.monotonic()
        if containerd is not None:
            containerd.stop()
        if lazysnap is not None:
            lazysnap.stop()
        # Whatever is still mounted after a graceful stop is a bug; unmount it anyway.
        leftovers = unmount_under(workdir)
        remove_tree(sockdir)
        for svc in (lazysnap, containerd):
            if svc is not None and show_logs:
                print(f"----- {svc.name} log (tail) -----\n{svc.log_tail()}")
        if show_logs:
            print(f"teardown took {time.monotonic() - started:.1f}s")
        if leftovers:
            raise AssertionError(f"mounts left behind after teardown: {leftovers}")
