"""Errors of `lazysnap convert`: the categories of `snapshotter.errors`, made specific."""

from __future__ import annotations

from snapshotter.errors import DataLoss, InvalidArgument, NotFound

__all__ = [
    "CorruptLayer",
    "InvalidImage",
    "InvalidLocation",
    "LayoutNotFound",
    "UnsafeLayer",
    "UnsupportedMediaType",
]


class InvalidLocation(InvalidArgument):
    """SRC or DST is neither a registry reference nor `oci:DIR[:tag]`."""


class LayoutNotFound(NotFound):
    """An OCI layout directory, its index.json, a tag in it, or one of its blobs is missing."""


class UnsupportedMediaType(InvalidArgument):
    """A manifest, config or layer of a kind we cannot convert."""


class InvalidImage(InvalidArgument):
    """The image's documents disagree (e.g. a config with another number of diff_ids)."""


class CorruptLayer(DataLoss):
    """A layer's bytes fail to decompress, or decompress to something else than promised."""


class UnsafeLayer(InvalidArgument):
    """A layer tar with entries that would escape the layer (`..`, dangling hardlinks)."""
