"""The CRI image-service proxy: kubelet's `--image-service-endpoint` -> containerd's CRI.

Every ImageService call is forwarded as raw bytes, so any CRI version containerd speaks
passes through unchanged; PullImage and RemoveImage are also read (`pull.py`) to keep
the pull credentials in a `CredentialStore` for lazily fetched layers.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from snapshotter.cri.pull import InvalidPullRequest, parse_pull, parse_remove
from snapshotter.cri.store import CredentialStore
from snapshotter.service.server import bind_unix

__all__ = ["IMAGE_SERVICES", "ImageServiceProxy"]

log = logging.getLogger(__name__)

# containerd 1.6 serves both; kubelet >= 1.26 speaks only v1.
IMAGE_SERVICES = frozenset({"runtime.v1.ImageService", "runtime.v1alpha2.ImageService"})
# kubelet's own limit is 16 MiB; ListImages on a busy node can exceed grpc's 4 MiB default.
_MAX_MESSAGE = 64 << 20
_MESSAGE_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
]
# Metadata grpc sets itself, or that describes this hop rather than the call.
_HOP_METADATA = ("user-agent", "grpc-", ":")


class ImageServiceProxy:
    """A gRPC server on `address` that forwards ImageService calls to `upstream`.

    Lifecycle: `start()` claims the socket (a stale one is removed, a live one is
    AddressInUse), `stop()` drains calls for `grace` seconds and removes the socket.
    Deadlines, metadata, status codes, details and trailing metadata pass through both
    ways; a call without a deadline gets `timeout` seconds, and a call the client
    cancels is cancelled upstream. Other services answer UNIMPLEMENTED: kubelet sends
    only ImageService calls to an image endpoint.

    PullImage: the credential in the request is stored *before* the call is forwarded,
    because containerd asks the snapshotter to prepare the layers while the pull is
    still running; if the pull fails, the previous credential (if any) comes back.
    RemoveImage: on success, the image's credential is forgotten. Example::

        proxy = ImageServiceProxy(Path("/run/lazysnap/cri.sock"),
                                  "/run/containerd/containerd.sock", store)
        proxy.start()   # kubelet --image-service-endpoint=unix:///run/lazysnap/cri.sock
    """

    def __init__(
        self,
        address: Path,
        upstream: str,
        store: CredentialStore,
        *,
        mode: int = 0o660,
        workers: int = 8,
        timeout: float = 3600.0,
    ) -> None:
        self.address = Path(address)
        self.upstream = upstream
        self._store = store
        self._mode = mode
        self._timeout = timeout
        self._bound = False
        target = upstream if "://" in upstream else f"unix://{upstream}"
        self._channel = grpc.insecure_channel(target, options=_MESSAGE_OPTIONS)
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri-proxy"),
            handlers=[_Handler(self)],
            options=[("grpc.so_reuseport", 0), *_MESSAGE_OPTIONS],
        )

    def start(self) -> None:
        bind_unix(self._server, self.address, self._mode)
        self._bound = True
        self._server.start()
        os.chmod(self.address, self._mode)
        log.info("CRI image-service proxy on %s, forwarding to %s", self.address, self.upstream)

    def stop(self, grace: float = 5.0) -> None:
        self._server.stop(grace).wait()
        self._channel.close()
        if self._bound:
            self._bound = False
            self.address.unlink(missing_ok=True)

    # -- calls, on the server's threads ---------------------------------------------------
    def forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        call = self._channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out
        remaining = context.time_remaining()
        timeout = self._timeout if remaining is None else min(remaining, self._timeout)
        metadata = [(k, v) for k, v in context.invocation_metadata()
                    if not k.startswith(_HOP_METADATA)]
        future = call.future(request, timeout=timeout, metadata=metadata)
        context.add_callback(future.cancel)
        try:
            return future.result()
        except grpc.RpcError as exc:
            rpc: Any = exc  # the future's error is also a grpc.Call
            trailing = rpc.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(trailing)
            context.abort(rpc.code(), rpc.details() or "")
            raise  # unreachable: abort raises

    def pull(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            pull = parse_pull(request)
        except InvalidPullRequest as exc:
            # containerd will give the caller its own answer; we just cannot keep anything.
            log.warning("%s; forwarding without keeping credentials", exc)
            return self.forward(method, request, context)
        if pull.credential is None:
            log.info("PullImage %s (no credentials)", pull.image)
            return self.forward(method, request, context)
        previous = self._store.remember(pull.image, pull.host, pull.credential)
        try:
            return self.forward(method, request, context)
        except BaseException:
            self._store.revert(pull.image, previous)
            log.info("PullImage %s failed; its credentials were not kept", pull.image)
            raise

    def remove(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        response = self.forward(method, request, context)
        try:
            image = parse_remove(request)
        except InvalidPullRequest:
            image = None
        if image is not None:
            self._store.forget(image)
        return response


class _Handler(grpc.GenericRpcHandler):
    """Routes every ImageService method to a forwarder; nothing is deserialized by grpc."""

    def __init__(self, proxy: ImageServiceProxy) -> None:
        self._proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # "/runtime.v1.ImageService/PullImage"
        service, _, name = method.lstrip("/").partition("/")
        if service not in IMAGE_SERVICES:
            return None
        act = {"PullImage": self._proxy.pull, "RemoveImage": self._proxy.remove}.get(
            name, self._proxy.forward
        )

        def behavior(request: bytes, context: grpc.ServicerContext) -> bytes:
            return act(method, request, context)

        return grpc.unary_unary_rpc_method_handler(behavior)
