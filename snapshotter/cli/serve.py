"""`lazysnap serve`: run the snapshotter daemon for containerd."""

from __future__ import annotations

import argparse

from snapshotter import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=__doc__, description=__doc__)
    config.add_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapshotter import daemon

    cfg = config.load(args)
    daemon.setup_logging(cfg.log_level)
    daemon.run(cfg)
    return 0
