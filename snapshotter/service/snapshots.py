"""The Snapshots gRPC servicer: a thin adapter from requests to one core call each.

Errors are translated here, once, from one table: containerd's client turns the status
codes back into errdefs and branches on them (ALREADY_EXISTS from a remote Prepare means
"skip the download"), so the codes matter more than the messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty

from snapshotter import errors, metrics
from snapshotter.core.snapshotter import Snapshotter
from snapshotter.service import convert
from snapshotter.service._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2 as pb,
)
from snapshotter.service._proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)

__all__ = ["STATUS_CODES", "SnapshotsServicer"]

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[errors.LazysnapError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.NotImplementedYet: grpc.StatusCode.UNIMPLEMENTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.ClosedError: grpc.StatusCode.UNAVAILABLE,
}

# Expected outcomes that containerd asks for routinely; not worth a warning.
_QUIET = (errors.NotFound, errors.AlreadyExists)

T = TypeVar("T")


def _call(method: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    start = time.monotonic()
    try:
        return fn()
    except errors.LazysnapError as exc:
        cat = errors.category(exc)
        assert cat is not None
        code = STATUS_CODES[cat]
        level = logging.DEBUG if isinstance(exc, _QUIET) else logging.WARNING
        log.log(level, "%s: %s: %s", method, code.name, exc)
        metrics.count_rpc_error(method, code.name)
        context.abort(code, str(exc))
    except Exception as exc:
        log.exception("%s: internal error", method)
        metrics.count_rpc_error(method, grpc.StatusCode.INTERNAL.name)
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error: {exc}")
    finally:
        elapsed = time.monotonic() - start
        metrics.observe_rpc(method, elapsed)
        log.debug("%s took %.1f ms", method, elapsed * 1e3)
    raise AssertionError("unreachable")  # context.abort raises


def _require(value: str, what: str) -> str:
    if not value:
        raise errors.InvalidArgument(f"{what} must not be empty")
    return value


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(self, sn: Snapshotter) -> None:
        self._sn = sn

    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext):
        def run() -> pb.PrepareSnapshotResponse:
            mounts = self._sn.prepare(
                _require(request.key, "key"), request.parent, dict(request.labels)
            )
            return pb.PrepareSnapshotResponse(mounts=convert.mounts_to_proto(mounts))

        return _call("Prepare", context, run)

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext):
        def run() -> pb.ViewSnapshotResponse:
            mounts = self._sn.view(
                _require(request.key, "key"), request.parent, dict(request.labels)
            )
            return pb.ViewSnapshotResponse(mounts=convert.mounts_to_proto(mounts))

        return _call("View", context, run)

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext):
        return _call(
            "Mounts",
            context,
            lambda: pb.MountsResponse(
                mounts=convert.mounts_to_proto(self._sn.mounts(_require(request.key, "key")))
            ),
        )

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext):
        def run() -> Empty:
            self._sn.commit(
                _require(request.name, "name"), _require(request.key, "key"),
                dict(request.labels),
            )
            return Empty()

        return _call("Commit", context, run)

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext):
        def run() -> Empty:
            self._sn.remove(_require(request.key, "key"))
            return Empty()

        return _call("Remove", context, run)

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext):
        return _call(
            "Stat",
            context,
            lambda: pb.StatSnapshotResponse(
                info=convert.info_to_proto(self._sn.stat(_require(request.key, "key")))
            ),
        )

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext):
        def run() -> pb.UpdateSnapshotResponse:
            info = convert.info_from_proto(request.info)
            _require(info.name, "info.name")
            info = self._sn.update(info, list(request.update_mask.paths))
            return pb.UpdateSnapshotResponse(info=convert.info_to_proto(info))

        return _call("Update", context, run)

    def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        infos = _call("List", context, lambda: self._sn.walk(list(request.filters)))
        # Batches keep each message far below grpc's 4 MiB default limit.
        for i in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(
                info=[convert.info_to_proto(x) for x in infos[i : i + 100]]
            )

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext):
        def run() -> pb.UsageResponse:
            usage = self._sn.usage(_require(request.key, "key"))
            return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

        return _call("Usage", context, run)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext):
        def run() -> Empty:
            self._sn.cleanup()
            return Empty()

        return _call("Cleanup", context, run)
