"""Build small multi-layer OCI images from in-memory file specs and push them to a registry.

Shared by the e2e tests, the lazy-pull tests and the benchmarks: everything an image test needs
to know about "the original tree" comes from the same `Entry` lists that built the layers, so a
test can compare what a container sees with what went in (`merged_tree`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import httpx

__all__ = [
    "BUSYBOX_APPLETS",
    "Blob",
    "Entry",
    "FileInfo",
    "Image",
    "Layer",
    "busybox_layer",
    "data_image",
    "merged_tree",
    "push_image",
    "sample_image",
]

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

# Applets the tests run inside containers; each becomes a symlink to /bin/busybox.
BUSYBOX_APPLETS = (
    "sh",
    "echo",
    "cat",
    "ls",
    "find",
    "stat",
    "sha256sum",
    "readlink",
    "sleep",
    "wc",
    "head",
    "test",
    "true",
    "false",
    "mkdir",
    "touch",
    "rm",
    "sort",
    "xargs",
    "printf",
    "env",
    "id",
    "dd",
    "md5sum",
    "grep",
    "tr",
    "cut",
    "uname",
    "awk",
    "ln",
    "mv",
    "cp",
    "chmod",
    "tail",
)

# Fixed mtime so that the same spec always produces the same digests.
MTIME = 1_700_000_000


@dataclass(frozen=True)
class Entry:
    """One tar entry. `kind` is one of reg, dir, symlink, hardlink, char, block, fifo.

    Whiteouts are just regular entries named `.wh.<name>` / `.wh..wh..opq`, as in OCI layers.
    """

    path: str
    kind: str = "reg"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.path.lstrip("/"))
        ti.mode = self.mode
        ti.uid, ti.gid = self.uid, self.gid
        ti.mtime = MTIME
        ti.type = {
            "reg": tarfile.REGTYPE,
            "dir": tarfile.DIRTYPE,
            "symlink": tarfile.SYMTYPE,
            "hardlink": tarfile.LNKTYPE,
            "char": tarfile.CHRTYPE,
            "block": tarfile.BLKTYPE,
            "fifo": tarfile.FIFOTYPE,
        }[self.kind]
        if self.kind == "reg":
            ti.size = len(self.data)
        if self.kind in ("symlink", "hardlink"):
            ti.linkname = self.link.lstrip("/") if self.kind == "hardlink" else self.link
        ti.devmajor, ti.devminor = self.devmajor, self.devminor
        if self.xattrs:
            ti.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                for k, v in self.xattrs.items()
            }
        return ti


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class Layer:
    entries: tuple[Entry, ...]

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for e in self.entries:
                ti = e.tarinfo()
                tf.addfile(ti, io.BytesIO(e.data) if e.kind == "reg" else None)
        return buf.getvalue()

    def blob(self) -> tuple[Blob, str]:
        """The gzip blob and the diff_id (digest of the uncompressed tar)."""
        raw = self.tar()
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        return Blob(MEDIA_LAYER_GZIP, gz), "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Image:
    layers: tuple[Layer, ...]
    cmd: tuple[str, ...] = ("/bin/sh", "-c", "echo hello from lazysnap")
    env: tuple[str, ...] = ("PATH=/bin",)

    def blobs(self) -> tuple[Blob, list[Blob], Blob]:
        """(config, layer blobs, manifest), each exactly as pushed."""
        layer_blobs, diff_ids = [], []
        for layer in self.layers:
            blob, diff_id = layer.blob()
            layer_blobs.append(blob)
            diff_ids.append(diff_id)
        config = {
            "architecture": _oci_arch(),
            "os": "linux",
            "config": {"Cmd": list(self.cmd), "Env": list(self.env), "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_blob = Blob(MEDIA_CONFIG, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_blob.descriptor(),
            "layers": [b.descriptor() for b in layer_blobs],
        }
        manifest_blob = Blob(MEDIA_MANIFEST, json.dumps(manifest, sort_keys=True).encode())
        return config_blob, layer_blobs, manifest_blob

    def size(self) -> int:
        """Compressed bytes of all layers: what a full pull downloads."""
        return sum(len(b.data) for b in self.blobs()[1])


def _oci_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def push_image(registry: str, repo: str, tag: str, image: Image, timeout: float = 30.0) -> str:
    """Push with the plain distribution API (monolithic upload); returns the manifest digest.

    `registry` is a base URL such as `http://127.0.0.1:5000`.
    """
    config, layers, manifest = image.blobs()
    with httpx.Client(base_url=registry, timeout=timeout) as client:
        for blob in [config, *layers]:
            if client.head(f"/v2/{repo}/blobs/{blob.digest}").status_code == 200:
                continue
            start = client.post(f"/v2/{repo}/blobs/uploads/")
            start.raise_for_status()
            # Keep the upload URL's own query (its _state token) and add the digest to it.
            location = httpx.URL(start.headers["Location"])
            location = location.copy_merge_params({"digest": blob.digest})
            put = client.put(
                location,
                content=blob.data,
                headers={"Content-Type": "application/octet-stream"},
            )
            put.raise_for_status()
        resp = client.put(
            f"/v2/{repo}/manifests/{tag}",
            content=manifest.data,
            headers={"Content-Type": MEDIA_MANIFEST},
        )
        resp.raise_for_status()
    return manifest.digest


def busybox_layer(busybox: str = "/bin/busybox", extra: Iterable[Entry] = ()) -> Layer:
    """A root filesystem skeleton with a static busybox and the applets the tests use."""
    with open(busybox, "rb") as f:
        binary = f.read()
    entries = [Entry(d, "dir", mode=0o755) for d in ("bin", "dev", "etc", "proc", "sys", "root")]
    entries.append(Entry("tmp", "dir", mode=0o1777))
    entries.append(Entry("bin/busybox", data=binary, mode=0o755))
    entries += [Entry(f"bin/{a}", "symlink", link="busybox", mode=0o777) for a in BUSYBOX_APPLETS]
    entries.append(Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(Entry("etc/group", data=b"root:x:0:\n"))
    entries += list(extra)
    return Layer(tuple(entries))


def _pseudo_random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


BIG_SIZE = 5 * 1024 * 1024 + 123  # more than one 4 MiB chunk, not a multiple of it


def sample_image(
    cmd: Sequence[str] = ("/bin/sh", "-c", "echo hello from lazysnap"), third_layer: bool = False
) -> Image:
    """Two (or three) layers that exercise what overlay semantics must get right.

    Layer 1: busybox skeleton plus files that later layers delete (whiteout) or hide (opaque).
    Layer 2: a regular file, a hardlink and a symlink to it, an empty file, a file > 4 MiB,
    an owned file with odd mode and an xattr, a fifo, a char device, a whiteout, an opaque dir.
    Layer 3 (`third_layer`): whiteout of a whole directory of layer 1, a file hidden by layer
    2's opaque dir brought back with new content, and a file replacing layer 2's symlink.
    """
    layer1 = busybox_layer(
        extra=[
            Entry("etc/removed.txt", data=b"layer 1 file, whited out by layer 2\n"),
            Entry("etc/kept.txt", data=b"layer 1 file, still visible\n"),
            Entry("etc/subdir", "dir", mode=0o750),
            Entry("etc/subdir/deep", "dir", mode=0o755),
            Entry("etc/subdir/deep/file", data=b"removed with its directory by layer 3\n"),
            Entry("opt", "dir", mode=0o755),
            Entry("opt/old", "dir", mode=0o755),
            Entry("opt/old/a", data=b"hidden by opaque dir\n"),
            Entry("opt/old/b", data=b"hidden by opaque dir\n"),
        ]
    )
    hello = b"hello from layer 2\n"
    layer2 = Layer(
        (
            Entry("data", "dir", mode=0o755),
            Entry("data/hello.txt", data=hello),
            Entry("data/hardlink", "hardlink", link="data/hello.txt"),
            Entry("data/symlink", "symlink", link="hello.txt", mode=0o777),
            Entry("data/empty", data=b""),
            Entry("data/big.bin", data=_pseudo_random(BIG_SIZE, seed=42)),
            Entry(
                "data/owned",
                data=b"owned by 1000:1001\n",
                mode=0o640,
                uid=1000,
                gid=1001,
                xattrs={"user.lazysnap": b"test-value"},
            ),
            Entry("data/fifo", "fifo", mode=0o600),
            Entry("data/null", "char", mode=0o666, devmajor=1, devminor=3),
            Entry("etc", "dir", mode=0o755),
            Entry("etc/.wh.removed.txt", data=b""),
            Entry("opt", "dir", mode=0o755),
            Entry("opt/old", "dir", mode=0o755),
            Entry("opt/old/.wh..wh..opq", data=b""),
            Entry("opt/old/c", data=b"only file left in the opaque dir\n"),
        )
    )
    layer3 = Layer(
        (
            Entry("etc", "dir", mode=0o755),
            Entry("etc/.wh.subdir", data=b""),
            Entry("opt", "dir", mode=0o755),
            Entry("opt/old", "dir", mode=0o755),
            Entry("opt/old/a", data=b"back in layer 3, new content\n", mode=0o600),
            Entry("data", "dir", mode=0o755),
            Entry("data/symlink", data=b"a file where layer 2 had a symlink\n"),
        )
    )
    layers = (layer1, layer2, layer3) if third_layer else (layer1, layer2)
    return Image(layers, cmd=tuple(cmd))


def data_image(
    files: dict[str, int], seed: int = 7, extra: dict[str, bytes] | None = None
) -> Image:
    """busybox plus one layer of incompressible files (`path -> size`), for lazy-pull tests.

    The same `files` and `seed` give byte-identical files, so two images built with different
    `extra` files share those files' chunks but not their layer digests.
    """
    entries = [Entry("data", "dir", mode=0o755)]
    for i, (path, size) in enumerate(sorted(files.items())):
        entries.append(Entry(path, data=_pseudo_random(size, seed=seed * 1000 + i)))
    entries += [Entry(path, data=data) for path, data in sorted((extra or {}).items())]
    return Image((busybox_layer(), Layer(tuple(entries))), cmd=("/bin/echo", "ready"))


@dataclass(frozen=True)
class FileInfo:
    """What a container should see at one path, in the form `tree_listing` prints it."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str
    link: str
    xattrs: tuple[tuple[str, bytes], ...] = ()
    device: tuple[int, int] = (0, 0)
    mtime: int = MTIME


def merged_tree(image: Image) -> dict[str, FileInfo]:
    """Apply the layers in order, with OCI whiteouts, as an unpacker would.

    Hardlinks resolve to their target's content; paths are absolute without a trailing slash.
    """
    tree: dict[str, FileInfo] = {}
    for layer in image.layers:
        # Whiteouts hide only lower layers, so apply them all before adding this layer's files.
        for e in layer.entries:
            parent, _, base = ("/" + e.path.strip("/")).rpartition("/")
            if base == ".wh..wh..opq":
                for p in [p for p in tree if p.startswith(parent + "/")]:
                    del tree[p]
            elif base.startswith(".wh."):
                gone = f"{parent}/{base[4:]}"
                for p in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                    del tree[p]
        for e in layer.entries:
            path = "/" + e.path.strip("/")
            if path.rpartition("/")[2].startswith(".wh."):
                continue
            if e.kind == "hardlink":
                tree[path] = tree["/" + e.link.strip("/")]
                continue
            data = e.data if e.kind == "reg" else b""
            tree[path] = FileInfo(
                kind=e.kind,
                mode=e.mode & 0o7777,
                uid=e.uid,
                gid=e.gid,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest() if e.kind == "reg" else "",
                link=e.link if e.kind == "symlink" else "",
                xattrs=tuple(sorted(e.xattrs.items())),
                device=(e.devmajor, e.devminor) if e.kind in ("char", "block") else (0, 0),
            )
    return tree
