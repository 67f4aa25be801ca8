"""Small layer tars built inside tests, and a reader that walks an eStargz blob back."""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import dataclass, field

from snapshotter.format.estargz import (
    FOOTER_SIZE,
    extract_chunk,
    parse_footer,
    parse_toc,
    read_toc_json,
    verify_chunk,
)
from snapshotter.format.toc import Toc

CHUNK = 64 * 1024  # small chunks keep multi-chunk files small


@dataclass
class Item:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    linkname: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


def rich_items() -> list[Item]:
    rnd = random.Random(7)
    return [
        Item("etc", tarfile.DIRTYPE, mode=0o755),
        Item("etc/hosts", data=b"127.0.0.1 localhost\n", uid=1000, gid=1000),
        Item("empty"),
        Item("big.bin", data=rnd.randbytes(CHUNK * 5 // 2), mode=0o755),
        Item("exact.bin", data=rnd.randbytes(CHUNK * 2)),
        Item("etc/hosts.link", tarfile.LNKTYPE, linkname="etc/hosts"),
        Item("lnk", tarfile.SYMTYPE, linkname="/etc/hosts", mode=0o777),
        Item("dev", tarfile.DIRTYPE, mode=0o755),
        Item("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        Item("dev/sda", tarfile.BLKTYPE, mode=0o660, dev=(8, 0)),
        Item("fifo", tarfile.FIFOTYPE, mode=0o600),
        Item(
            "caps",
            data=b"#!/bin/sh\n",
            mode=0o4755,
            xattrs={"user.note": b"hello", "security.capability": bytes([1, 0, 0, 2, 0xFF, 0x80])},
        ),
        Item(".wh.gone"),
        Item("opaque", tarfile.DIRTYPE, mode=0o700),
        Item("opaque/.wh..wh..opq"),
        Item("deep/a/b/file", data=b"implicit parents"),
        Item("d" * 120 + "/" + "long-name-" * 12, data=b"pax path"),
        Item("ünïcode.txt", data="ü".encode() * 1000),
        Item("old", data=b"x", mtime=0),
    ]


def make_tar(items: list[Item]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for it in items:
            info = tarfile.TarInfo(it.name)
            info.type = it.type
            info.mode, info.uid, info.gid, info.mtime = it.mode, it.uid, it.gid, it.mtime
            info.linkname = it.linkname
            info.devmajor, info.devminor = it.dev
            info.size = len(it.data)
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                for k, v in it.xattrs.items()
            }
            tf.addfile(info, io.BytesIO(it.data) if it.data else None)
    return buf.getvalue()


def read_layer(blob: bytes) -> tuple[Toc, dict[str, bytes]]:
    """The validated TOC and every regular file's content, read chunk by chunk."""
    toc_offset, footer = parse_footer(blob[-FOOTER_SIZE:], blob_size=len(blob))
    toc_json = read_toc_json(blob[toc_offset : len(blob) - footer], max_size=1 << 24)
    toc = parse_toc(toc_json, blob_size=len(blob), toc_offset=toc_offset)
    files = {}
    for e in toc.entries:
        if e.type != "reg":
            continue
        parts = []
        for c in e.chunks:
            data = extract_chunk(blob[c.offset : c.end], c)
            verify_chunk(data, c)
            parts.append(data)
        files[e.name] = b"".join(parts)
    return toc, files
