"""Kubernetes nodes: the CRI image-service proxy that keeps kubelet's pull credentials.

`ImageServiceProxy` sits between kubelet and containerd's CRI socket; `CredentialStore`
keeps what it saw, encrypted, and answers the registry client as a `CredentialSource`.
Besides `service/`, the one package that imports grpc.
"""

from snapshotter.cri.proxy import IMAGE_SERVICES, ImageServiceProxy
from snapshotter.cri.pull import InvalidPullRequest, PullAuth, parse_pull, parse_remove
from snapshotter.cri.store import CredentialStore, StoredImage, UnsafeKeyFile

__all__ = [
    "IMAGE_SERVICES",
    "CredentialStore",
    "ImageServiceProxy",
    "InvalidPullRequest",
    "PullAuth",
    "StoredImage",
    "UnsafeKeyFile",
    "parse_pull",
    "parse_remove",
]
