"""`lazysnap profile import/export/list` against a state directory (no registry needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from snapshotter.cli import profile as profile_cli
from snapshotter.digest import Digest
from snapshotter.errors import InvalidArgument, NotFound
from snapshotter.remote.profile import Access, Profile, encode_profile

MANIFEST = str(Digest.of(b"image manifest"))
LAYER = str(Digest.of(b"layer"))


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    profile_cli.register(parser.add_subparsers())
    args = parser.parse_args(["profile", *argv])
    return args.func(args)


def _file(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "p.json"
    path.write_bytes(raw)
    return path


def test_import_then_export_gives_the_same_bytes(tmp_path: Path, capsysbinary) -> None:
    raw = encode_profile(Profile(MANIFEST, (Access(LAYER, "bin/sh", LAYER, 0, 0.0),)))
    root = str(tmp_path / "root")
    assert _run("import", str(_file(tmp_path, raw)), "--root", root) == 0
    assert b"1 chunks of 1 files" in capsysbinary.readouterr().out
    assert _run("list", "--root", root) == 0
    assert capsysbinary.readouterr().out.decode().split() == [MANIFEST]
    assert _run("export", MANIFEST, "--root", root) == 0
    assert capsysbinary.readouterr().out == raw


def test_a_tampered_file_is_not_imported(tmp_path: Path) -> None:
    doc = json.loads(encode_profile(Profile(MANIFEST, ())))
    doc["profile"]["manifest"] = str(Digest.of(b"other"))
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        _run("import", str(_file(tmp_path, json.dumps(doc).encode())), "--root", str(tmp_path))
    assert not (tmp_path / "profiles").exists() or not any((tmp_path / "profiles").iterdir())


def test_export_without_a_profile_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no profile"):
        _run("export", MANIFEST, "--root", str(tmp_path))


def test_status_shows_the_profile_applied_and_the_native_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import time

    from snapshotter.cli import main

    row = {"image_ref": "r.test/app:1", "layer_digest": LAYER, "mode": "lazy",
           "path": "/r/repo/1", "size": 1 << 20, "bytes_fetched": 1 << 20,
           "percent_fetched": 100.0, "cache_hits": 0, "snapshots": 1, "error": "",
           "profile": {"manifest": MANIFEST, "from": "registry", "chunks": 12,
                       "fetched_chunks": 12, "bytes": 300 << 10, "complete": True},
           "native": "/r/native/sha256-ab", "native_in_use": True}
    doc = {"layers": [row], "fallbacks": [], "time": time.time(), "pid": os.getpid()}
    (tmp_path / "status.json").write_text(json.dumps(doc))
    assert main(["status", "--root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (f"    profile: {MANIFEST[:19]} from registry, 12 chunks (300.0KiB "
                        "prefetched); native: /r/native/sha256-ab")
