"""`lazysnap convert`: any OCI/Docker image (registry or OCI layout) -> eStargz image.

Boundary: reads and writes through `registry.RegistryClient` or a layout directory,
and builds layers with `format.build`; knows nothing of FUSE, snapshots or gRPC.
"""

from snapshotter.convert.errors import (
    CorruptLayer,
    InvalidImage,
    InvalidLocation,
    LayoutNotFound,
    UnsafeLayer,
    UnsupportedMediaType,
)
from snapshotter.convert.layer import LayerOutput, convert_layer
from snapshotter.convert.pipeline import ConvertOptions, ConvertSummary, convert_image
from snapshotter.convert.progress import ConvertProgress, LineProgress, NullProgress, RichProgress

__all__ = [
    "ConvertOptions",
    "ConvertProgress",
    "ConvertSummary",
    "CorruptLayer",
    "InvalidImage",
    "InvalidLocation",
    "LayerOutput",
    "LayoutNotFound",
    "LineProgress",
    "NullProgress",
    "RichProgress",
    "UnsafeLayer",
    "UnsupportedMediaType",
    "convert_image",
    "convert_layer",
]
