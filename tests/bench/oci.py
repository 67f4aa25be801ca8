"""Layer blobs made from directories on disk, and OCI images pushed from those files.

The benchmark images are too big to hold in memory (a 1 GiB file, a 900 MB Python stack),
so unlike `tests/e2e/images.py` everything here streams: a directory becomes a gzip tar
file, and pushing uploads from that file. Directories may be overlayfs upper dirs, whose
whiteouts (char 0/0 devices) and opaque dirs (`trusted.overlay.opaque=y`) become OCI
whiteouts, so an `apt-get install` on top of a base rootfs turns into an exact diff layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from tests.e2e.images import MEDIA_CONFIG, MEDIA_LAYER_GZIP, MEDIA_MANIFEST

__all__ = ["LayerFile", "dir_to_layer", "push_layers"]

_BUF = 1024 * 1024
_OPAQUE_XATTR = "trusted.overlay.opaque"
# Fixed mtime for entries we synthesise (whiteouts), so rebuilding gives the same digest.
_MTIME = 1_700_000_000


@dataclass(frozen=True)
class LayerFile:
    """A gzip tar layer on disk with the digests an OCI manifest and config need."""

    path: str
    digest: str  # of the compressed file
    diff_id: str  # of the uncompressed tar
    size: int  # compressed bytes
    tar_size: int  # uncompressed bytes
    entries: int  # tar entries, whiteouts included

    def save(self) -> None:
        Path(self.path + ".json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> LayerFile | None:
        meta = Path(str(path) + ".json")
        if not meta.exists() or not path.exists():
            return None
        return cls(**json.loads(meta.read_text()))


class _HashingGzipSink(io.RawIOBase):
    """The tar stream goes in; sha256 of the tar and of the gzip output come out."""

    def __init__(self, out: io.BufferedWriter, level: int) -> None:
        self.out = out
        self.tar_hash = hashlib.sha256()
        self.gz_hash = hashlib.sha256()
        self.tar_size = 0
        self.size = 0
        # wbits 31: gzip wrapper; mtime 0 in the header because zlib writes it as 0.
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        data = bytes(data)
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self._emit(self._z.compress(data))
        return len(data)

    def finish(self) -> None:
        self._emit(self._z.flush())

    def _emit(self, chunk: bytes) -> None:
        if chunk:
            self.gz_hash.update(chunk)
            self.size += len(chunk)
            self.out.write(chunk)


def _walk(root: Path) -> Iterator[Path]:
    """Every path below `root`, parents before children, names sorted: stable digests."""
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        yield child
        if child.is_dir() and not child.is_symlink():
            yield from _walk(child)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def dir_to_layer(src: Path, dest: Path, level: int = 6) -> LayerFile:
    """Write `src` as a gzip tar layer to `dest` (atomically), converting overlay whiteouts.

    Owners are numeric, mtimes kept; hardlinks inside `src` stay hardlinks.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    entries = 0
    with open(tmp, "wb") as raw:
        sink = _HashingGzipSink(raw, level)
        buffered = io.BufferedWriter(sink, _BUF)
        with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT,
                          bufsize=_BUF) as tf:
            for path in _walk(src):
                arcname = str(path.relative_to(src))
                st = path.lstat()
                if _is_whiteout(st):
                    parent, _, base = arcname.rpartition("/")
                    ti = tarfile.TarInfo(f"{parent}/.wh.{base}" if parent else f".wh.{base}")
                    ti.mtime = _MTIME
                    tf.addfile(ti)
                    entries += 1
                    continue
                ti = tf.gettarinfo(str(path), arcname)
                ti.uname = ti.gname = ""
                if ti.isreg():
                    with open(path, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
                entries += 1
                if ti.isdir() and _is_opaque(path):
                    opq = tarfile.TarInfo(f"{arcname}/.wh..wh..opq")
                    opq.mtime = _MTIME
                    tf.addfile(opq)
                    entries += 1
        buffered.flush()
        sink.finish()
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, dest)
    layer = LayerFile(
        path=str(dest),
        digest="sha256:" + sink.gz_hash.hexdigest(),
        diff_id="sha256:" + sink.tar_hash.hexdigest(),
        size=sink.size,
        tar_size=sink.tar_size,
        entries=entries,
    )
    layer.save()
    return layer


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_BUF):
            yield chunk


def _oci_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _upload(client: httpx.Client, repo: str, digest: str, size: int, body: object) -> None:
    if client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
        return
    start = client.post(f"/v2/{repo}/blobs/uploads/")
    start.raise_for_status()
    location = httpx.URL(start.headers["Location"]).copy_merge_params({"digest": digest})
    put = client.put(
        location,
        content=body,  # type: ignore[arg-type]
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )
    put.raise_for_status()


def push_layers(
    registry_url: str,
    repo: str,
    tag: str,
    layers: Sequence[LayerFile],
    cmd: Sequence[str],
    env: Sequence[str] = ("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",),
    timeout: float = 600.0,
) -> str:
    """Push an OCI image made of `layers` (bottom first); returns the manifest digest."""
    config = {
        "architecture": _oci_arch(),
        "os": "linux",
        "config": {"Cmd": list(cmd), "Env": list(env), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    config_data = json.dumps(config, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_data).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_data)},
        "layers": [
            {"mediaType": MEDIA_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    manifest_data = json.dumps(manifest, sort_keys=True).encode()
    with httpx.Client(base_url=registry_url, timeout=timeout) as client:
        _upload(client, repo, config_digest, len(config_data), config_data)
        for layer in layers:
            _upload(client, repo, layer.digest, layer.size, _file_chunks(layer.path))
        resp = client.put(
            f"/v2/{repo}/manifests/{tag}",
            content=manifest_data,
            headers={"Content-Type": MEDIA_MANIFEST},
        )
        resp.raise_for_status()
    return "sha256:" + hashlib.sha256(manifest_data).hexdigest()
