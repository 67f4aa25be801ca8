"""The servicer over a real unix socket, as containerd's proxy client talks to it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from snapshotter import errors
from snapshotter.core.metastore import check_consistency
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.service._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from snapshotter.service.server import AddressInUse, SnapshotServer
from snapshotter.service.snapshots import STATUS_CODES


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[pb_grpc.SnapshotsStub, Path]]:
    root = tmp_path / "root"
    sock = tmp_path / "s.sock"
    sn = Snapshotter(root)
    server = SnapshotServer(sn, sock, mode=0o600)
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield pb_grpc.SnapshotsStub(channel), root
    finally:
        channel.close()
        server.stop(0)
        sn.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_every_category_has_a_status_code() -> None:
    assert set(STATUS_CODES) == set(errors.CATEGORIES)


def test_lifecycle_over_grpc(served) -> None:
    stub, root = served
    resp = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="lazysnap", key="a"))
    assert [m.type for m in resp.mounts] == ["bind"]
    assert list(resp.mounts[0].options) == ["rw", "rbind"]
    Path(resp.mounts[0].source, "hello").write_text("hi")
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a", labels={"l": "1"}))
    resp = stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"))
    assert resp.mounts[0].type == "overlay"
    info = stub.Stat(pb.StatSnapshotRequest(key="A")).info
    assert (info.name, info.kind, dict(info.labels)) == ("A", pb.COMMITTED, {"l": "1"})
    assert info.created_at.seconds > 0
    upd = stub.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="A", labels={"l": "", "m": "2"}),
            update_mask=FieldMask(paths=["labels.l", "labels.m"]),
        )
    ).info
    assert dict(upd.labels) == {"m": "2"}
    usage = stub.Usage(pb.UsageRequest(key="A"))
    assert usage.inodes == 2 and usage.size > 0
    names = [i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert names == ["A", "b"]
    only = [i.name for r in stub.List(pb.ListSnapshotsRequest(filters=["kind==active"]))
            for i in r.info]
    assert only == ["b"]
    assert stub.Mounts(pb.MountsRequest(key="b")).mounts[0].type == "overlay"
    stub.Remove(pb.RemoveSnapshotRequest(key="b"))
    stub.Remove(pb.RemoveSnapshotRequest(key="A"))
    stub.Cleanup(pb.CleanupRequest())
    assert check_consistency(root) == []


@pytest.mark.allow_log_errors
def test_error_codes(served) -> None:
    stub, root = served
    stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    C = grpc.StatusCode
    assert _code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="a"))) == C.ALREADY_EXISTS
    assert _code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="x", parent="nope"))) \
        == C.NOT_FOUND
    assert _code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="x", parent="a"))) \
        == C.INVALID_ARGUMENT
    assert _code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key=""))) == C.INVALID_ARGUMENT
    assert _code(lambda: stub.Stat(pb.StatSnapshotRequest(key="nope"))) == C.NOT_FOUND
    assert _code(lambda: stub.Mounts(pb.MountsRequest(key="nope"))) == C.NOT_FOUND
    assert _code(lambda: stub.Remove(pb.RemoveSnapshotRequest(key="nope"))) == C.NOT_FOUND
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    assert _code(lambda: stub.Commit(pb.CommitSnapshotRequest(name="B", key="A"))) \
        == C.FAILED_PRECONDITION
    stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"))
    assert _code(lambda: stub.Remove(pb.RemoveSnapshotRequest(key="A"))) == C.FAILED_PRECONDITION
    assert _code(lambda: stub.Commit(pb.CommitSnapshotRequest(name="A", key="b"))) \
        == C.ALREADY_EXISTS
    big = {"k": "v" * 4096}
    assert _code(lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="c", labels=big))) \
        == C.INVALID_ARGUMENT
    assert _code(lambda: list(stub.List(pb.ListSnapshotsRequest(filters=["name=="])))) \
        == C.INVALID_ARGUMENT
    assert _code(lambda: stub.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="A", parent="x"), update_mask=FieldMask(paths=["parent"])))) \
        == C.INVALID_ARGUMENT
    # No failed call left anything behind.
    assert check_consistency(root) == []
    names = sorted(i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info)
    assert names == ["A", "b"]


def test_socket_mode_and_no_stealing(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "deep" / "s.sock"
    sn = Snapshotter(tmp_path / "root")
    first = SnapshotServer(sn, sock, mode=0o660)
    first.start()
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        second = SnapshotServer(sn, sock)
        with pytest.raises(AddressInUse):
            second.start()
        second.stop(0)
        assert sock.exists(), "a refused second server must not remove the live socket"
    finally:
        first.stop(0)
        sn.close()
    assert not sock.exists()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    import socket as s

    sock = tmp_path / "s.sock"
    dead = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # a socket file nobody listens on, as a crash leaves it
    sn = Snapshotter(tmp_path / "root")
    server = SnapshotServer(sn, sock)
    server.start()
    server.stop(0)
    sn.close()
