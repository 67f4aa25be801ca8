"""`lazysnap` command line: subcommand dispatch and the one error -> exit code table."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from snapshotter import errors

__all__ = ["EXIT_CODES", "main"]

log = logging.getLogger("lazysnap")

# sysexits-style, so scripts and systemd can tell bad usage from a broken environment.
EXIT_CODES: dict[type[errors.LazysnapError], int] = {
    errors.InvalidArgument: 64,  # EX_USAGE
    errors.NotFound: 66,  # EX_NOINPUT
    errors.AlreadyExists: 73,  # EX_CANTCREAT
    errors.FailedPrecondition: 70,
    errors.Unavailable: 69,  # EX_UNAVAILABLE
    errors.NotImplementedYet: 70,
    errors.PermissionDenied: 77,  # EX_NOPERM
    errors.DataLoss: 65,  # EX_DATAERR
    errors.ClosedError: 70,
}


def _parser() -> argparse.ArgumentParser:
    from snapshotter.cli import convert, hold, prefetch, profile, serve, status

    parser = argparse.ArgumentParser(prog="lazysnap", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    convert.register(sub)
    status.register(sub)
    prefetch.register(sub)
    profile.register(sub)
    hold.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except errors.LazysnapError as exc:
        cat = errors.category(exc)
        assert cat is not None
        print(f"lazysnap: {exc}", file=sys.stderr)
        return EXIT_CODES[cat]
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
