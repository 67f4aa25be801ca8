"""Registry access: the OCI distribution API over httpx, under trio.

The only package that imports httpx. Callers use `RegistryClient` with `Reference`s
and get `Manifest`s, sizes and verified bytes back, or errors of the categories in
`snapshotter.errors` (specific ones in `snapshotter.registry.errors`).
"""

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.credentials import (
    ChainedCredentials,
    Credential,
    CredentialSource,
    DockerConfigCredentials,
    StaticCredentials,
)
from snapshotter.registry.manifest import Descriptor, Index, Manifest, Platform
from snapshotter.registry.reference import Reference
from snapshotter.registry.retry import RetryPolicy

__all__ = [
    "ChainedCredentials",
    "Credential",
    "CredentialSource",
    "Descriptor",
    "DockerConfigCredentials",
    "Index",
    "Manifest",
    "Platform",
    "Reference",
    "RegistryClient",
    "RetryPolicy",
    "StaticCredentials",
]
