"""`lazysnap convert SRC DST`: make an eStargz (lazily pullable) copy of an image.

SRC and DST are registry references (auth and hosts.toml as the daemon uses them) or
OCI layouts written `oci:DIR[:tag]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from snapshotter import config
from snapshotter.errors import InvalidArgument, NotFound


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("src", metavar="SRC", help="image to convert: REF or oci:DIR[:tag]")
    p.add_argument("dst", metavar="DST", help="where to store the result: REF or oci:DIR[:tag]")
    p.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VARIANT]",
                   help="convert only these platforms of an index (repeat or comma-separate); "
                        "default: all")
    p.add_argument("--chunk-size", default="4MiB",
                   help="split file payloads into verified chunks of this size (default 4MiB)")
    p.add_argument("--prioritize", type=Path, metavar="FILE",
                   help="paths (one per line, or a JSON list) to put first in each layer, "
                        "followed by .prefetch.landmark")
    p.add_argument("--jobs", "-j", type=int, default=min(4, os.cpu_count() or 1),
                   help="layers converted at once")
    p.add_argument("--compression-level", type=int, default=9, choices=range(1, 10),
                   metavar="1-9", help="gzip level (default 9)")
    p.add_argument("--oci", action="store_true",
                   help="write OCI media types even for a Docker source")
    p.add_argument("--tmp-dir", type=Path, help="where temporary layer files go")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.add_argument("--config", type=Path, default=None,
                   help=f"daemon config for registry settings (default {config.DEFAULT_CONFIG_PATH}"
                        ", if present)")
    p.add_argument("--hosts-dir", dest="hosts_dir", default=None,
                   help="containerd-style hosts.toml directory")
    p.add_argument("--docker-config", dest="docker_config", default=None,
                   help="docker config.json for registry credentials")
    p.add_argument("--plain-http", action="store_true",
                   help="talk plain HTTP to the SRC and DST registries (instead of their "
                        "hosts.toml; loopback registries fall back to HTTP anyway)")
    p.set_defaults(func=run)


def _prioritized(path: Path | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFound(f"prioritize list {str(path)!r}: not found") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"prioritize list {str(path)!r}: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(f"prioritize list {str(path)!r}: not a list of paths")
        return tuple(names)
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def run(args: argparse.Namespace) -> int:
    import trio

    from snapshotter.convert import (
        ConvertOptions,
        LineProgress,
        NullProgress,
        RichProgress,
        convert_image,
    )
    from snapshotter.convert.progress import human_size
    from snapshotter.convert.stores import plain_http_hosts, registry_hosts
    from snapshotter.registry.client import RegistryClient
    from snapshotter.registry.manifest import Platform

    cfg = config.load(args)
    platforms = tuple(
        Platform.parse(p) for arg in args.platform for p in arg.split(",") if p.strip()
    )
    options = ConvertOptions(
        chunk_size=config.parse_size(args.chunk_size, "--chunk-size"),
        prioritized=_prioritized(args.prioritize),
        platforms=platforms,
        jobs=args.jobs,
        compression_level=args.compression_level,
        oci=args.oci,
        tmp_dir=args.tmp_dir,
    )
    if args.quiet:
        progress = NullProgress()
    elif sys.stderr.isatty():
        progress = RichProgress(sys.stderr)
    else:
        progress = LineProgress(sys.stderr)

    async def main(hosts_dir: Path):  # type: ignore[no-untyped-def]
        client = RegistryClient(
            hosts_dir=hosts_dir,
            docker_config=Path(cfg.docker_config) if cfg.docker_config else None,
            timeout=cfg.fetch_timeout,
        )
        try:
            return await convert_image(
                args.src, args.dst, client=client, options=options, progress=progress
            )
        finally:
            await client.aclose()

    with tempfile.TemporaryDirectory(prefix="lazysnap-hosts-") as tmp:
        hosts_dir = cfg.hosts_dir
        if args.plain_http:
            hosts_dir = plain_http_hosts(Path(tmp), registry_hosts(args.src, args.dst))
        s = trio.run(main, hosts_dir)
    if not args.quiet:
        change = (s.size_after - s.size_before) / s.size_before * 100 if s.size_before else 0.0
        print(f"converted {s.source} -> {s.destination}")
        print(f"  digest:    {s.digest} ({s.media_type})")
        if s.platforms:
            print(f"  platforms: {', '.join(s.platforms)}")
        print(f"  layers:    {s.layers}, {human_size(s.size_before)} -> "
              f"{human_size(s.size_after)} ({change:+.1f}%)")
        print(f"  blobs:     {s.uploaded} uploaded, {s.present} already present")
        print(f"  time:      {s.seconds:.1f}s")
    return 0
