"""`lazysnap prefetch IMAGE…`: warm this node's chunk cache for images before they run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from snapshotter import config
from snapshotter.cache.chunks import CacheInUse
from snapshotter.cli.status import _size
from snapshotter.control import CONTROL_SOCKET, NoDaemon, prefetch_locally, request
from snapshotter.errors import FailedPrecondition


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prefetch", help=__doc__, description=__doc__ + (
        " Asks the running daemon (over <root>/control.sock) so that the fetch shares its "
        "cache and quota; with no daemon running, fills the cache directly. Chunks already "
        "cached are not fetched again."))
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image reference")
    p.add_argument("--all", action="store_true",
                   help="every chunk of every layer, not only what starts containers")
    p.add_argument("--config", type=Path, default=None,
                   help=f"the daemon's TOML config (default {config.DEFAULT_CONFIG_PATH})")
    p.add_argument("--root", default=None, help="the daemon's state directory")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=run)


class _Plain:
    """Progress as lines, for logs and pipes."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.layers: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "layer":
            self.layers[event["layer"]] = event
        elif kind == "skip" and not self.quiet:
            print(f"{event['image']} {event['layer'][:19]}: skipped ({event['reason']})")
        elif kind == "layer-done" and not self.quiet:
            layer = self.layers.get(event["layer"], {})
            print(f"{layer.get('image', '?')} {event['layer'][:19]}: {layer.get('reason', '')}, "
                  f"{_size(event['fetched'])} fetched"
                  + (f", {event['failed']} chunks failed" if event["failed"] else ""))


class _Bars:
    """A progress bar per layer, on a terminal."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(), transient=False)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "layer":
            name = f"{event['image'][-30:]} {event['layer'][7:19]} ({event['reason']})"
            self.tasks[event["layer"]] = self.progress.add_task(
                name, total=event["total"], completed=event["cached"])
        elif kind == "progress" and event["layer"] in self.tasks:
            self.progress.update(self.tasks[event["layer"]], completed=event["done"])
        elif kind == "layer-done" and event["layer"] in self.tasks:
            task = self.tasks[event["layer"]]
            total = self.progress.tasks[task].total
            if not event["failed"]:
                self.progress.update(task, completed=total)
        elif kind == "skip":
            self.progress.console.print(
                f"{event['image']} {event['layer'][:19]}: skipped ({event['reason']})")


def run(args: argparse.Namespace) -> int:
    cfg = config.load(argparse.Namespace(config=args.config, root=args.root))
    show = _Bars() if sys.stdout.isatty() and not args.quiet else _Plain(args.quiet)
    req = {"op": "prefetch", "images": args.images, "all": args.all}
    with show:
        try:
            summary = request(cfg.root / CONTROL_SOCKET, req, show)
        except NoDaemon:
            try:
                summary = prefetch_locally(cfg, args.images, args.all, show)
            except CacheInUse:
                raise FailedPrecondition(
                    f"{cfg.root}: a daemon holds the cache but does not answer on "
                    f"{cfg.root / CONTROL_SOCKET}") from None
    print(f"prefetched {summary['layers']} layers of {summary['images']} images in "
          f"{summary['seconds']:.1f}s: {_size(summary['bytes_fetched'])} fetched, "
          f"{_size(summary['bytes_cached'])} already cached"
          + (f", {_size(summary['bytes_over_quota'])} left out (cache quota)"
             if summary["bytes_over_quota"] else "")
          + (f", {summary['skipped']} layers skipped" if summary["skipped"] else "")
          + (f", {summary['failed_chunks']} chunks failed" if summary["failed_chunks"] else ""))
    return 1 if summary["failed_chunks"] else 0
