"""OCI layout in, OCI layout out: the converted image says the same and reads the same."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from snapshotter.format.build import LANDMARK_CONTENT
from snapshotter.format.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME
from snapshotter.labels import TOC_DIGEST, UNCOMPRESSED_SIZE
from snapshotter.registry.manifest import Platform
from tests.convert.conftest import Convert
from tests.convert.layouts import (
    image_docs,
    index_docs,
    layer_files,
    read_blob,
    read_layout,
    toc_of,
    write_image,
)
from tests.e2e.images import Entry, Layer, sample_image

OURS = {TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK}


def _without_ours(files: dict) -> dict:
    return {k: v for k, v in files.items() if k not in OURS}


def _check_estargz_layer(layout: Path, desc: dict, diff_id: str, original_tar: bytes) -> dict:
    """Every promise a converted layer descriptor makes; returns the TOC."""
    blob = read_blob(layout, desc["digest"])
    assert desc["size"] == len(blob)
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
    tar = gzip.decompress(blob)  # one ordinary gzip stream, too
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
    assert desc["annotations"][UNCOMPRESSED_SIZE] == str(len(tar))
    toc_raw, toc = toc_of(blob)
    assert desc["annotations"][TOC_DIGEST] == "sha256:" + hashlib.sha256(toc_raw).hexdigest()
    assert _without_ours(layer_files(tar)) == layer_files(original_tar)
    return toc


async def test_layout_round_trip_keeps_files_config_and_annotations(
    tmp_path: Path, convert: Convert, scratch: Path
) -> None:
    image = sample_image()
    write_image(tmp_path / "src", image_docs(list(image.layers), annotations={"a": "b"}))

    summary = await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz")

    manifest, desc = read_layout(tmp_path / "dst", "esgz")
    assert desc["digest"] == str(summary.digest)
    assert manifest["annotations"] == {"a": "b"}
    config = json.loads(read_blob(tmp_path / "dst", manifest["config"]["digest"]))
    old_config = json.loads(read_blob(tmp_path / "src", json.loads(
        read_blob(tmp_path / "src", json.loads((tmp_path / "src/index.json").read_text())
                  ["manifests"][0]["digest"]))["config"]["digest"]))
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in old_config.items() if k != "rootfs"}
    for layer, desc, diff_id in zip(image.layers, manifest["layers"],
                                    config["rootfs"]["diff_ids"], strict=True):
        assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert desc["annotations"]["keep.me"] == "yes"
        _check_estargz_layer(tmp_path / "dst", desc, diff_id, layer.tar())
    assert summary.layers == 2 and summary.uploaded == 3 and summary.present == 0
    assert list(scratch.iterdir()) == []  # temp data removed


@pytest.mark.parametrize("compression", ["zstd", ""], ids=["zstd", "uncompressed"])
async def test_zstd_and_uncompressed_sources(
    tmp_path: Path, convert: Convert, compression: str
) -> None:
    image = sample_image()
    write_image(tmp_path / "src", image_docs(list(image.layers), compression=compression))

    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz")

    manifest, _ = read_layout(tmp_path / "dst", "esgz")
    config = json.loads(read_blob(tmp_path / "dst", manifest["config"]["digest"]))
    for layer, desc, diff_id in zip(image.layers, manifest["layers"],
                                    config["rootfs"]["diff_ids"], strict=True):
        _check_estargz_layer(tmp_path / "dst", desc, diff_id, layer.tar())


async def test_docker_media_types_are_kept_unless_oci_is_asked(
    tmp_path: Path, convert: Convert
) -> None:
    write_image(tmp_path / "src", image_docs(list(sample_image().layers), flavor="docker"))

    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:docker")
    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:oci", oci=True)

    docker, desc = read_layout(tmp_path / "dst", "docker")
    assert desc["mediaType"] == docker["mediaType"] == (
        "application/vnd.docker.distribution.manifest.v2+json")
    assert docker["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {d["mediaType"] for d in docker["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"}
    oci, desc = read_layout(tmp_path / "dst", "oci")
    assert desc["mediaType"] == oci["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert oci["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert {d["mediaType"] for d in oci["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"}
    # Same layer bytes either way: only the descriptors differ.
    assert [d["digest"] for d in docker["layers"]] == [d["digest"] for d in oci["layers"]]


def _multi_platform(tmp_path: Path) -> None:
    amd = image_docs([Layer((Entry("amd", data=b"amd64\n"),))], arch="amd64")
    arm = image_docs([Layer((Entry("arm", data=b"arm64\n"),))], arch="arm64")
    attestation = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + "0" * 64, "size": 10,
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    }
    write_image(tmp_path / "src", index_docs([amd, arm], extra=[attestation]))


async def test_multi_platform_index_converts_every_platform(
    tmp_path: Path, convert: Convert
) -> None:
    _multi_platform(tmp_path)

    summary = await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz")

    index, desc = read_layout(tmp_path / "dst", "esgz")
    assert desc["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["annotations"] == {"index.note": "kept"}
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    assert summary.platforms == ("linux/amd64", "linux/arm64")
    for entry in index["manifests"]:
        manifest = json.loads(read_blob(tmp_path / "dst", entry["digest"]))
        assert entry["size"] == len(read_blob(tmp_path / "dst", entry["digest"]))
        assert TOC_DIGEST in manifest["layers"][0]["annotations"]


async def test_platform_filter_keeps_only_the_chosen_platforms(
    tmp_path: Path, convert: Convert
) -> None:
    _multi_platform(tmp_path)

    summary = await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:arm",
                            platforms=(Platform.parse("linux/arm64"),))

    index, _ = read_layout(tmp_path / "dst", "arm")
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["arm64"]
    assert summary.layers == 1


async def test_prioritized_files_come_first_then_the_landmark(
    tmp_path: Path, convert: Convert
) -> None:
    layers = [
        Layer((Entry("a", data=b"a"), Entry("etc", "dir", mode=0o755),
               Entry("etc/conf", data=b"conf"))),
        Layer((Entry("other", data=b"no prioritized file here"),)),
    ]
    write_image(tmp_path / "src", image_docs(layers))

    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz",
                  prioritized=("etc/conf",))

    manifest, _ = read_layout(tmp_path / "dst", "esgz")
    first, second = (toc_of(read_blob(tmp_path / "dst", d["digest"]))[1]["entries"]
                     for d in manifest["layers"])
    assert [e["name"] for e in first] == ["etc/", "etc/conf", PREFETCH_LANDMARK, "a"]
    assert [e["name"] for e in second] == [NO_PREFETCH_LANDMARK, "other"]
    landmark = gzip.decompress(read_blob(tmp_path / "dst", manifest["layers"][0]["digest"]))
    assert LANDMARK_CONTENT in landmark


async def test_without_prioritize_there_is_no_landmark(tmp_path: Path, convert: Convert) -> None:
    write_image(tmp_path / "src", image_docs([Layer((Entry("a", data=b"a"),))]))

    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz", chunk_size=1024)

    manifest, _ = read_layout(tmp_path / "dst", "esgz")
    toc = toc_of(read_blob(tmp_path / "dst", manifest["layers"][0]["digest"]))[1]
    assert [e["name"] for e in toc["entries"]] == ["a"]


async def test_chunk_size_splits_large_files(tmp_path: Path, convert: Convert) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes -> 3 chunks of 4096
    write_image(tmp_path / "src", image_docs([Layer((Entry("f", data=data),))]))

    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz", chunk_size=4096)

    manifest, _ = read_layout(tmp_path / "dst", "esgz")
    entries = toc_of(read_blob(tmp_path / "dst", manifest["layers"][0]["digest"]))[1]["entries"]
    assert [(e["type"], e.get("chunkOffset", 0)) for e in entries] == [
        ("reg", 0), ("chunk", 4096), ("chunk", 8192)]
    assert all(e["chunkDigest"].startswith("sha256:") for e in entries)


async def test_many_layers_in_parallel_and_shared_layers_once(
    tmp_path: Path, convert: Convert
) -> None:
    shared = Layer((Entry("shared", data=b"same in both"),))
    layers = [Layer((Entry(f"f{i}", data=bytes([i]) * 5000),)) for i in range(6)]
    write_image(tmp_path / "src", image_docs([shared, *layers, shared]))

    summary = await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz", jobs=3)

    manifest, _ = read_layout(tmp_path / "dst", "esgz")
    assert summary.layers == 7
    assert manifest["layers"][0]["digest"] == manifest["layers"][-1]["digest"]
    assert len({d["digest"] for d in manifest["layers"]}) == 7


async def test_converting_an_estargz_image_again_gives_the_same_layers(
    tmp_path: Path, convert: Convert
) -> None:
    write_image(tmp_path / "src", image_docs(list(sample_image().layers)))
    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/a:esgz", prioritized=("data/big.bin",))

    await convert(f"oci:{tmp_path}/a:esgz", f"oci:{tmp_path}/b:again",
                  prioritized=("data/big.bin",))

    once, _ = read_layout(tmp_path / "a", "esgz")
    twice, _ = read_layout(tmp_path / "b", "again")
    assert once["layers"] == twice["layers"]


async def test_foreign_layers_pass_through_untouched(tmp_path: Path, convert: Convert) -> None:
    import hashlib as h

    built = image_docs([Layer((Entry("a", data=b"a"),))], flavor="docker")
    manifest = json.loads(built.blobs.pop(built.root["digest"]))
    config_digest = manifest["config"]["digest"]
    config = json.loads(built.blobs.pop(config_digest))
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
               "digest": "sha256:" + "f" * 64, "size": 1234,
               "urls": ["https://example.invalid/base.tar.gz"]}
    manifest["layers"].insert(0, foreign)
    config["rootfs"]["diff_ids"].insert(0, "sha256:" + "e" * 64)
    raw_config = json.dumps(config).encode()
    manifest["config"].update(digest="sha256:" + h.sha256(raw_config).hexdigest(),
                              size=len(raw_config))
    built.blobs[manifest["config"]["digest"]] = raw_config
    raw = json.dumps(manifest).encode()
    built.blobs["sha256:" + h.sha256(raw).hexdigest()] = raw
    built.root.update(digest="sha256:" + h.sha256(raw).hexdigest(), size=len(raw))
    write_image(tmp_path / "src", built)

    summary = await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:v1")

    out, _ = read_layout(tmp_path / "dst")
    assert out["layers"][0] == foreign
    assert TOC_DIGEST in out["layers"][1]["annotations"]
    new_config = json.loads(read_blob(tmp_path / "dst", out["config"]["digest"]))
    assert new_config["rootfs"]["diff_ids"][0] == "sha256:" + "e" * 64
    assert summary.layers == 1


async def test_layout_destination_index_keeps_one_entry_per_name(
    tmp_path: Path, convert: Convert
) -> None:
    write_image(tmp_path / "src", image_docs([Layer((Entry("a", data=b"a"),))]))
    write_image(tmp_path / "src2", image_docs([Layer((Entry("b", data=b"b"),))]))

    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst:esgz")
    await convert(f"oci:{tmp_path}/src2:v1", f"oci:{tmp_path}/dst:esgz")  # the tag moves
    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst")
    await convert(f"oci:{tmp_path}/src:v1", f"oci:{tmp_path}/dst")  # same untagged image

    index = json.loads((tmp_path / "dst/index.json").read_text())
    names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name")
             for m in index["manifests"]]
    assert names == ["esgz", None]
    moved, _ = read_layout(tmp_path / "dst", "esgz")
    toc = toc_of(read_blob(tmp_path / "dst", moved["layers"][0]["digest"]))[1]
    assert [e["name"] for e in toc["entries"]] == ["b"]
    assert json.loads((tmp_path / "dst/oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"}
