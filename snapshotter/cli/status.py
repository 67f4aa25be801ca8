"""`lazysnap status`: what the daemon serves, layer by layer, and why a layer was not lazy."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from snapshotter.errors import DataLoss, NotFound, PermissionDenied, Unavailable

STATUS_FILE = "status.json"
# The daemon rewrites the file every few seconds; older means it is not running.
STALE_AFTER = 30.0


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # nothing to check against
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help=__doc__, description=__doc__)
    p.add_argument("--root", type=Path, default=Path("/var/lib/lazysnap"),
                   help="the daemon's state directory")
    p.add_argument("--json", action="store_true", help="print the raw status document")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(doc: dict[str, Any]) -> str:
    lines = [f"{'IMAGE':40} {'LAYER':19} {'MODE':24} {'SIZE':>9} {'FETCHED':>9} {'%':>6} "
             f"{'HITS':>6}"]
    for row in doc.get("layers", []):
        if row["mode"] == "path":  # nothing is fetched: the directory is used as it is
            lines.append(
                f"{row['image_ref'][-40:]:40} {row['layer_digest'][:19]:19} {'path':24} "
                f"{'-':>9} {'-':>9} {'-':>6} {'-':>6}  {row['path']}"
            )
            continue
        lines.append(
            f"{row['image_ref'][-40:]:40} {row['layer_digest'][:19]:19} {row['mode'][:24]:24} "
            f"{_size(row['size']):>9} {_size(row['bytes_fetched']):>9} "
            f"{row['percent_fetched']:>6.1f} {row['cache_hits']:>6}"
            + (f"  {row['error']}" if row.get("error") else "")
        )
        if "prefetch" in row:  # how the layer's bytes came: ahead of time or waited for
            lines.append(
                f"    prefetch: {row['prefetch']} ({_size(row['bytes_prefetch'])}); "
                f"background: {row['background']} ({_size(row['bytes_background'])}); "
                f"on demand: {_size(row['bytes_on_demand'])} in "
                f"{row.get('demand_fetches', 0)} requests, {row['demand_waits']} reads waited"
            )
        extra = _profile_and_native(row)
        if extra:
            lines.append(f"    {extra}")
    for fb in doc.get("fallbacks", []):
        lines.append(
            f"{fb['image_ref'][-40:]:40} {fb['layer_digest'][:19]:19} "
            f"{'fallback: ' + fb['reason']:24} {'-':>9} {'-':>9} {'-':>6} {'-':>6}  {fb['detail']}"
        )
    parser = doc.get("toc_parser")
    if parser:
        pid = parser["worker_pid"]
        lines.append(f"toc parser: {f'worker pid {pid}' if pid else 'no worker'}; "
                     f"{parser['parsed_in_worker']} parsed there, "
                     f"{parser['parsed_in_daemon']} in the daemon")
    cache = doc.get("cache")
    if cache:
        lines.append(f"cache: {_size(cache['bytes'])} of {_size(cache['max_bytes'])} in "
                     f"{cache['entries']} chunks; hits {cache['hits']}, misses "
                     f"{cache['misses']}, evictions {cache['evictions']}")
    return "\n".join(lines)


def _profile_and_native(row: dict[str, Any]) -> str:
    """The profile applied to a layer (snapshotter/profiles.py) and its native directory
    (snapshotter/native.py), when there are."""
    parts = []
    profile = row.get("profile")
    if profile:
        parts.append(f"profile: {profile['manifest'][:19]} from {profile['from']}, "
                     f"{profile['chunks']} chunks" + (
                         f" ({_size(profile['bytes'])} prefetched)" if "bytes" in profile
                         else ""))
    if row.get("native"):
        parts.append(f"native: {row['native']}")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    path = args.root / STATUS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{path}: no status (is `lazysnap serve --root {args.root}` running?)") \
            from None
    except PermissionError:
        # The daemon keeps its root 0700.
        raise PermissionDenied(f"{path}: permission denied (run as the daemon's user)") \
            from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataLoss(f"{path}: not a status document ({exc})") from None
    if not isinstance(doc, dict):
        raise DataLoss(f"{path}: not a status document")
    age = time.time() - doc.get("time", 0)
    if age > STALE_AFTER:
        raise Unavailable(f"{path}: status is {age:.0f}s old; the daemon is not running")
    if not _alive(doc.get("pid")):
        # Killed (-9) daemons leave the file behind; don't show their state as current.
        raise Unavailable(f"{path}: written by pid {doc.get('pid')}, which is not running")
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(render(doc))
    return 0
