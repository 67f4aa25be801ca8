"""The core method set spoken over containerd's Snapshots API on a unix socket.

A second conformance factory: `lazysnap`'s servicer behind a real socket, with status
codes turned back into error categories the way containerd's proxy client does
(errdefs.FromGRPC), so every check also proves the wire mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from snapshotter import errors
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.core.types import Info, Mount, Usage
from snapshotter.service import convert
from snapshotter.service._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from snapshotter.service.server import SnapshotServer

# containerd errdefs.FromGRPC, restricted to the categories we have.
CATEGORIES: dict[grpc.StatusCode, type[errors.LazysnapError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.UNIMPLEMENTED: errors.NotImplementedYet,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
}

_TIMEOUT = 60.0
_NAME = "lazysnap"


def _mounts(msgs: Any) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, options=tuple(m.options)) for m in msgs]


class GrpcSnapshotter:
    """Owns a Snapshotter, a server on `socket` and a client channel; close() ends all."""

    def __init__(self, root: Path, socket: Path) -> None:
        self._core = Snapshotter(root)
        self._server = SnapshotServer(self._core, socket, mode=0o600)
        self._server.start()
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self._stub = pb_grpc.SnapshotsStub(self._channel)
        self._closed = False

    def _call(self, method: str, request: Any) -> Any:
        if self._closed:
            raise errors.ClosedError("grpc client is closed")
        try:
            return getattr(self._stub, method)(request, timeout=_TIMEOUT)
        except grpc.RpcError as exc:
            category = CATEGORIES.get(exc.code())
            if category is None:
                raise
            raise category(f"{method}: {exc.details()}") from None

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = pb.PrepareSnapshotRequest(
            snapshotter=_NAME, key=key, parent=parent, labels=dict(labels or {})
        )
        return _mounts(self._call("Prepare", req).mounts)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = pb.ViewSnapshotRequest(
            snapshotter=_NAME, key=key, parent=parent, labels=dict(labels or {})
        )
        return _mounts(self._call("View", req).mounts)

    def mounts(self, key: str) -> list[Mount]:
        return _mounts(self._call("Mounts", pb.MountsRequest(snapshotter=_NAME, key=key)).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(
            snapshotter=_NAME, name=name, key=key, labels=dict(labels or {})
        )
        self._call("Commit", req)

    def remove(self, key: str) -> None:
        self._call("Remove", pb.RemoveSnapshotRequest(snapshotter=_NAME, key=key))

    def stat(self, key: str) -> Info:
        resp = self._call("Stat", pb.StatSnapshotRequest(snapshotter=_NAME, key=key))
        return convert.info_from_proto(resp.info)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        req = pb.UpdateSnapshotRequest(snapshotter=_NAME, info=convert.info_to_proto(info))
        if fieldpaths:
            req.update_mask.CopyFrom(FieldMask(paths=list(fieldpaths)))
        return convert.info_from_proto(self._call("Update", req).info)

    def usage(self, key: str) -> Usage:
        resp = self._call("Usage", pb.UsageRequest(snapshotter=_NAME, key=key))
        return Usage(size=resp.size, inodes=resp.inodes)

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        if self._closed:
            raise errors.ClosedError("grpc client is closed")
        req = pb.ListSnapshotsRequest(snapshotter=_NAME, filters=list(filters))
        try:
            stream = self._stub.List(req, timeout=_TIMEOUT)
            return [convert.info_from_proto(i) for resp in stream for i in resp.info]
        except grpc.RpcError as exc:
            category = CATEGORIES.get(exc.code())
            if category is None:
                raise
            raise category(f"List: {exc.details()}") from None

    def cleanup(self) -> None:
        self._call("Cleanup", pb.CleanupRequest(snapshotter=_NAME))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._channel.close()
        self._server.stop(0)
        self._core.close()
