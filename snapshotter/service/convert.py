"""Conversions between generated protobuf messages and core value types."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from snapshotter.core.types import Info, Kind, Mount
from snapshotter.service._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.service._proto.containerd.types import mount_pb2

__all__ = ["info_from_proto", "info_to_proto", "mounts_to_proto"]


def _ts(value: datetime | None) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(value)
    return ts


def info_to_proto(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=_ts(info.created),
        updated_at=_ts(info.updated),
        labels=info.labels,
    )


def info_from_proto(msg: pb.Info) -> Info:
    def dt(ts: Timestamp) -> datetime | None:
        return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None

    return Info(
        kind=Kind(msg.kind) if msg.kind in Kind._value2member_map_ else Kind.UNKNOWN,
        name=msg.name,
        parent=msg.parent,
        labels=dict(msg.labels),
        created=dt(msg.created_at),
        updated=dt(msg.updated_at),
    )


def mounts_to_proto(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]
