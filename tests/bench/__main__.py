"""`python -m tests.bench`: the benchmark suite's one command (see tests/bench/README.md)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.bench import cold_start, footprint, read_path
from tests.bench.catalog import Catalog
from tests.bench.context import Context
from tests.bench.convert import make_converter
from tests.bench.link import CONDITIONS
from tests.bench.modes import MODES, remote_mode, unavailable
from tests.bench.results import Results, machine_info
from tests.e2e.harness import remove_tree

PARTS = {
    "cold_start": cold_start.run,
    "read_path": read_path.run,
    "metadata": read_path.run_metadata,
    "memory": footprint.run_memory,
    "sharing": footprint.run_sharing,
    "nonlazy": cold_start.run_nonlazy,
}
TOOLS = ("containerd", "ctr", "runc", "docker-registry", "ctr-remote", "fusermount3", "find")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="tiny synthetic images, one repetition: checks the harness (CI)")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma list of parts (default all): {', '.join(PARTS)}")
    p.add_argument("--out", type=Path, default=Path("bench-results/results.json"),
                   help="JSON summary; .jsonl (every measurement) and .md (table) beside it")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; smoke 1)")
    p.add_argument("--conditions", default=",".join(CONDITIONS),
                   help=f"comma list of network conditions: {', '.join(CONDITIONS)}")
    p.add_argument("--modes", default="overlayfs,lazysnap,lazysnap+prefetch",
                   help="cold-start modes: overlayfs (baseline), lazysnap, lazysnap+prefetch, "
                        "remote (needs --remote-cmd)")
    p.add_argument("--images", default=None,
                   help="cold-start images (default pyslim,pystack,manyfiles; smoke: "
                        "pyslim,manyfiles)")
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/lazysnap-bench"),
                   help="built images (registry storage, layer tars, Debian rootfs trees)")
    p.add_argument("--scratch", type=Path, default=Path("/var/tmp/lazysnap-bench"),
                   help="per-run stacks; on the same disk as the cache (native baseline)")
    p.add_argument("--converter", default="ctr-remote", help="eStargz converter: ctr-remote "
                   "or lazysnap (issue 4)")
    p.add_argument("--convert-cmd", default=None,
                   help="converter command with {src} {dst} placeholders (overrides default)")
    p.add_argument("--remote-cmd", default=None,
                   help="remote mode: proxy-plugin snapshotter command with {address} {root}")
    p.add_argument("--remote-name", default="remote", help="remote mode: snapshotter name")
    p.add_argument("--remote-pull", default="ctr-remote images rpull",
                   help="remote mode: pull command (run with --plain-http --snapshotter NAME REF)")
    return p


def _missing_prereqs() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root (mounts, containerd, drop_caches)")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A `kill` (or a CI timeout) must stop the daemons, containerds and registry the run
    # started and unmount what it mounted, as Ctrl-C does: their context managers do that.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parts = [p for p in args.only.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"unknown part(s) {unknown}; expected {list(PARTS)}", file=sys.stderr)
        return 2
    missing = _missing_prereqs()
    if not args.smoke and shutil.which("debootstrap") is None:
        missing.append("debootstrap (apt-get install debootstrap)")
    if missing:
        print("missing prerequisites: " + ", ".join(missing), file=sys.stderr)
        return 2
    conditions = [CONDITIONS[c] for c in args.conditions.split(",") if c]
    reps = args.reps or (1 if args.smoke else 3)

    def log(text: str) -> None:
        print(time.strftime("%H:%M:%S ") + text, flush=True)

    results = Results(args.out, {
        "mode": "smoke" if args.smoke else "full", "machine": machine_info(), "reps": reps,
        "conditions": {c.name: c.describe() for c in conditions}, "parts": parts,
    })
    modes = []
    for name in args.modes.split(","):
        if name == "remote":
            if not args.remote_cmd:
                print("--modes remote needs --remote-cmd", file=sys.stderr)
                return 2
            modes.append(remote_mode(args.remote_name, args.remote_cmd, args.remote_pull))
            continue
        mode = MODES[name]
        why = unavailable(mode)
        if why:
            results.note(f"mode {name} skipped: {why}")
            continue
        modes.append(mode)
    # Smoke images are mostly random bytes, where level 9 only costs CI time.
    converter = make_converter(args.converter, args.convert_cmd, level=1 if args.smoke else 9)
    failed = []
    with Catalog(args.cache_dir, args.smoke, converter, log) as catalog:
        ctx = Context(catalog, results, args.scratch, reps, conditions, modes, args.smoke, log)
        images = args.images.split(",") if args.images else None
        try:
            for part in parts:
                log(f"== {part}")
                try:
                    if part == "cold_start":
                        cold_start.run(ctx, images)
                    else:
                        PARTS[part](ctx)
                except Exception as exc:  # one broken part must not lose the others' numbers
                    failed.append(part)
                    results.note(f"part {part} failed: {type(exc).__name__}: {exc}"[:2000])
        finally:
            results.write()
            remove_tree(args.scratch)
    print(results.table())
    if args.out:
        print(f"results: {args.out} (+ .jsonl, .md)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
