"""Core Snapshotter properties beyond containerd's suite: what a restart keeps, and the
on-disk layout that crash recovery and short mount options rely on."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from snapshotter import labels as L
from snapshotter.core.metastore import check_consistency
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.core.types import Kind, Mount
from snapshotter.errors import AlreadyExists, NotFound, Unavailable


def _id(mounts: list[Mount]) -> int:
    """The snapshot id behind a no-parent mount (<root>/snapshots/<id>/fs)."""
    return int(Path(mounts[0].source).parent.name)


def _populate(sn: Snapshotter) -> None:
    src = Path(sn.prepare("c1-a")[0].source)
    (src / "hello").write_text("hello\n")
    sn.commit("c1", "c1-a", labels={"l": "1"})
    sn.prepare("c2-a", "c1")
    sn.commit("c2", "c2-a")
    sn.prepare("a", "c2", labels={"k": "v"})
    sn.view("v", "c2")
    sn.view("v0", "")


def test_reopen_keeps_rows_labels_times_and_mounts(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path)
    _populate(sn)
    infos = sn.walk()
    mounts = {i.name: sn.mounts(i.name) for i in infos if i.name in ("a", "v", "v0")}
    usage = sn.usage("c1")
    sn.close()

    sn = Snapshotter(tmp_path)
    try:
        assert sn.walk() == infos
        assert {k: sn.mounts(k) for k in mounts} == mounts
        assert sn.usage("c1") == usage
        sn.prepare("after", "c2")
        sn.commit("c3", "after")
        assert sn.stat("c3").parent == "c2"
    finally:
        sn.close()
    assert check_consistency(tmp_path) == []


def test_ids_are_never_reused(tmp_path: Path) -> None:
    """A crash between a removal's commit and its rmtree leaves rm-<id>; if <id> could be
    handed out again, recovery could not tell the two directories apart."""
    sn = Snapshotter(tmp_path)
    first = _id(sn.prepare("x"))
    sn.remove("x")
    second = _id(sn.prepare("x"))
    assert second > first
    sn.remove("x")
    sn.close()
    sn = Snapshotter(tmp_path)
    try:
        assert _id(sn.prepare("x")) > second
    finally:
        sn.close()


def test_layout_is_private_and_short(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sn = Snapshotter(root)
    try:
        m = sn.prepare("k" * 200)  # a long key must not leak into paths
        assert Path(m[0].source) == root / "snapshots" / str(_id(m)) / "fs"
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert sorted(p.name for p in (root / "snapshots").iterdir()) == [str(_id(m))]
    finally:
        sn.close()


# -- remote layers through a fake ---------------------------------------------------------

REF = "containerd.io/snapshot.ref"


class FakeRemoteLayers:
    """RemoteLayers over plain directories: a layer is `base/<n>/`, registered under the
    chain id containerd would put in `containerd.io/snapshot.ref`. Layers can be marked
    broken (check() raises Unavailable); `refuse` makes prepare() answer None and
    `explode` makes it raise. Every call is recorded."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.layers: dict[str, Path] = {}
        self.broken: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.refuse = False
        self.explode = False

    def add(self, ref: str, files: dict[str, bytes]) -> Path:
        d = self.base / str(len(self.layers))
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        self.layers[ref] = d
        return d

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> str | None:
        self.calls.append(("prepare", key))
        if self.explode:
            raise Unavailable("fake registry is down")
        d = self.layers.get(labels[REF])
        return None if self.refuse or d is None else json.dumps({"dir": str(d)})

    def lowerdir(self, handle: str) -> str:
        return json.loads(handle)["dir"]

    def check(self, handle: str) -> None:
        if self.lowerdir(handle) in self.broken:
            raise Unavailable(f"fake layer {handle}: broken")

    def release(self, handle: str) -> None:
        self.calls.append(("release", handle))

    def restore(self, handle: str) -> None:
        self.calls.append(("restore", handle))


@pytest.fixture
def remote(tmp_path: Path) -> FakeRemoteLayers:
    fake = FakeRemoteLayers(tmp_path / "repo")
    fake.add("sha256:l1", {"one": b"1"})
    fake.add("sha256:l2", {"two": b"2"})
    return fake


@pytest.fixture
def rsn(tmp_path: Path, remote: FakeRemoteLayers) -> Iterator[Snapshotter]:
    sn = Snapshotter(tmp_path / "root", remote=remote)
    yield sn
    sn.close()
    assert check_consistency(tmp_path / "root") == []


def _remote_chain(sn: Snapshotter) -> None:
    """What containerd's unpacker does for two lazily pulled layers."""
    with pytest.raises(AlreadyExists):
        sn.prepare("extract-1", "", labels={REF: "sha256:l1"})
    with pytest.raises(AlreadyExists):
        sn.prepare("extract-2", "sha256:l1", labels={REF: "sha256:l2"})


def test_remote_prepare_commits_the_target(rsn: Snapshotter, remote: FakeRemoteLayers) -> None:
    _remote_chain(rsn)
    top = rsn.stat("sha256:l2")
    assert (top.kind, top.parent) == (Kind.COMMITTED, "sha256:l1")
    assert top.labels[L.REMOTE] == L.REMOTE_VALUE
    for key in ("extract-1", "extract-2"):
        with pytest.raises(NotFound):
            rsn.stat(key)
    # An existing target answers AlreadyExists before the remote is asked again.
    with pytest.raises(AlreadyExists):
        rsn.prepare("extract-again", "", labels={REF: "sha256:l1"})
    assert [c for c in remote.calls if c[0] == "prepare"] == [
        ("prepare", "extract-1"),
        ("prepare", "extract-2"),
    ]


def test_remote_layers_are_lowerdirs(rsn: Snapshotter, remote: FakeRemoteLayers) -> None:
    _remote_chain(rsn)
    m = rsn.prepare("container", "sha256:l2")
    lower = [o for o in m[0].options if o.startswith("lowerdir=")]
    assert lower == [f"lowerdir={remote.layers['sha256:l2']}:{remote.layers['sha256:l1']}"]
    v = rsn.view("v", "sha256:l1")
    assert [(x.type, x.source) for x in v] == [("bind", str(remote.layers["sha256:l1"]))]


@pytest.mark.root
def test_container_on_remote_layers_sees_them(
    tmp_path: Path, rsn: Snapshotter, remote: FakeRemoteLayers
) -> None:
    _remote_chain(rsn)
    target = tmp_path / "rootfs"
    target.mkdir()
    m = rsn.prepare("container", "sha256:l2")[0]
    subprocess.run(
        ["mount", "-t", m.type, m.source, "-o", ",".join(m.options), str(target)],
        check=True,
        timeout=30,
    )
    try:
        assert sorted(os.listdir(target)) == ["one", "two"]
        (target / "one").write_bytes(b"changed")
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=30)
    assert (remote.layers["sha256:l1"] / "one").read_bytes() == b"1"


def test_broken_remote_layer_is_unavailable_without_partial_state(
    rsn: Snapshotter, remote: FakeRemoteLayers
) -> None:
    _remote_chain(rsn)
    rsn.prepare("container", "sha256:l2")
    remote.broken.add(str(remote.layers["sha256:l1"]))
    with pytest.raises(Unavailable):
        rsn.mounts("container")
    before = rsn.walk()
    for create in (rsn.prepare, rsn.view):
        with pytest.raises(Unavailable):
            create(f"another-{create.__name__}", "sha256:l2")
        assert rsn.walk() == before, f"a refused {create.__name__} left its row behind"


def test_remote_refusal_falls_back_to_a_plain_snapshot(
    rsn: Snapshotter, remote: FakeRemoteLayers
) -> None:
    remote.refuse = True
    m = rsn.prepare("extract-1", "", labels={REF: "sha256:l1"})
    assert m[0].type == "bind" and rsn.stat("extract-1").kind == Kind.ACTIVE


@pytest.mark.allow_log_errors
def test_remote_failure_falls_back_to_a_plain_snapshot(
    rsn: Snapshotter, remote: FakeRemoteLayers
) -> None:
    remote.explode = True
    m = rsn.prepare("extract-1", "", labels={REF: "sha256:l1"})
    assert m[0].type == "bind" and rsn.stat("extract-1").kind == Kind.ACTIVE


def test_remove_releases_and_restart_restores(
    tmp_path: Path, rsn: Snapshotter, remote: FakeRemoteLayers
) -> None:
    _remote_chain(rsn)
    handles = {
        ref: json.dumps({"dir": str(remote.layers[ref])}) for ref in ("sha256:l1", "sha256:l2")
    }
    rsn.close()
    remote.calls.clear()
    sn = Snapshotter(tmp_path / "root", remote=remote)
    try:
        assert sorted(remote.calls) == sorted(("restore", h) for h in handles.values())
        remote.calls.clear()
        sn.remove("sha256:l2")
        assert remote.calls == [("release", handles["sha256:l2"])]
        with pytest.raises(NotFound):
            sn.stat("sha256:l2")
    finally:
        sn.close()
