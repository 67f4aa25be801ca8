"""Memory and sharing: what lazysnap keeps per TOC entry, and what it fetches twice.

Memory: the daemon's peak RSS (VmHWM) idle, then with the 100,000-entry layer mounted and
every entry stat'ed; reported per TOC entry above idle. Its TOC parser process (a child
that parses TOCs off the daemon's GIL) is reported beside it: its peak, and what it holds
once the layer is loaded.
Sharing: (a) `pyslim` then `pystack` on one daemon: the bytes fetched for the second must
not exceed the compressed size of its layers that `pyslim` lacks, and running pyslim's
workload in pystack must fetch nothing for the shared layers (no re-fetch); (b) 8 containers of one
uncached image started at once fetch no more than one container does.
"""

from __future__ import annotations

import subprocess
import threading
import time

from tests.bench.context import Context, children_vm_kib, daemon_status, layer_path, vm_kib
from tests.bench.link import CONDITIONS, ShapedLink
from tests.bench.modes import MODES, drop_caches, open_stack, pull, run_workload
from tests.bench.results import Record

__all__ = ["run_memory", "run_sharing"]

CONCURRENT = 8
_IDLE_SETTLE = 3.0  # seconds: let the daemon finish start-up work before "idle"


def run_memory(ctx: Context) -> None:
    image = ctx.image("entries")
    mode = MODES["lazysnap"]
    entries = sum(layer.entries for layer in image.gzip_layers)
    for rep in range(ctx.reps):
        with open_stack(mode, ctx.workdir(f"mem-{rep}")) as stack, \
                ShapedLink(("127.0.0.1", ctx.catalog.registry.port),
                           CONDITIONS["unshaped"]) as link:
            assert stack.lazysnap is not None and stack.lazysnap.proc is not None
            pid = stack.lazysnap.proc.pid
            time.sleep(_IDLE_SETTLE)
            idle = vm_kib(pid, "VmHWM")
            parser_idle = children_vm_kib(pid, "VmRSS")
            pull(stack, mode, image.ref(link.host, esgz=True))
            root = layer_path(stack, image)
            drop_caches()
            subprocess.run(["find", str(root), "-ls"], stdout=subprocess.DEVNULL, check=True,
                           timeout=1800)
            loaded = vm_kib(pid, "VmHWM")
            rss = vm_kib(pid, "VmRSS")
            parser_peak = children_vm_kib(pid, "VmHWM")
            parser_rss = children_vm_kib(pid, "VmRSS")
        per_entry = (loaded - idle) * 1024 / entries
        case = f"{entries} entries"
        for metric, value, unit in (("idle_VmHWM", idle * 1024, "B"),
                                    ("loaded_VmHWM", loaded * 1024, "B"),
                                    ("loaded_VmRSS", rss * 1024, "B"),
                                    ("bytes_per_entry", per_entry, "B/entry"),
                                    ("parser_idle_VmRSS", parser_idle * 1024, "B"),
                                    ("parser_loaded_VmHWM", parser_peak * 1024, "B"),
                                    ("parser_loaded_VmRSS", parser_rss * 1024, "B")):
            ctx.results.add(Record("memory", case, "lazysnap", metric, value, unit, rep))
        ctx.log(f"memory rep {rep}: idle {idle / 1024:.1f} MiB, with {entries} entries "
                f"{loaded / 1024:.1f} MiB: {per_entry:.0f} B/entry; toc parser idle "
                f"{parser_idle / 1024:.1f} MiB, peak {parser_peak / 1024:.1f} MiB, "
                f"after {parser_rss / 1024:.1f} MiB")


def _start(stack, ref: str, cid: str, cmd, errors: list[str]) -> None:  # type: ignore[no-untyped-def]
    try:
        run_workload(stack, ref, cid, cmd)
    except Exception as exc:
        errors.append(f"{cid}: {exc}")


def _fetched_by_layer(status: dict) -> dict[str, int]:
    return {r["layer_digest"]: r["bytes_fetched"] for r in status.get("layers", [])}


def run_sharing(ctx: Context) -> None:
    mode = MODES["lazysnap"]
    slim, stack_img = ctx.image("pyslim"), ctx.image("pystack")
    slim_layers = {d["digest"] for d in slim.esgz_manifest["layers"]}
    unshared = sum(int(d["size"]) for d in stack_img.esgz_manifest["layers"]
                   if d["digest"] not in slim_layers)
    cond = CONDITIONS["unshaped"]
    port = ctx.catalog.registry.port
    for rep in range(ctx.reps):
        # (a) shared base layers
        with open_stack(mode, ctx.workdir(f"share-{rep}")) as stack, \
                ShapedLink(("127.0.0.1", port), cond) as link:
            ref = slim.ref(link.host, esgz=True)
            pull(stack, mode, ref)
            run_workload(stack, ref, "slim", slim.recipe.cmd)
            before = _fetched_by_layer(daemon_status(stack, time.time()))
            first = link.reset().down
            ref = stack_img.ref(link.host, esgz=True)
            pull(stack, mode, ref)
            # pyslim's own workload through pystack reads only chunks that are cached: any
            # byte fetched for the shared layers now is a re-fetch. (pystack's workload
            # then reads more of the shared layer, which is new, not a re-fetch.)
            run_workload(stack, ref, "stack-slim", slim.recipe.cmd)
            after = _fetched_by_layer(daemon_status(stack, time.time()))
            run_workload(stack, ref, "stack", stack_img.recipe.cmd)
            second = link.counts().down
        refetched = sum(after.get(d, 0) - before[d] for d in before if d in slim_layers)
        case = "pyslim then pystack"
        for variant, metric, value, unit in (
            ("lazysnap", "bytes_second", second, "B"),
            ("unshared part", "bytes_second", unshared, "B"),
            ("lazysnap", "second_over_unshared", second / unshared, "x"),
            ("lazysnap", "refetched_shared_bytes", refetched, "B"),
        ):
            ctx.results.add(Record("sharing", case, variant, metric, value, unit, rep,
                                   extra={"bytes_first": first}))
        ctx.log(f"sharing rep {rep}: pystack after pyslim fetched {second / 1e6:.2f} MB "
                f"(unshared layers {unshared / 1e6:.2f} MB); shared layers re-fetched "
                f"{refetched} B")
        if refetched:
            ctx.results.note(f"sharing rep {rep}: {refetched} bytes of layers shared with "
                             "pyslim were fetched again for pystack")

        # (b) one start vs 8 concurrent starts of an uncached image
        fetched = {}
        for n in (1, CONCURRENT):
            with open_stack(mode, ctx.workdir(f"concurrent-{n}-{rep}")) as stack, \
                    ShapedLink(("127.0.0.1", port), CONDITIONS[ctx.conditions[-1].name]) as link:
                ref = stack_img.ref(link.host, esgz=True)
                pull(stack, mode, ref)
                started = time.time()
                errors: list[str] = []
                threads = [threading.Thread(target=_start, args=(stack, ref, f"c{i}",
                                                                 stack_img.recipe.cmd, errors))
                           for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise RuntimeError("concurrent starts failed: " + "; ".join(errors))
                status = daemon_status(stack, started)
                chunk_bytes = sum(r["bytes_fetched"] for r in status.get("layers", []))
                fetched[n] = link.counts().down
            ctx.results.add(Record("sharing", f"{n} concurrent starts of pystack",
                                   "lazysnap", "bytes", fetched[n], "B", rep,
                                   extra={"daemon_bytes_fetched": chunk_bytes}))
        ratio = fetched[CONCURRENT] / fetched[1]
        ctx.results.add(Record("sharing", f"{CONCURRENT} concurrent vs 1", "lazysnap",
                               "bytes_ratio", ratio, "x", rep))
        ctx.log(f"sharing rep {rep}: 1 start {fetched[1] / 1e6:.2f} MB, {CONCURRENT} concurrent "
                f"{fetched[CONCURRENT] / 1e6:.2f} MB ({ratio:.3f}x)")
