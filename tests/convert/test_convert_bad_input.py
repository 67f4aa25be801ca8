"""Bad input: a clear error of the right category naming the layer, and nothing written
under the destination's name."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from snapshotter.cli import EXIT_CODES, main
from snapshotter.convert import CorruptLayer, UnsafeLayer, UnsupportedMediaType
from snapshotter.errors import DataLoss, InvalidArgument, NotFound
from tests.convert.conftest import Convert
from tests.convert.layouts import compress, image_docs, write_image
from tests.e2e.images import Entry, Layer, sample_image


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """Raw tar bytes, names exactly as given: (name, "reg"|"hardlink"|"symlink", data/link)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "reg":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                info.type = tarfile.LNKTYPE if kind == "hardlink" else tarfile.SYMTYPE
                info.linkname = str(payload)
                tf.addfile(info)
    return buf.getvalue()


def _assert_nothing_written(layout: Path, scratch: Path) -> None:
    assert not (layout / "index.json").exists()
    assert list(scratch.iterdir()) == []


def _layer_digest(layout: Path, n: int = 0) -> str:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs/sha256" / digest).read_text())
    return manifest["layers"][n]["digest"]


async def test_missing_source(tmp_path: Path, convert: Convert, scratch: Path) -> None:
    with pytest.raises(NotFound, match="no OCI layout"):
        await convert(f"oci:{tmp_path}/nothing:v1", f"oci:{tmp_path}/dst:v1")
    write_image(tmp_path / "src", image_docs([Layer((Entry("a", data=b"a"),))]))
    with pytest.raises(NotFound, match="no image tagged 'v2'"):
        await convert(f"oci:{tmp_path}/src:v2", f"oci:{tmp_path}/dst:v1")
    _assert_nothing_written(tmp_path / "dst", scratch)


async def test_layer_blob_that_does_not_match_its_digest(
    tmp_path: Path, convert: Convert, scratch: Path
) -> None:
    write_image(tmp_path / "src", image_docs(list(sample_image().layers)))
    digest = _layer_digest(tmp_path / "src", 1)
    blob = tmp_path / "src/blobs/sha256" / digest.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))

    with pytest.raises(DataLoss, match=f"layer 2 \\({digest}\\).*digest mismatch"):
        await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1")
    _assert_nothing_written(tmp_path / "dst", scratch)


def _gzip_damaged(raw: bytes) -> bytes:
    gz = bytearray(gzip.compress(raw, compresslevel=1, mtime=0))
    for i in range(len(gz) // 2, len(gz) // 2 + 16):
        gz[i] ^= 0x55
    return bytes(gz)


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (_gzip_damaged, "corrupt gzip stream|uncompressed content"),
        (lambda raw: gzip.compress(raw, mtime=0)[:-100], "gzip stream is truncated"),
        (lambda raw: b"this is not gzip at all" * 10, "corrupt gzip stream"),
    ],
    ids=["damaged", "truncated", "not-gzip"],
)
async def test_corrupt_gzip_names_the_layer(
    tmp_path: Path, convert: Convert, scratch: Path, blob, problem: str  # type: ignore[no-untyped-def]
) -> None:
    raw = Layer((Entry("big", data=bytes(range(256)) * 4096),)).tar()
    bad = blob(raw)
    # Digests in the manifest match the damaged bytes: only decompression can tell.
    built = image_docs([Layer((Entry("ok", data=b"fine"),)), raw])
    layer_digest = _replace_layer_blob(built, 1, bad)
    write_image(tmp_path / "src", built)

    with pytest.raises(CorruptLayer, match=f"layer 2 \\({layer_digest}\\).*({problem})"):
        await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1")
    _assert_nothing_written(tmp_path / "dst", scratch)


def _replace_layer_blob(built, n: int, data: bytes) -> str:  # type: ignore[no-untyped-def]
    """Swap layer `n`'s blob for `data`, fixing the descriptors (not the config)."""
    import hashlib

    def digest(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    manifest_raw = built.blobs.pop(built.root["digest"])
    manifest = json.loads(manifest_raw)
    built.blobs.pop(manifest["layers"][n]["digest"])
    built.blobs[digest(data)] = data
    manifest["layers"][n].update(digest=digest(data), size=len(data))
    raw = json.dumps(manifest).encode()
    built.blobs[digest(raw)] = raw
    built.root.update(digest=digest(raw), size=len(raw))
    return digest(data)


async def test_config_diff_id_that_does_not_match_the_layer(
    tmp_path: Path, convert: Convert, scratch: Path
) -> None:
    built = image_docs([Layer((Entry("a", data=b"a"),))])
    other = compress(Layer((Entry("b", data=b"b"),)).tar(), "gzip")
    digest = _replace_layer_blob(built, 0, other)
    write_image(tmp_path / "src", built)

    with pytest.raises(CorruptLayer, match=f"layer 1 \\({digest}\\).*image config says"):
        await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1")
    _assert_nothing_written(tmp_path / "dst", scratch)


@pytest.mark.parametrize(
    "members",
    [
        (("../escape", "reg", b"x"),),
        (("a/../../escape", "reg", b"x"),),
        (("ok", "reg", b"x"), ("link", "hardlink", "../../etc/passwd")),
        (("link", "hardlink", "missing-target"),),
    ],
    ids=["dotdot", "inner-dotdot", "hardlink-escape", "hardlink-dangling"],
)
async def test_hostile_tar_paths_are_refused(
    tmp_path: Path, convert: Convert, scratch: Path, members: tuple
) -> None:
    write_image(tmp_path / "src", image_docs([_tar(*members)]))

    with pytest.raises(UnsafeLayer, match="layer 1 \\(sha256:"):
        await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1")
    _assert_nothing_written(tmp_path / "dst", scratch)


async def test_symlinks_pointing_anywhere_are_fine(tmp_path: Path, convert: Convert) -> None:
    """A symlink is resolved inside the container's root: "/etc" or "../.." cannot escape."""
    write_image(tmp_path / "src", image_docs([_tar(("abs", "symlink", "/etc/passwd"),
                                                   ("up", "symlink", "../../.."))]))
    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1")
    assert (tmp_path / "dst/index.json").exists()


@pytest.mark.parametrize("where", ["layer", "config"])
async def test_unsupported_media_type(
    tmp_path: Path, convert: Convert, scratch: Path, where: str
) -> None:
    built = image_docs([Layer((Entry("a", data=b"a"),))])
    raw = built.blobs.pop(built.root["digest"])
    manifest = json.loads(raw)
    if where == "layer":
        manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+bzip2"
    else:
        manifest["config"]["mediaType"] = "application/vnd.cncf.helm.config.v1+json"
    import hashlib

    raw = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    built.blobs[digest] = raw
    built.root.update(digest=digest, size=len(raw))
    write_image(tmp_path / "src", built)

    with pytest.raises(UnsupportedMediaType, match=r"bzip2|helm"):
        await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1")
    _assert_nothing_written(tmp_path / "dst", scratch)


async def test_one_bad_layer_stops_the_others_and_leaves_no_temp_files(
    tmp_path: Path, convert: Convert, scratch: Path
) -> None:
    good = [Layer((Entry(f"f{i}", data=bytes([i]) * 300_000),)) for i in range(4)]
    built = image_docs([*good, Layer((Entry("bad", data=b"x" * 1000),))])
    digest = _replace_layer_blob(built, 4, b"\x1f\x8b garbage")
    write_image(tmp_path / "src", built)

    with pytest.raises(CorruptLayer, match=f"layer 5 \\({digest}\\)"):
        await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1", jobs=5)
    _assert_nothing_written(tmp_path / "dst", scratch)


def test_cli_exit_codes_and_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert", "-q", f"oci:{tmp_path}/missing:v1", f"oci:{tmp_path}/dst:v1"])
    assert code == EXIT_CODES[NotFound]
    assert "no OCI layout" in capsys.readouterr().err

    write_image(tmp_path / "src", image_docs([_tar(("../x", "reg", b"x"))]))
    code = main(["convert", "-q", f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1"])
    assert code == EXIT_CODES[InvalidArgument]
    err = capsys.readouterr().err
    assert "layer 1 (sha256:" in err and "'..'" in err

    code = main(["convert", "-q", "--platform", "linux", f"oci:{tmp_path}/src:v1",
                 f"oci:{tmp_path}/dst:v1"])
    assert code == EXIT_CODES[InvalidArgument]


def test_cli_converts_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(tmp_path / "src", image_docs([Layer((Entry("a", data=b"a"),))]))
    (tmp_path / "prio.txt").write_text("# paths\na\n")

    code = main(["convert", "--prioritize", str(tmp_path / "prio.txt"), "--chunk-size", "1MiB",
                 f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1"])

    out, err = capsys.readouterr()
    assert code == 0
    assert "converted oci:" in out and "layers:    1" in out and "2 uploaded, 0 already" in out
    assert "[1/1] sha256:" in err  # plain lines: stderr is not a terminal here


async def test_cancellation_stops_the_worker_thread_and_removes_temp_data(
    tmp_path: Path, client, scratch: Path  # type: ignore[no-untyped-def]
) -> None:
    """As on Ctrl-C: the thread converting a big layer gives up at its next read."""
    import random
    import threading

    import trio

    from snapshotter.convert import ConvertOptions, NullProgress, convert_image

    size = 32 << 20
    data = random.Random(3).randbytes(size)
    write_image(tmp_path / "src", image_docs([Layer((Entry("big", data=data),))]))
    token = trio.lowlevel.current_trio_token()
    read = 0
    lock = threading.Lock()

    class CancelOnFirstBytes(NullProgress):
        def advance(self, key: str, nbytes: int) -> None:
            nonlocal read
            with lock:
                read += nbytes
                first = read == nbytes
            if first:
                trio.from_thread.run_sync(scope.cancel, trio_token=token)

    with trio.CancelScope() as scope:
        await convert_image(
            f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1", client=client,
            options=ConvertOptions(tmp_dir=scratch), progress=CancelOnFirstBytes(),
        )
    assert scope.cancelled_caught
    assert read < size // 4, f"the thread read {read} of {size} bytes after being cancelled"
    _assert_nothing_written(tmp_path / "dst", scratch)
