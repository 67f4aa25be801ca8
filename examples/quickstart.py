"""The quickstart demo's body (run it through examples/quickstart.sh, which installs first).

Starts a scratch registry, lazysnap and containerd on loopback inside one temporary directory,
pushes a three-layer image built from files, and runs containers through lazysnap, printing each
`ctr` command it runs. Then it converts a larger image to eStargz and shows a lazy start: the
time to the container's first output and the bytes fetched, against the image's size and a
plain pull. Everything is torn down at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.estargz import convert_and_push
from tests.e2e.harness import Registry, remove_tree
from tests.e2e.images import data_image, push_image, sample_image
from tests.e2e.proxy import TcpProxy
from tests.e2e.stack import Stack, start_stack

MiB = 1024 * 1024
BANDWIDTH = 20 * MiB


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show_ctr(argv: list[str]) -> None:
    print("$ " + shlex.join(argv), flush=True)


def indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.rstrip("\n").splitlines())


def demo(stack: Stack, ref: str) -> None:
    containerd = stack.containerd
    assert stack.lazysnap is not None
    say("containerd talks to lazysnap as a proxy snapshotter; the part of its config that matters:")
    config = (containerd.workdir / "config.toml").read_text()
    print(indent(config[config.index("[proxy_plugins") :]), end="")
    print(f"(`ctr` below means `ctr --address {containerd.address} -n {containerd.namespace}`)")
    containerd.trace = show_ctr

    say("pull the image, unpacking its layers into lazysnap snapshots")
    started = time.monotonic()
    stack.pull(ref)
    print(f"pulled and unpacked in {time.monotonic() - started:.2f}s")
    print(indent(stack.snap("ls")), end="")

    say("run a container from it")
    started = time.monotonic()
    out = stack.run(ref, "demo-hello")
    print(indent(out) + f"container ran in {time.monotonic() - started:.2f}s")

    say("both layers are merged, whiteouts applied (/etc/removed.txt is gone)")
    print(indent(stack.run(ref, "demo-ls", "ls", "-l", "/data", "/etc")), end="")

    say("a container's writes land in its own upper dir under lazysnap's root")
    stack.run(
        ref, "demo-write", "sh", "-c", "echo written in the container > /data/new.txt", rm=False
    )
    upper = Path(stack.mounts("demo-write")["upperdir"])
    print(f"upperdir: {upper}")
    print(indent(f"{upper / 'data/new.txt'}: {(upper / 'data/new.txt').read_text()}"), end="")
    stack.ctr("containers", "rm", "demo-write")

    say("lazysnap survives a restart with all its state")
    stack.lazysnap.restart()
    stack.wait_ready()
    print(indent(stack.run(ref, "demo-again")), end="")

    say("removing the image lets containerd's garbage collector remove the snapshots")
    stack.remove_image_and_gc(ref)
    left = stack.snap("ls").splitlines()[1:]
    print(f"snapshots left: {len(left)}; snapshot dirs left: {len(stack.snapshot_dirs())}")
    containerd.trace = None


LAZY_FILES = {"data/model-0.bin": 24 * MiB, "data/model-1.bin": 16 * MiB, "data/table.bin": 8 * MiB}


def lazy_demo(work: Path, stack: Stack, registry: Registry) -> None:
    say("lazy pulling: an eStargz image whose container needs only a small part of it")
    image = data_image(LAZY_FILES)
    push_image(registry.url, "demo/app", "v1", image)
    print("converting it with stargz-snapshotter's ctr-remote (an independent eStargz producer)")
    esgz = convert_and_push(work / "convert", registry, "demo/app", "v1", "esgz")
    print(f"    eStargz image: {esgz.size():,} bytes in {len(esgz.layers)} layers")

    containerd = stack.containerd
    # Loopback is far faster than any real registry link; a bandwidth cap makes times telling.
    with TcpProxy(("127.0.0.1", registry.port), bandwidth=BANDWIDTH) as proxy:
        print(
            f"a byte-counting proxy at {proxy.host} sits in front of the registry, "
            f"limited to {BANDWIDTH // MiB} MiB/s like a real network link"
        )
        ref = esgz.ref(proxy.host)
        containerd.trace = show_ctr
        started = time.monotonic()
        stack.pull(ref, tool="ctr-remote", verb="rpull")
        pulled = time.monotonic() - started
        after_pull = proxy.counts().down
        out = stack.run(ref, "demo-lazy")
        first_output = time.monotonic() - started
        at_output = proxy.counts().down
        print(indent(out), end="")
        size = esgz.size()
        say("lazy start")
        print(f"    rpull:         {pulled:5.2f}s, {after_pull:>12,} bytes fetched")
        print(
            f"    first output:  {first_output:5.2f}s, {at_output:>12,} bytes fetched "
            f"= {100 * at_output / size:.1f}% of the image's {size:,} bytes"
        )
        stack.run(ref, "demo-read", "sha256sum", "/data/table.bin")
        print(
            f"    after reading /data/table.bin ({LAZY_FILES['data/table.bin']:,} bytes): "
            f"{proxy.counts().down:,} bytes fetched in all"
        )
        containerd.trace = None

        proxy.reset()
        full_ref = f"{proxy.host}/demo/app:v1"
        started = time.monotonic()
        stack.pull(full_ref)
        stack.run(full_ref, "demo-full")
        print(
            f"    for comparison, a plain pull + run of the same files: "
            f"{time.monotonic() - started:.2f}s, {proxy.counts().down:,} bytes fetched"
        )
    status = subprocess.run(
        [sys.executable, "-m", "snapshotter", "status", "--root", str(stack.snapshot_root)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    say("what lazysnap says about its layers (`lazysnap status`)")
    print(indent(status.stdout or status.stderr), end="")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    # Turn SIGTERM into an exception so the cleanup below runs as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="lazysnap-demo."))
    say(f"scratch directory {work}")
    registry = None
    try:
        registry = Registry(work / "registry").start()
        image = sample_image(third_layer=True)
        ref = f"{registry.host}/demo/sample:v1"
        say(f"registry on {registry.url}; pushing a three-layer image built from files")
        push_image(registry.url, "demo/sample", "v1", image)
        for i, blob in enumerate(image.blobs()[1], 1):
            print(f"    layer {i}: {blob.digest[:19]}…  {len(blob.data):>9,} bytes gzip")
        with start_stack(work / "stack", show_logs=False) as stack:
            stack.containerd.namespace = "lazysnap-demo"
            demo(stack, ref)
            lazy_demo(work, stack, registry)
        say("done; everything stopped and unmounted")
        return 0
    finally:
        if registry is not None:
            registry.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            remove_tree(work)


if __name__ == "__main__":
    sys.exit(main())
