"""A small CRI client that drives containerd the way kubelet does, for end-to-end tests.

Runtime calls go to containerd's socket; image calls go to `image_address` when given (the
lazysnap image-service proxy, as with kubelet's `--image-service-endpoint`), else to
containerd too. Pods run with host networking, so no CNI plugin is needed. `close()` stops
and removes every pod this client started, with their containers, even after a failure.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.e2e._cri_proto.runtime.v1 import api_pb2 as cri
from tests.e2e._cri_proto.runtime.v1 import api_pb2_grpc as cri_grpc

__all__ = ["CriClient", "LogLine", "Pod", "parse_log"]

# Kubelet's default for runtime calls; pulls get longer.
CALL_TIMEOUT = 60.0
PULL_TIMEOUT = 300.0


@dataclass(frozen=True)
class LogLine:
    """One line of a CRI container log file: `<RFC3339Nano> <stream> <P|F> <text>`."""

    time: str
    stream: str
    partial: bool
    text: str


def parse_log(raw: str) -> list[LogLine]:
    lines = []
    for row in raw.splitlines():
        ts, stream, tag, text = [*row.split(" ", 3), "", "", ""][:4]
        if stream not in ("stdout", "stderr") or tag not in ("P", "F"):
            raise AssertionError(f"not a CRI log line: {row!r}")
        lines.append(LogLine(ts, stream, tag == "P", text))
    return lines


@dataclass
class Pod:
    id: str
    config: cri.PodSandboxConfig
    log_dir: Path
    containers: list[str] = field(default_factory=list)


def _host_namespaces() -> cri.NamespaceOption:
    # Host network: containerd skips CNI. PID per container, as kubelet sets for v1 pods.
    return cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)


class CriClient:
    def __init__(self, address: str, image_address: str | None = None) -> None:
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self._image_channel = (
            grpc.insecure_channel(f"unix://{image_address}") if image_address else self._channel
        )
        self.runtime = cri_grpc.RuntimeServiceStub(self._channel)
        self.images = cri_grpc.ImageServiceStub(self._image_channel)
        self.pods: list[Pod] = []

    # -- images ----------------------------------------------------------------------------
    def pull(self, image: str, username: str = "", password: str = "") -> str:
        """PullImage; returns the image reference containerd reports (by ID)."""
        auth = cri.AuthConfig(username=username, password=password) if username else None
        resp = self.images.PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=auth),
            timeout=PULL_TIMEOUT,
        )
        return resp.image_ref

    def image_ids(self) -> dict[str, str]:
        """repo tag -> image ID, from ListImages."""
        resp = self.images.ListImages(cri.ListImagesRequest(), timeout=CALL_TIMEOUT)
        return {tag: img.id for img in resp.images for tag in img.repo_tags}

    def remove_image(self, image: str) -> None:
        self.images.RemoveImage(
            cri.RemoveImageRequest(image=cri.ImageSpec(image=image)), timeout=CALL_TIMEOUT
        )

    # -- pods and containers -----------------------------------------------------------------
    def run_pod(self, name: str, log_dir: Path) -> Pod:
        log_dir.mkdir(parents=True, exist_ok=True)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace="e2e"),
            log_directory=str(log_dir),
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=_host_namespaces()
                )
            ),
        )
        resp = self.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=config), timeout=PULL_TIMEOUT
        )
        pod = Pod(resp.pod_sandbox_id, config, log_dir)
        self.pods.append(pod)
        return pod

    def start_container(self, pod: Pod, name: str, image: str, command: list[str]) -> str:
        """CreateContainer + StartContainer; the log goes to `<pod log dir>/<name>.log`."""
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=image),
            command=command,
            log_path=f"{name}.log",
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=_host_namespaces()
                )
            ),
        )
        cid = self.runtime.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config,
                                       sandbox_config=pod.config),
            timeout=CALL_TIMEOUT,
        ).container_id
        pod.containers.append(cid)
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid),
                                    timeout=CALL_TIMEOUT)
        return cid

    def status(self, cid: str) -> cri.ContainerStatus:
        return self.runtime.ContainerStatus(
            cri.ContainerStatusRequest(container_id=cid), timeout=CALL_TIMEOUT
        ).status

    def wait_exited(self, cid: str, timeout: float = 60.0) -> cri.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(cid)
            if st.state == cri.CONTAINER_EXITED:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {cid} still {cri.ContainerState.Name(st.state)}")
            time.sleep(0.1)

    def remove_pod(self, pod: Pod) -> None:
        """StopPodSandbox + RemovePodSandbox, which also removes the pod's containers."""
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                    timeout=CALL_TIMEOUT)
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                      timeout=CALL_TIMEOUT)
        self.pods.remove(pod)

    def pod_ids(self) -> list[str]:
        resp = self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=CALL_TIMEOUT)
        return [p.id for p in resp.items]

    def close(self) -> None:
        for pod in list(self.pods):
            with contextlib.suppress(grpc.RpcError):
                self.remove_pod(pod)
        if self._image_channel is not self._channel:
            self._image_channel.close()
        self._channel.close()
