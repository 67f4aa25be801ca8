"""`lazysnap hold`: keep the repository's FUSE connection open while the daemon restarts.

Run by `lazysnap-fuse-holder.service`, in a cgroup of its own, so that stopping or killing
`lazysnap.service` never closes the connection (see snapshotter/fs/handoff.py). Without
it, `lazysnap serve` starts a holder itself.
"""

from __future__ import annotations

import argparse

from snapshotter import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hold", help=__doc__.splitlines()[0], description=__doc__)
    config.add_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapshotter.daemon import setup_logging
    from snapshotter.fs.handoff import HOLDER_SOCKET, serve_holder

    cfg = config.load(args)
    setup_logging(cfg.log_level)
    cfg.root.mkdir(parents=True, exist_ok=True)
    return serve_holder(cfg.root / HOLDER_SOCKET)
