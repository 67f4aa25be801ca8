"""The quickstart demo's body (run it through examples/quickstart.sh, which installs first).

Starts a scratch registry, lazysnap and containerd on loopback inside one temporary directory,
pushes a two-layer image built from files, and runs containers through lazysnap, printing each
`ctr` command it runs. Everything is torn down at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.harness import Registry, remove_tree
from tests.e2e.images import push_image, sample_image
from tests.e2e.stack import Stack, start_stack


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
        image = sample_image()
        ref = f"{registry.host}/demo/sample:v1"
        say(f"registry on {registry.url}; pushing a two-layer image built from files")
        push_image(registry.url, "demo/sample", "v1", image)
        for i, blob in enumerate(image.blobs()[1], 1):
            print(f"    layer {i}: {blob.digest[:19]}…  {len(blob.data):>9,} bytes gzip")
        with start_stack(work / "stack", show_logs=False) as stack:
            stack.containerd.namespace = "lazysnap-demo"
            demo(stack, ref)
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
