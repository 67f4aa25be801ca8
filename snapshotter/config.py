"""Daemon configuration: one frozen dataclass, loaded from TOML, overridable by flags.

Every key is also a command-line flag (`cache_size` -> `--cache-size`), so the TOML
file and the flags cannot drift apart: both are generated from `Config`'s fields.
Precedence: defaults < config file < flags. Unknown keys are an error naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.errors import InvalidArgument, NotFound

__all__ = ["DEFAULT_CONFIG_PATH", "Config", "ConfigError", "add_flags", "load", "parse_size"]

DEFAULT_CONFIG_PATH = Path("/etc/lazysnap/config.toml")


class ConfigError(InvalidArgument):
    pass


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    root: Path = _opt(Path("/var/lib/lazysnap"), "state directory (metadata, snapshots, cache)")
    address: Path = _opt(Path("/run/lazysnap/lazysnap.sock"), "gRPC unix socket for containerd")
    socket_mode: str = _opt("0660", "permission bits of the socket (octal)")
    log_level: str = _opt("info", "debug, info, warning or error")
    lazy: bool = _opt(True, "serve eStargz layers lazily; false makes every snapshot ordinary")
    require_lazy: bool = _opt(
        False, "fail a layer Prepare instead of falling back to a full download"
    )
    hosts_dir: Path = _opt(
        Path("/etc/containerd/certs.d"), "containerd-style hosts.toml directory"
    )
    docker_config: str = _opt("", "docker config.json for registry credentials")
    cache_size: str = _opt("10GiB", "bound of the shared chunk cache (bytes, or 512MiB, 10GiB)")
    max_toc_size: str = _opt("64MiB", "largest uncompressed TOC accepted")
    max_toc_entries: int = _opt(1_000_000, "most entries accepted in one TOC")
    toc_store_size: str = _opt(
        "1GiB", "bound of the TOCs kept on disk for restarts; those of layers no snapshot "
        "uses are removed beyond it, oldest first"
    )
    read_timeout: float = _opt(30.0, "seconds before a FUSE read that cannot be served fails")
    fetch_timeout: float = _opt(30.0, "seconds for one registry request")
    allow_no_verification: bool = _opt(
        False, "serve layers whose TOC digest is unknown (unsafe)"
    )
    repository_roots: list[str] = _opt(
        [], "existing layer trees, laid out <hex[0:2]>/<hex>/layerfs (e.g. CernVM-FS)"
    )
    metrics_address: str = _opt("", "host:port for Prometheus metrics; empty disables")
    cri_proxy_address: str = _opt(
        "", "unix socket for the CRI image-service proxy (kubelet --image-service-endpoint); "
        "empty disables"
    )
    containerd_address: str = _opt(
        "/run/containerd/containerd.sock", "containerd's socket, where the CRI proxy forwards"
    )
    credentials_ttl: float = _opt(
        86400.0, "seconds that pull credentials seen by the CRI proxy are kept; 0 = until removed"
    )
    prefetch: bool = _opt(
        True, "prefetch each lazy layer's startup files when it is attached (landmark, "
        "stargz.prefetch label or prefetch_size)"
    )
    prefetch_size: str = _opt(
        "0", "bytes prefetched from a layer's start when it has neither a landmark nor the "
        "stargz.prefetch label; 0 = none"
    )
    prefetch_wait: float = _opt(
        10.0, "seconds a container start waits for its layers' prefetch before going ahead"
    )
    prefetch_parallel: int = _opt(4, "range requests in flight for one layer's prefetch")
    background_fetch: bool = _opt(
        True, "fetch the rest of each lazy layer in the background once readers are quiet"
    )
    background_quiet: float = _opt(
        30.0, "seconds without waiting readers before background fetching starts or resumes"
    )
    background_rate: str = _opt("20MiB", "bytes per second for all background fetching; 0 = no cap")
    background_concurrency: int = _opt(2, "layers fetched in the background at once")
    readahead_size: str = _opt("4MiB", "read ahead this much of a file read sequentially; 0 = off")
    fetch_window: str = _opt(
        "256KiB", "an on-demand fetch also takes the following uncached chunks of the layer, "
        "up to this many bytes in all; 0 = only what was asked"
    )
    max_connections_per_host: int = _opt(16, "range requests in flight to one registry host")
    listing_entries: int = _opt(
        32768, "directory entries whose readdir answers are kept in memory (~270 B each), so "
        "that a tree walked again costs no rebuilding; 0 = none"
    )
    profile_record: bool = _opt(
        True, "learn which chunks an image's containers read in their first profile_window "
        "seconds, when the image has no profile yet"
    )
    profile_window: float = _opt(10.0, "seconds of reads recorded from an image's first read")
    profile_apply: bool = _opt(
        True, "prefetch the chunks an image's profile lists, in first-access order, on attach"
    )
    profile_lookup: bool = _opt(
        True, "look for a profile in the registry (referrers API or sha256-<hex> tag) when "
        "none is stored locally"
    )
    native_layers: bool = _opt(
        False, "materialise layers whose chunks are all cached as plain directories for new "
        "containers (counted in cache_size)"
    )

    @property
    def cache_bytes(self) -> int:
        return parse_size(self.cache_size, "cache_size")

    @property
    def max_toc_bytes(self) -> int:
        return parse_size(self.max_toc_size, "max_toc_size")

    @property
    def toc_store_bytes(self) -> int:
        return parse_size(self.toc_store_size, "toc_store_size")

    @property
    def prefetch_bytes(self) -> int:
        return parse_size(self.prefetch_size, "prefetch_size")

    @property
    def background_bytes_per_second(self) -> int:
        return parse_size(self.background_rate, "background_rate")

    @property
    def readahead_bytes(self) -> int:
        return parse_size(self.readahead_size, "readahead_size")

    @property
    def fetch_window_bytes(self) -> int:
        return parse_size(self.fetch_window, "fetch_window")


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str | int, what: str = "size") -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", text.lower())
    if m is None:
        raise ConfigError(f"{what}: {text!r} is not a size (e.g. 512MiB, 10GiB)")
    return int(m.group(1)) * _UNITS[m.group(2) or ""]


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _coerce(name: str, tp: Any, value: Any) -> Any:
    base = _base_type(tp)
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {name!r}: expected a list of strings")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {name!r}: expected true or false, got {value!r}")
    try:
        if base is Path:
            return Path(value)
        if base is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int | str) and not isinstance(value, bool):
            return int(value)
        if base is str and isinstance(value, str | int):
            return str(value)
    except ValueError:
        pass
    raise ConfigError(f"config key {name!r}: expected {getattr(base, '__name__', base)}, "
                      f"got {value!r}")


_HINTS = typing.get_type_hints(Config)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; defaults are None so the file's values show through."""
    parser.add_argument("--config", type=Path, default=None,
                        help=f"TOML config file (default {DEFAULT_CONFIG_PATH}, if present)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if _base_type(_HINTS[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f.metadata["help"])


def load(args: argparse.Namespace | None = None) -> Config:
    """Defaults, then the config file, then flags given on the command line."""
    explicit = getattr(args, "config", None) if args is not None else None
    path = explicit or DEFAULT_CONFIG_PATH
    values: dict[str, Any] = {}
    if path.exists():
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    elif explicit is not None:
        raise NotFound(f"config file {path}: not found")
    known = {f.name for f in dataclasses.fields(Config)}
    for key in values:
        if key not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
    if args is not None:
        for name in known:
            flag_value = getattr(args, name, None)
            if flag_value is not None:
                values[name] = flag_value
    coerced = {k: _coerce(k, _HINTS[k], v) for k, v in values.items()}
    cfg = Config(**coerced)
    parse_size(cfg.cache_size, "cache_size")
    parse_size(cfg.toc_store_size, "toc_store_size")
    parse_size(cfg.max_toc_size, "max_toc_size")
    for key in ("prefetch_size", "background_rate", "readahead_size", "fetch_window"):
        parse_size(getattr(cfg, key), key)
    for key in ("prefetch_parallel", "background_concurrency", "max_connections_per_host"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r}: must be at least 1")
    for key in ("prefetch_wait", "background_quiet", "profile_window", "listing_entries"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key!r}: must not be negative")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"config key 'log_level': unknown level {cfg.log_level!r}")
    try:
        int(cfg.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"config key 'socket_mode': {cfg.socket_mode!r} is not octal") from None
    return cfg
