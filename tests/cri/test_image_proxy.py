"""ImageServiceProxy over real unix sockets, in front of a fake upstream CRI server.

The upstream records what reached it and answers from a per-method script, so the tests can
check byte-exact forwarding, status and metadata pass-through, and when credentials are kept.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from snapshotter.cri.proxy import ImageServiceProxy
from snapshotter.cri.store import CredentialStore
from snapshotter.registry.credentials import Credential
from snapshotter.service.server import AddressInUse
from tests.e2e._cri_proto.runtime.v1 import api_pb2 as cri

SECRET = "proxy-Secret-123"
IMAGE = "reg.example:5000/team/app:v1"
HOST = "reg.example:5000"

Answer = Callable[[bytes, grpc.ServicerContext], bytes]


@dataclass
class FakeCri:
    """Upstream: answers every method from `script` (default: echo the request bytes)."""

    script: dict[str, Answer] = field(default_factory=dict)
    calls: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    def handler(self) -> grpc.GenericRpcHandler:
        fake = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                method = details.method

                def behavior(request: bytes, context: grpc.ServicerContext) -> bytes:
                    fake.calls.append((method, request, dict(context.invocation_metadata())))
                    answer = fake.script.get(method.rpartition("/")[2])
                    return answer(request, context) if answer else request

                return grpc.unary_unary_rpc_method_handler(behavior)

        return Handler()


@dataclass
class Setup:
    fake: FakeCri
    store: CredentialStore
    proxy: ImageServiceProxy
    channel: grpc.Channel

    def call(self, method: str, request: bytes, **kw) -> bytes:  # type: ignore[no-untyped-def]
        return self.channel.unary_unary(method)(request, timeout=10, **kw)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    sockets = Path(tempfile.mkdtemp(prefix="lzp", dir="/tmp"))
    fake = FakeCri()
    upstream = grpc.server(ThreadPoolExecutor(4), handlers=[fake.handler()])
    upstream.add_insecure_port(f"unix://{sockets}/containerd.sock")
    upstream.start()
    store = CredentialStore(tmp_path / "cri", ttl=3600)
    proxy = ImageServiceProxy(sockets / "proxy.sock", str(sockets / "containerd.sock"), store)
    proxy.start()
    channel = grpc.insecure_channel(f"unix://{sockets}/proxy.sock")
    try:
        yield Setup(fake, store, proxy, channel)
    finally:
        channel.close()
        proxy.stop(grace=1)
        upstream.stop(1).wait()
        for p in sockets.iterdir():
            p.unlink()
        sockets.rmdir()


def _pull(image: str = IMAGE, password: str = SECRET) -> bytes:
    return cri.PullImageRequest(
        image=cri.ImageSpec(image=image),
        auth=cri.AuthConfig(username="alice", password=password),
        sandbox_config=cri.PodSandboxConfig(hostname="node"),
    ).SerializeToString()


def test_image_calls_are_forwarded_byte_for_byte(setup: Setup) -> None:
    request = cri.ListImagesRequest(
        filter=cri.ImageFilter(image=cri.ImageSpec(image="x", annotations={"a": "b"}))
    ).SerializeToString()
    reply = cri.ListImagesResponse(images=[cri.Image(id="sha256:1", size=5)]).SerializeToString()
    setup.fake.script["ListImages"] = lambda req, ctx: reply

    for service in ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService"):
        assert setup.call(f"/{service}/ListImages", request,
                          metadata=[("x-trace", "t1")]) == reply
    assert [(m, r) for m, r, _ in setup.fake.calls] == [
        ("/runtime.v1.ImageService/ListImages", request),
        ("/runtime.v1alpha2.ImageService/ListImages", request),
    ]
    assert setup.fake.calls[0][2]["x-trace"] == "t1"


def test_other_services_are_not_served(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as err:
        setup.call("/runtime.v1.RuntimeService/RunPodSandbox", b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert setup.fake.calls == []


def test_upstream_errors_pass_through(setup: Setup) -> None:
    def fail(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.set_trailing_metadata([("x-why", "because")])
        ctx.abort(grpc.StatusCode.NOT_FOUND, "image not here")

    setup.fake.script["ImageStatus"] = fail
    with pytest.raises(grpc.RpcError) as err:
        setup.call("/runtime.v1.ImageService/ImageStatus", b"")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "image not here"
    assert ("x-why", "because") in err.value.trailing_metadata()


def test_pull_credentials_are_kept_before_containerd_sees_the_pull(setup: Setup) -> None:
    seen: list[Credential | None] = []

    def pull(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        # containerd prepares layers while the pull runs: the snapshotter needs them now.
        seen.append(setup.store.credential_for(HOST))
        return cri.PullImageResponse(image_ref="sha256:abc").SerializeToString()

    setup.fake.script["PullImage"] = pull
    request = _pull()
    reply = setup.call("/runtime.v1.ImageService/PullImage", request)

    assert cri.PullImageResponse.FromString(reply).image_ref == "sha256:abc"
    assert setup.fake.calls[0][1] == request
    assert seen == [Credential("alice", SECRET)]
    assert [(e.image, e.username) for e in setup.store.entries()] == [(IMAGE, "alice")]


def test_a_failed_pull_keeps_the_previous_credentials(setup: Setup) -> None:
    setup.call("/runtime.v1.ImageService/PullImage", _pull(password="good"))

    def refuse(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.abort(grpc.StatusCode.UNKNOWN, "failed to resolve: 401 Unauthorized")

    setup.fake.script["PullImage"] = refuse
    with pytest.raises(grpc.RpcError) as err:
        setup.call("/runtime.v1.ImageService/PullImage", _pull(password="wrong"))
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert setup.store.credential_for(HOST) == Credential("alice", "good")


def test_remove_image_forgets_its_credentials(setup: Setup) -> None:
    setup.call("/runtime.v1.ImageService/PullImage", _pull())
    remove = cri.RemoveImageRequest(image=cri.ImageSpec(image=IMAGE)).SerializeToString()
    setup.call("/runtime.v1.ImageService/RemoveImage", remove)

    assert setup.store.entries() == []
    assert setup.fake.calls[-1][1] == remove


@pytest.mark.allow_log_errors
def test_unreadable_pull_is_still_forwarded(setup: Setup) -> None:
    assert setup.call("/runtime.v1.ImageService/PullImage", b"\xff\xff") == b"\xff\xff"
    assert setup.store.entries() == []


def test_client_deadline_reaches_upstream(setup: Setup) -> None:
    release = threading.Event()

    def slow(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        remaining = ctx.time_remaining()
        release.wait(5)
        return str(remaining).encode()

    setup.fake.script["ImageFsInfo"] = slow
    with pytest.raises(grpc.RpcError) as err:
        setup.channel.unary_unary("/runtime.v1.ImageService/ImageFsInfo")(b"", timeout=0.5)
    release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_secrets_never_reach_the_log(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    setup.call("/runtime.v1.ImageService/PullImage", _pull())
    setup.fake.script["PullImage"] = lambda req, ctx: ctx.abort(grpc.StatusCode.UNKNOWN, "no")
    with pytest.raises(grpc.RpcError):
        setup.call("/runtime.v1.ImageService/PullImage", _pull())

    assert IMAGE in caplog.text
    assert SECRET not in caplog.text


def test_a_live_socket_is_not_stolen(setup: Setup, tmp_path: Path) -> None:
    other = ImageServiceProxy(setup.proxy.address, "/nonexistent.sock", setup.store)
    with pytest.raises(AddressInUse):
        other.start()
    other.stop(grace=0)
    assert setup.proxy.address.exists()


def test_containerd_down_is_unavailable_and_keeps_nothing(tmp_path: Path) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="lzp", dir="/tmp"))
    store = CredentialStore(tmp_path / "cri", ttl=3600)
    proxy = ImageServiceProxy(sockets / "proxy.sock", str(sockets / "absent.sock"), store)
    proxy.start()
    try:
        with (grpc.insecure_channel(f"unix://{sockets}/proxy.sock") as channel,
              pytest.raises(grpc.RpcError) as err):
            channel.unary_unary("/runtime.v1.ImageService/PullImage")(_pull(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert store.entries() == []
    finally:
        proxy.stop(grace=0)
        sockets.rmdir()
