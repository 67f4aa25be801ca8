"""Real components for end-to-end tests: a registry, containerd and the lazysnap daemon.

Each runs as a child process on loopback or on a unix socket inside a scratch directory, with
bounded start-up waits, and `stop()` always leaves no process and no mount behind, even if the
test failed half-way. The quickstart demo and the benchmarks drive the same classes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = [
    "Containerd",
    "ContainerdError",
    "Lazysnap",
    "Registry",
    "Service",
    "free_port",
    "mounts_under",
    "remove_tree",
    "unmount_under",
    "wait_for",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Unix socket paths must fit in sun_path (108 bytes), so sockets live in a short dir of their
# own rather than in pytest's deep tmp_path.
SOCKET_DIR_PARENT = "/tmp"


class ContainerdError(RuntimeError):
    """A `ctr` command failed; carries its output so the test failure shows why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below `path`, deepest (most recently mounted) first."""
    prefix = str(Path(path).resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found[::-1]


def unmount_under(path: Path | str) -> list[str]:
    """Best-effort lazy unmount of everything below `path`; returns what was mounted."""
    points = mounts_under(path)
    for point in points:
        subprocess.run(["umount", "-l", point], check=False, capture_output=True, timeout=30)
    return points


class Service:
    """A child process with its output in a log file, stopped by signal with a bounded wait."""

    name = "service"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        # Append so that a restarted daemon's log follows its previous life's.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process and wait; SIGKILL if it does not exit in time. Returns its status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode


class Registry(Service):
    """Debian's `docker-registry` (distribution 2.8) with filesystem storage in `workdir`."""

    name = "registry"

    def __init__(self, workdir: Path, htpasswd: Path | None = None) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.htpasswd = htpasswd

    def start(self, timeout: float = 30.0) -> Registry:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        auth = ""
        if self.htpasswd is not None:
            auth = f"auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {self.htpasswd}\n"
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n" + auth
        )
        self._spawn(["docker-registry", "serve", str(config)])

        def answers() -> bool:
            self.check_alive()
            try:
                r = httpx.get(f"{self.url}/v2/", timeout=2)
            except httpx.TransportError:
                return False
            return r.status_code in (200, 401)

        wait_for(answers, timeout, f"registry on {self.host}")
        return self


class Lazysnap(Service):
    """`lazysnap serve` on a unix socket with its own root; restartable on the same root."""

    name = "lazysnap"

    def __init__(
        self,
        workdir: Path,
        address: str,
        config: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.root = workdir / "root"
        self.address = address
        self.config = config
        self.extra_args = list(extra_args)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "snapshotter", "serve"]
        argv += ["--address", self.address, "--root", str(self.root), "--log-level", "debug"]
        # An empty hosts dir, so the machine's /etc/containerd/certs.d cannot change the tests.
        argv += ["--hosts-dir", str(self.workdir / "certs.d")]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return argv + self.extra_args

    def start(self, timeout: float = 30.0) -> Lazysnap:
        (self.workdir / "certs.d").mkdir(exist_ok=True)
        self._spawn(self.argv(), env={"PYTHONPATH": str(REPO_ROOT)})
        self.wait_listening(self.address, timeout)
        return self

    def wait_listening(self, address: str, timeout: float = 30.0) -> None:
        """Until the daemon accepts connections on `address`, one of its unix sockets
        (they are bound one after another: the snapshots socket is only the first)."""

        def listening() -> bool:
            self.check_alive()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(address)
                except OSError:
                    return False
            return True

        wait_for(listening, timeout, f"lazysnap socket {address}")

    def restart(self) -> Lazysnap:
        status = self.stop()
        if status != 0:
            raise RuntimeError(f"lazysnap exited with status {status} on SIGTERM")
        return self.start()

    def snapshot_dirs(self) -> set[str]:
        d = self.root / "snapshots"
        return {p.name for p in d.iterdir()} if d.is_dir() else set()


class Containerd(Service):
    """containerd with private root, state and sockets; `ctr()` talks to it.

    Plugins that need hardware or software we lack are disabled so the log stays clean, and
    the CRI plugin is off: the tests drive containerd through `ctr`.
    """

    name = "containerd"
    namespace = "lazysnap-e2e"

    DISABLED_PLUGINS = (
        "io.containerd.grpc.v1.cri",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.tracing.processor.v1.otlp",
        "io.containerd.internal.v1.tracing",
    )

    def __init__(self, workdir: Path, sockdir: Path, proxy_plugins: Mapping[str, str]) -> None:
        super().__init__(workdir)
        self.address = str(sockdir / "containerd.sock")
        self.proxy_plugins = dict(proxy_plugins)
        # Called with each ctr command line (without address and namespace) before it runs;
        # the quickstart demo uses it to show what it does.
        self.trace: Callable[[list[str]], None] | None = None

    def config_text(self) -> str:
        disabled = ", ".join(f'"{p}"' for p in self.DISABLED_PLUGINS)
        lines = [
            "version = 2",
            f'root = "{self.workdir / "root"}"',
            f'state = "{self.workdir / "state"}"',
            f"disabled_plugins = [{disabled}]",
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.workdir / "opt"}"',
            # Collect garbage right after any deletion, so removed containers' snapshots go
            # promptly rather than after 100 mutations.
            '[plugins."io.containerd.gc.v1.scheduler"]',
            "  deletion_threshold = 1",
        ]
        for name, address in self.proxy_plugins.items():
            lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{address}"']
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> Containerd:
        config = self.workdir / "config.toml"
        config.write_text(self.config_text())
        self._spawn(["containerd", "--config", str(config), "--log-level", "info"])

        def answers() -> bool:
            self.check_alive()
            return self.ctr("version", check=False, timeout=5).returncode == 0

        wait_for(answers, timeout, f"containerd on {self.address}", interval=0.1)
        return self

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120.0, tool: str = "ctr"
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr` (or `ctr-remote`) against this containerd, in the test namespace."""
        argv = [tool, "--address", self.address, "--namespace", self.namespace, *args]
        if self.trace is not None:
            self.trace([tool, *args])
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerdError(f"{' '.join(argv)}: timed out after {timeout}s") from exc
        if check and done.returncode != 0:
            raise ContainerdError(
                f"{' '.join(argv)}: exit {done.returncode}\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def _cleanup_workloads(self) -> None:
        """Kill and delete every task and container, so no container process outlives us."""
        tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=20)
        for task in tasks.stdout.split() if tasks.returncode == 0 else []:
            self.ctr("tasks", "rm", "-f", task, check=False, timeout=30)
        containers = self.ctr("containers", "ls", "-q", check=False, timeout=20)
        for cid in containers.stdout.split() if containers.returncode == 0 else []:
            self.ctr("containers", "rm", cid, check=False, timeout=30)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.running():
            with contextlib.suppress(Exception):
                self._cleanup_workloads()
        status = super().stop(sig, timeout)
        self._kill_shims()
        return status

    def _kill_shims(self) -> None:
        """Shims are reparented away from containerd; find ours by the address they were given."""
        needle = self.address.encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline.split(b"\0")[0] and needle in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)


def remove_tree(path: Path) -> None:
    """Delete a scratch dir after unmounting anything left below it."""
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)
