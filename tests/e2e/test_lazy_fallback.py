"""When a layer cannot be served lazily, lazysnap falls back to a full download, says why in
`lazysnap status`, and the container still runs; `--require-lazy` turns that into an error.
And a registry that is down while the daemon restarts must not cost the lazy layers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import PushedImage, data_sha256
from tests.e2e.estargz import EstargzImage, copy_image
from tests.e2e.harness import ContainerdError, Registry, wait_for
from tests.e2e.images import merged_tree
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import Stack, start_stack
from tests.e2e.tree import LISTING_SCRIPT, compare, parse_listing
from tests.registry.fixtures import run_registry

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]


def _status(stack: Stack) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snapshotter",
            "status",
            "--json",
            "--root",
            str(stack.snapshot_root),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _fallback_reasons(stack: Stack, count: int) -> dict[str, str]:
    """layer digest -> reason, once the daemon's status file lists `count` fallbacks."""
    found: dict[str, str] = {}

    def listed() -> bool:
        found.clear()
        found.update({f["layer_digest"]: f["reason"] for f in _status(stack)["fallbacks"]})
        return len(found) >= count

    wait_for(listed, 20, f"{count} fallbacks in lazysnap status", interval=0.5)
    return found


@pytest.fixture
def proxy(registry: Registry) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", registry.port)) as p:
        yield p


@pytest.mark.allow_log_errors
def test_a_plain_gzip_image_falls_back_and_status_says_why(
    stack: Stack, sample: PushedImage
) -> None:
    stack.pull(sample.ref, tool="ctr-remote", verb="rpull")

    seen = parse_listing(stack.run(sample.ref, "listing", "sh", "-c", LISTING_SCRIPT))

    assert compare(merged_tree(sample.image), seen) == []
    reasons = _fallback_reasons(stack, len(sample.image.layers))
    assert set(reasons.values()) <= {"no-toc-digest", "not-estargz"}, reasons
    assert not [row for row in _status(stack)["layers"] if row["mode"].startswith("lazy")]


@pytest.mark.allow_log_errors
def test_require_lazy_makes_a_fallback_an_error(tmp_path: Path, sample: PushedImage) -> None:
    with start_stack(tmp_path, lazysnap_args=["--require-lazy"]) as stack:
        with pytest.raises(ContainerdError):
            stack.pull(sample.ref, tool="ctr-remote", verb="rpull")
        assert [s for s in stack.snapshots() if s.kind == "Committed"] == []


@pytest.mark.allow_log_errors
def test_missing_credentials_fall_back_as_unauthorized(
    tmp_path: Path, registry: Registry, esgz_data: tuple[EstargzImage, EstargzImage]
) -> None:
    image = esgz_data[0]
    with run_registry(tmp_path / "secure", auth="htpasswd") as secure:
        user = f"{secure.username}:{secure.password}"
        copy_image(tmp_path / "copy", image.ref(registry.host), image.ref(secure.host), user)
        # containerd has the credentials (--user); lazysnap has none.
        with start_stack(tmp_path / "stack") as stack:
            ref = image.ref(secure.host)
            stack.pull(ref, "--user", user, tool="ctr-remote", verb="rpull")

            out = stack.run(ref, "fallback", "sha256sum", "/data/big-2.bin")

            assert out.split()[0] == data_sha256("data/big-2.bin")
            reasons = _fallback_reasons(stack, len(image.layers))
            assert set(reasons.values()) == {"unauthorized"}, reasons


@pytest.mark.allow_log_errors
def test_registry_down_at_daemon_start_keeps_lazy_layers(
    stack: Stack, esgz_data: tuple[EstargzImage, EstargzImage], proxy: TcpProxy
) -> None:
    """Restored from stored TOCs without the registry; cached chunks serve while it is down."""
    assert stack.lazysnap is not None
    ref = esgz_data[0].ref(proxy.host)
    stack.pull(ref, tool="ctr-remote", verb="rpull")
    assert stack.run(ref, "before") == "ready\n"

    stack.lazysnap.stop()
    proxy.set_mode("refuse")
    stack.lazysnap.start()
    stack.wait_ready()

    assert stack.run(ref, "from-cache") == "ready\n"
    assert all(row["mode"] == "lazy" for row in _status(stack)["layers"])
    proxy.set_mode("forward")
    out = stack.run(ref, "after", "sha256sum", "/data/big-1.bin")
    assert out.split()[0] == data_sha256("data/big-1.bin")
