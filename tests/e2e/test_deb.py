"""The Debian package on this machine: build it, `dpkg -i` it, run the installed daemon the way
its systemd unit does, pull and run a lazy container through it, then `dpkg -P` it and check
that nothing of it is left.

The daemon runs with the installed config's defaults (/var/lib/lazysnap,
/run/lazysnap/lazysnap.sock), like a real installation: the test refuses to start if any of
those paths, or the package, is already there, so it can never purge someone's real install.
Where systemd runs (`systemctl is-system-running`), the unit itself is started; elsewhere (CI
containers, this workplace) its ExecStart command line is run directly with systemd's
minimal environment, so the installed venv must stand on its own.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import daemon_log_problems, data_sha256
from tests.e2e.daemon_status import layer_rows
from tests.e2e.estargz import EstargzImage
from tests.e2e.harness import (
    REPO_ROOT,
    Containerd,
    Registry,
    Service,
    remove_tree,
    unmount_under,
    wait_for,
)
from tests.e2e.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.slow]

UNIT = Path("/lib/systemd/system/lazysnap.service")
STATE = Path("/var/lib/lazysnap")
SOCKET = Path("/run/lazysnap/lazysnap.sock")
# Everything the package or its daemon puts on the machine; none may be there before or after.
FOOTPRINT = [
    Path("/opt/lazysnap"), Path("/usr/bin/lazysnap"), UNIT, Path("/etc/lazysnap"),
    Path("/etc/containerd/conf.d/lazysnap.toml"), STATE, SOCKET.parent,
    Path("/etc/systemd/system/multi-user.target.wants/lazysnap.service"),
]
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        )
    return done


def _package_installed() -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "lazysnap"],
                          capture_output=True, text=True)
    return done.returncode == 0 and "not-installed" not in done.stdout


def _systemd_running() -> bool:
    try:
        done = subprocess.run(["systemctl", "is-system-running"], capture_output=True,
                              text=True, timeout=10)
    except FileNotFoundError:
        return False
    return done.stdout.strip() in ("running", "degraded", "starting")


def _unit_command(unit: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart (without systemd's prefix characters) and Environment= of a unit file."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(unit)
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    argv[0] = argv[0].lstrip("-@:+!")
    env = dict(kv.split("=", 1) for kv in shlex.split(service.get("Environment", "")))
    return argv, env


class InstalledDaemon(Service):
    """The installed lazysnap as its unit runs it: `systemctl` where systemd runs, else the
    unit's command line with systemd's environment (no PYTHONPATH, no venv, cwd /)."""

    name = "lazysnap-deb"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.systemd = _systemd_running()
        self.argv, self.env = _unit_command(UNIT)

    def start(self, timeout: float = 60.0) -> InstalledDaemon:
        if self.systemd:
            _run("systemctl", "restart", "lazysnap.service")
        else:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd="/", env={"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **self.env},
                    start_new_session=True,
                )

        def listening() -> bool:
            self.check_alive()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(SOCKET))
                except OSError:
                    return False
            return True

        wait_for(listening, timeout, f"installed lazysnap on {SOCKET}")
        return self

    def stop(self, sig: int = 15, timeout: float = 15.0) -> int | None:
        if self.systemd:
            subprocess.run(["systemctl", "stop", "lazysnap.service"], timeout=60, check=False)
            journal = subprocess.run(["journalctl", "-u", "lazysnap", "-o", "cat", "--no-pager"],
                                     capture_output=True, text=True, timeout=60, check=False)
            self.log_path.write_text(journal.stdout)
            return 0
        return super().stop(sig, timeout)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "packaging/deb/build.sh")], capture_output=True, text=True,
        timeout=600, env={**os.environ, "OUT_DIR": str(out)}, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"build.sh failed:\n{done.stdout}{done.stderr}"
    print(done.stderr, f"built in {time.monotonic() - started:.0f}s")
    debs = list(out.glob("lazysnap_*_*.deb"))
    assert [p.name for p in debs] == [done.stdout.strip().rsplit("/", 1)[-1]]
    return debs[0]


@pytest.fixture
def installed(deb: Path) -> Iterator[Path]:
    if _package_installed():
        pytest.fail("the lazysnap package is already installed here; not touching it")
    present = [str(p) for p in FOOTPRINT if os.path.lexists(p)]
    if present:
        pytest.fail(f"lazysnap files already on this machine, not touching them: {present}")
    try:
        _run("dpkg", "-i", str(deb), timeout=300)
        yield deb
    finally:
        unmount_under(STATE)
        purge = subprocess.run(["dpkg", "-P", "lazysnap"], capture_output=True, text=True,
                               timeout=300)
        assert purge.returncode == 0, f"dpkg -P failed:\n{purge.stdout}{purge.stderr}"
        left = [str(p) for p in FOOTPRINT if os.path.lexists(p)]
        assert not left, f"dpkg -P left these behind: {left}"
        assert not _package_installed()


def test_deb_contents_and_metadata(deb: Path) -> None:
    info = _run("dpkg-deb", "--field", str(deb), "Package", "Version", "Depends").stdout
    assert "Package: lazysnap" in info
    assert "python3 (>= 3.11)" in info
    listing = _run("dpkg-deb", "--contents", str(deb)).stdout
    for path in ["./opt/lazysnap/bin/lazysnap", "./lib/systemd/system/lazysnap.service",
                 "./lib/systemd/system/lazysnap-fuse-holder.service",
                 "./etc/lazysnap/config.toml", "./etc/containerd/conf.d/lazysnap.toml",
                 "./usr/share/doc/lazysnap/README.packaging.md"]:
        assert f" {path}\n" in listing or f" {path} " in listing, path
    assert "./usr/bin/lazysnap -> /opt/lazysnap/bin/lazysnap" in listing
    # Nothing of the build machine's staging directory may leak into the package's paths.
    assert "lazysnap-deb." not in listing
    with tempfile.TemporaryDirectory() as d:
        _run("dpkg-deb", "--control", str(deb), d)
        conffiles = Path(d, "conffiles").read_text().split()
    assert conffiles == ["/etc/lazysnap/config.toml", "/etc/containerd/conf.d/lazysnap.toml"]


def test_installed_daemon_serves_a_lazy_container_and_purge_leaves_nothing(
    installed: Path, tmp_path: Path, registry: Registry,
    esgz_data: tuple[EstargzImage, EstargzImage],
) -> None:
    # The installed unit runs the installed command, which runs from its own venv.
    argv, _ = _unit_command(UNIT)
    assert argv[0] == "/usr/bin/lazysnap"
    assert os.path.realpath("/usr/bin/lazysnap") == "/opt/lazysnap/bin/lazysnap"
    assert _run("/usr/bin/lazysnap", "--help").stdout.startswith("usage: lazysnap")

    daemon = InstalledDaemon(tmp_path / "daemon")
    sockdir = Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))
    containerd = Containerd(tmp_path / "containerd", sockdir, {"lazysnap": str(SOCKET)})
    try:
        daemon.start()
        containerd.start()
        stack = Stack("lazysnap", containerd, None, STATE)
        stack.wait_ready()

        image = esgz_data[0]
        ref = image.ref(registry.host)
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        out = stack.run(ref, "deb-smoke", "sha256sum", "/data/big-2.bin")
        assert out.split()[0] == data_sha256("data/big-2.bin")

        # The installed `lazysnap status` reads the installed daemon's state: layers are lazy.
        moment = time.time()
        wait_for(lambda: json.loads((STATE / "status.json").read_text()).get("time", 0) > moment,
                 15, "a fresh status.json")
        status = json.loads(_run("/usr/bin/lazysnap", "status", "--json").stdout)
        rows = layer_rows(status, [str(d["digest"]) for d in image.layers])
        assert rows and all(r["mode"] == "lazy" for r in rows.values()), status
        assert not status.get("fallback_counts"), status
        fetched = sum(r["bytes_fetched"] for r in rows.values())
        assert fetched < 0.6 * image.size(), "the installed daemon downloaded the image in full"
    finally:
        containerd.stop()
        daemon.stop()
        remove_tree(sockdir)
        print(f"----- installed lazysnap log (tail) -----\n{daemon.log_tail()}")
    assert not daemon_log_problems(daemon.log_path)
