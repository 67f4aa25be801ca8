"""Learned access profiles and native layers end to end: real containerd, runc, Debian's
docker-registry (no referrers API: profiles go through the `sha256-<hex>` tag fallback),
images converted by ctr-remote, bytes counted at a proxy in front of the registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.e2e.conftest import PushedImage, data_sha256
from tests.e2e.daemon_status import layer_rows, status_after
from tests.e2e.estargz import LANDMARKS, EstargzImage
from tests.e2e.harness import REPO_ROOT, Registry, wait_for
from tests.e2e.images import merged_tree
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import Stack, start_stack
from tests.e2e.tree import LISTING_SCRIPT, RUNTIME_PATHS, compare, parse_listing

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]

READ = ("/data/big-1.bin", "/data/big-2.bin")  # 14 MiB of the image's 26 MiB of data
WINDOW = "3"


@pytest.fixture
def proxy(registry: Registry) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", registry.port)) as p:
        yield p


def _lazysnap(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "snapshotter", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, f"lazysnap {' '.join(args)}: {done.stderr}"
    return done.stdout


def _workload(stack: Stack, ref: str, cid: str) -> None:
    out = stack.run(ref, cid, "sha256sum", *READ)
    for path in READ:
        assert f"{data_sha256(path.lstrip('/'))}  {path}" in out


def _daemon_log(stack: Stack) -> str:
    assert stack.lazysnap is not None
    return stack.lazysnap.log_path.read_text(errors="replace")


def _read_all(repo: Path) -> None:
    for top, _, names in os.walk(repo):
        for name in names:
            path = Path(top) / name
            if path.is_file() and not path.is_symlink():
                path.read_bytes()


async def _push_raw(host: str, ref: str, raw: bytes, tmp: Path) -> None:
    from snapshotter.convert.stores import plain_http_hosts
    from snapshotter.registry.client import RegistryClient
    from snapshotter.registry.reference import Reference
    from snapshotter.remote.profile_oci import push_profile

    client = RegistryClient(hosts_dir=plain_http_hosts(tmp, [host]),
                            docker_config=tmp / "none.json")
    try:
        await push_profile(client, Reference.parse(ref), raw)
    finally:
        await client.aclose()


@pytest.mark.allow_log_errors  # the tampered profile is refused with a WARNING
def test_a_learned_profile_travels_through_the_registry_and_warms_a_fresh_node(
    tmp_path: Path, esgz_data: tuple[EstargzImage, EstargzImage], proxy: TcpProxy
) -> None:
    image, other = esgz_data
    ref, other_ref = image.ref(proxy.host), other.ref(proxy.host)
    data_layer = str(image.layers[-1]["digest"])
    # No background fetch: what arrives early must be the profile's doing.
    args = ["--profile-window", WINDOW, "--no-background-fetch"]

    # Node one: no profile anywhere; the first run is learned.
    with start_stack(tmp_path / "one", lazysnap_args=args) as one:
        assert one.lazysnap is not None
        one.pull(ref, tool="ctr-remote", verb="rpull")
        proxy.reset()
        _workload(one, ref, "learn")
        baseline = proxy.counts().down
        profiles = one.lazysnap.root / "profiles"
        wait_for(lambda: profiles.is_dir() and any(profiles.iterdir()), 20, "a learned profile")
        root = str(one.lazysnap.root)
        raw = _lazysnap("profile", "export", ref, "--root", root, "--plain-http")
        learned = json.loads(raw)["profile"]
        files = {a[1] for a in learned["accesses"]}
        assert {p.lstrip("/") for p in READ} <= files
        assert "data/big-0.bin" not in files
        pushed = _lazysnap("profile", "push", ref, "--root", root, "--plain-http")
        print(pushed.strip())
        assert "sha256-<hex> tag" in pushed  # docker-registry 2.8 has no referrers API

    # A tampered profile for the other image: same bytes, another manifest named inside.
    doc = json.loads(raw)
    doc["profile"]["manifest"] = "sha256:" + "0" * 64
    trio.run(_push_raw, proxy.host, other_ref, json.dumps(doc).encode(), tmp_path)

    # Node two: fresh root and cache; finds the pushed profile and prefetches it on pull.
    with start_stack(tmp_path / "two", lazysnap_args=args) as two:
        assert two.lazysnap is not None
        two.pull(ref, tool="ctr-remote", verb="rpull")

        def prefetched() -> bool:
            row = layer_rows(status_after(two.lazysnap.root, time.time()), [data_layer])
            return "complete" in row.get(data_layer, {}).get("profile", {})

        wait_for(prefetched, 30, "the profile's prefetch")
        row = layer_rows(status_after(two.lazysnap.root, time.time()), [data_layer])[data_layer]
        assert row["profile"]["from"] == "registry" and row["profile"]["complete"]
        assert row["profile"]["bytes"] > 0.9 * baseline  # fetched ahead, in few requests
        proxy.reset()
        _workload(two, ref, "warm")
        during = proxy.counts().down
        print(f"bytes fetched during the workload: {baseline:,} without a profile, "
              f"{during:,} with it")
        assert during < 0.05 * baseline

        # The other image's profile is refused; its container starts all the same.
        two.pull(other_ref, tool="ctr-remote", verb="rpull")
        assert two.run(other_ref, "other") == "ready\n"
        wait_for(lambda: "registry profile rejected" in _daemon_log(two), 20, "a refusal")
        assert "digest mismatch" in _daemon_log(two)


def test_a_fully_fetched_layer_goes_native_for_new_containers(
    tmp_path: Path, sample: PushedImage, esgz_sample: EstargzImage, proxy: TcpProxy
) -> None:
    ref = esgz_sample.ref(proxy.host)
    digests = [str(layer["digest"]) for layer in esgz_sample.layers]
    with start_stack(tmp_path, lazysnap_args=["--native-layers", "--no-profile-record"]) as st:
        assert st.lazysnap is not None
        root = st.lazysnap.root
        st.pull(ref, tool="ctr-remote", verb="rpull")
        # Read every file of every layer once (through the repository mount, since whited
        # out files are not visible in a container): all chunks are then in the cache.
        _read_all(root / "repo")

        def native() -> bool:
            rows = layer_rows(status_after(root, time.time()), digests)
            return len(rows) == len(digests) and all(r.get("native") for r in rows.values())

        wait_for(native, 60, "native layers")
        st.run(ref, "native", "sleep", "60", rm=False, detach=True)
        try:
            lowers = st.mounts("native")["lowerdir"].split(":")
            assert all(d.startswith(str(root / "native")) for d in lowers), lowers
        finally:
            st.ctr("tasks", "rm", "-f", "native")
            st.ctr("containers", "rm", "native")
        seen = parse_listing(st.run(ref, "listing", "sh", "-c", LISTING_SCRIPT))
        assert compare(merged_tree(sample.image), seen, ignore=RUNTIME_PATHS | LANDMARKS) == []
