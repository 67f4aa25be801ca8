"""`lazysnap profile export|import|push|list`: move learned access profiles between nodes.

Profiles live in `<root>/profiles`, one per image manifest digest; the daemon reads them
there when it attaches an image's layers, so these commands work whether it runs or not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from snapshotter import config
from snapshotter.errors import NotFound


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help=__doc__.splitlines()[0], description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    def common(q: argparse.ArgumentParser, registry: bool) -> None:
        q.add_argument("--root", type=Path, default=None, help="the daemon's state directory")
        q.add_argument("--config", type=Path, default=None,
                       help=f"the daemon's TOML config (default {config.DEFAULT_CONFIG_PATH})")
        if registry:
            q.add_argument("--plain-http", action="store_true",
                           help="talk plain HTTP to the image's registry")

    q = verbs.add_parser("export", help="print the profile of IMAGE (a reference or "
                         "sha256:<manifest digest>) to stdout")
    q.add_argument("image", metavar="IMAGE")
    common(q, True)
    q = verbs.add_parser("import", help="check a profile file and store it for its image")
    q.add_argument("file", type=Path, metavar="FILE")
    common(q, False)
    q = verbs.add_parser("push", help="store IMAGE's profile in its registry, as an OCI "
                         "artifact referring to the image manifest")
    q.add_argument("image", metavar="IMAGE")
    q.add_argument("--file", type=Path, default=None,
                   help="push this profile file instead of the stored one")
    common(q, True)
    q = verbs.add_parser("list", help="the manifest digests that have a stored profile")
    common(q, False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from snapshotter.profiles import PROFILES_DIR, ProfileStore
    from snapshotter.remote.profile import decode_profile

    cfg = config.load(argparse.Namespace(config=args.config))
    root = args.root or cfg.root
    store = ProfileStore(Path(root) / PROFILES_DIR)
    if args.verb == "list":
        for manifest in store.manifests():
            print(manifest)
        return 0
    if args.verb == "import":
        try:
            raw = args.file.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"profile file {args.file}: not found") from None
        profile = store.save_raw(raw, what=f"profile file {args.file}")
        print(f"imported profile for manifest {profile.manifest}: "
              f"{len(profile.accesses)} chunks of {len(profile.files())} files")
        return 0
    manifest = _registry(args, cfg, _manifest_of, args.image)
    if args.verb == "export":
        raw = store.raw(manifest)
        if raw is None:
            raise NotFound(f"image {args.image}: no profile for manifest {manifest} in "
                           f"{store.directory}")
        decode_profile(raw, manifest=manifest, what=f"stored profile of {args.image}")
        sys.stdout.buffer.write(raw)
        return 0
    raw = args.file.read_bytes() if args.file else store.raw(manifest)
    if raw is None:
        raise NotFound(f"image {args.image}: no profile for manifest {manifest}")
    decode_profile(raw, manifest=manifest, what=f"profile of {args.image}")
    digest, how = _registry(args, cfg, _push, args.image, raw)
    found = "the referrers API" if how == "referrers" else "its sha256-<hex> tag index"
    print(f"pushed profile of {args.image} as {digest} (found through {found})")
    return 0


def _registry(args: argparse.Namespace, cfg: config.Config, fn, *fn_args):  # type: ignore[no-untyped-def]
    """Run `fn(client, *fn_args)` under trio with a registry client set up like convert's."""
    import trio

    from snapshotter.convert.stores import plain_http_hosts, registry_hosts
    from snapshotter.registry.client import RegistryClient

    async def main(hosts_dir: Path):  # type: ignore[no-untyped-def]
        client = RegistryClient(
            hosts_dir=hosts_dir,
            docker_config=Path(cfg.docker_config) if cfg.docker_config else None,
            timeout=cfg.fetch_timeout,
        )
        try:
            return await fn(client, *fn_args)
        finally:
            await client.aclose()

    with tempfile.TemporaryDirectory(prefix="lazysnap-hosts-") as tmp:
        hosts_dir = cfg.hosts_dir
        if getattr(args, "plain_http", False) and not args.image.startswith("sha256:"):
            hosts_dir = plain_http_hosts(Path(tmp), registry_hosts(args.image))
        return trio.run(main, hosts_dir)


async def _manifest_of(client, image: str) -> str:  # type: ignore[no-untyped-def]
    """IMAGE's manifest digest: given as is, or resolved in the registry (for this
    platform, as the daemon does for a pull that sends no manifest digest)."""
    from snapshotter.digest import Digest
    from snapshotter.registry.reference import Reference

    if image.startswith("sha256:"):
        return str(Digest.parse(image))
    return str((await client.get_manifest(Reference.parse(image))).digest)


async def _push(client, image: str, raw: bytes):  # type: ignore[no-untyped-def]
    from snapshotter.registry.reference import Reference
    from snapshotter.remote.profile_oci import push_profile

    return await push_profile(client, Reference.parse(image), raw)
