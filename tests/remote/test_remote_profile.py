"""Access profiles: recording, the portable format and its checks, planning from a TOC."""

from __future__ import annotations

import json

import pytest
from remote_fakes import FakeSource, layout, pieces, signed_profile

from snapshotter.digest import Digest
from snapshotter.format.toc import Chunk, Entry, Toc
from snapshotter.remote.blob import RemoteBlob
from snapshotter.remote.prefetch import prefetch, prefetch_steps
from snapshotter.remote.profile import (
    Access,
    InvalidProfile,
    Profile,
    ProfileMismatch,
    Recorder,
    decode_profile,
    encode_profile,
    plan_image_profile,
    plan_profile,
)

MANIFEST = str(Digest.of(b"manifest"))
OTHER = str(Digest.of(b"another manifest"))
LAYER = str(Digest.of(b"layer"))
LAYER2 = str(Digest.of(b"layer 2"))


def _toc(chunks: list[Chunk], size: int) -> Toc:
    entries = [Entry("", "dir", mode=0o755)]
    entries += [Entry(f"f{i}", "reg", size=c.size, chunks=(c,)) for i, c in enumerate(chunks)]
    return Toc(entries=tuple(entries), toc_offset=size, blob_size=size + 100)


@pytest.fixture
def six():
    data, chunks = layout([[p] for p in pieces(6)])
    return data, chunks, _toc(chunks, len(data))


def _profile(chunks: list[Chunk], order: list[int], layer: str = LAYER) -> Profile:
    return Profile(MANIFEST, tuple(
        Access(layer, f"f{i}", chunks[i].digest, 0, 0.1 * n) for n, i in enumerate(order)
    ), window=5.0, image_ref="r.test/app:1")


def _spanned(layer: str, chunk: Chunk, time: float) -> Access:
    return Access(layer, "f", chunk.digest, chunk.chunk_offset, time,
                  (chunk.offset, chunk.end, chunk.inner_offset, chunk.size))


def test_recorder_keeps_first_access_order_and_stops_after_the_window(six) -> None:
    _, chunks, toc = six
    rec = Recorder(MANIFEST, window=2.0)
    entries = toc.entries
    assert rec.read(LAYER, entries[4], chunks[3], now=100.0)
    assert rec.read(LAYER, entries[1], chunks[0], now=100.5)
    assert rec.read(LAYER, entries[4], chunks[3], now=101.0)  # again: not a new access
    assert rec.read(LAYER2, entries[4], chunks[3], now=101.5)  # same chunk, other layer
    assert not rec.read(LAYER, entries[2], chunks[1], now=102.5)
    profile = rec.profile()
    assert [(a.layer, a.file, a.time) for a in profile.accesses] == [
        (LAYER, "f3", 0.0), (LAYER, "f0", 0.5), (LAYER2, "f3", 1.5)]
    assert profile.files() == ["f3", "f0"]


def test_round_trip_through_the_portable_form(six) -> None:
    _, chunks, _ = six
    profile = _profile(chunks, [5, 0, 2])
    raw = encode_profile(profile)
    assert decode_profile(raw, manifest=MANIFEST) == profile
    assert json.loads(raw)["profile"]["manifest"] == MANIFEST


def test_a_profile_for_another_manifest_is_refused(six) -> None:
    raw = encode_profile(_profile(six[1], [1]))
    with pytest.raises(ProfileMismatch, match="belongs to manifest"):
        decode_profile(raw, manifest=OTHER)


def test_a_tampered_profile_fails_its_digest(six) -> None:
    doc = json.loads(encode_profile(_profile(six[1], [1, 2])))
    doc["profile"]["accesses"][0][1] = "etc/shadow"
    with pytest.raises(InvalidProfile, match="digest mismatch"):
        decode_profile(json.dumps(doc).encode(), manifest=MANIFEST)


@pytest.mark.parametrize("raw", [
    b"{not json", b"[]", b'{"digest": "sha256:00", "profile": {}}', b'{"profile": {}}',
])
def test_malformed_profiles_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidProfile):
        decode_profile(raw)


def test_malformed_body_with_a_matching_digest_is_refused() -> None:
    body = {"schema": "lazysnap.profile.v1", "manifest": MANIFEST, "layers": [LAYER],
            "accesses": [[7, "f", 0, LAYER, 0.0]]}
    with pytest.raises(InvalidProfile, match="access #0"):
        decode_profile(signed_profile(body))


def test_plan_follows_first_access_order_and_skips_unknown_chunks(six, monkeypatch) -> None:
    _, chunks, toc = six
    from snapshotter.remote import profile as module

    monkeypatch.setattr(module, "_GROUP_BYTES", 1)  # every access its own group
    profile = _profile(chunks, [4, 1, 4, 2])
    stale = Access(LAYER, "gone", str(Digest.of(b"not in this layer")), 0, 0.5)
    other = Access(LAYER2, "f0", chunks[0].digest, 0, 0.6)
    profile = Profile(MANIFEST, (*profile.accesses, stale, other))
    plan = plan_profile(profile, LAYER, toc)
    assert plan.reason == "profile"
    assert plan.chunks == (chunks[4], chunks[1], chunks[2])
    assert plan_profile(profile, str(Digest.of(b"x")), toc).chunks == ()


def test_plan_groups_are_sorted_by_offset_so_neighbours_coalesce(six) -> None:
    _, chunks, toc = six
    plan = plan_profile(_profile(chunks, [3, 0, 2, 1]), LAYER, toc)
    assert plan.chunks == tuple(chunks[:4])


async def test_prefetching_a_profile_plan_is_one_request_for_neighbours(six, cache) -> None:
    data, chunks, toc = six
    source = FakeSource(data)
    blob = RemoteBlob(source, cache, blob_size=len(data))
    result = await prefetch(blob, plan_profile(_profile(chunks, [2, 0, 1]), LAYER, toc))
    assert result.complete and result.chunks == 3
    assert len(source.calls) == 1
    for c in chunks[:3]:
        assert Digest.parse(c.digest) in cache
    assert Digest.parse(chunks[3].digest) not in cache


def test_recorded_spans_round_trip_and_locate_the_chunk(six) -> None:
    _, chunks, toc = six
    rec = Recorder(MANIFEST, window=5.0)
    rec.read(LAYER, toc.entries[3], chunks[2], now=1.0)
    profile = decode_profile(encode_profile(rec.profile()), manifest=MANIFEST)
    (access,) = profile.accesses
    assert access.span == (chunks[2].offset, chunks[2].end, chunks[2].inner_offset,
                           chunks[2].size)
    assert access.as_chunk() == chunks[2]


def test_profiles_without_spans_still_decode() -> None:
    body = {"schema": "lazysnap.profile.v1", "manifest": MANIFEST, "layers": [LAYER],
            "accesses": [[0, "f", 0, LAYER, 0.0]]}
    (access,) = decode_profile(signed_profile(body)).accesses
    assert access.span is None and access.as_chunk() is None


@pytest.mark.parametrize("span", [
    [-1, 10, 0, 5], [10, 10, 0, 5], [20, 10, 0, 5], [0, 10, -1, 5], [0, 10, 0, -5],
    [0, 10, 0, 1 << 40], [0, 10.5, 0, 5], [0, 10, True, 5], [0, 10, 0], ["0", 10, 0, 5],
])
def test_malformed_spans_are_refused(span: list[object]) -> None:
    body = {"schema": "lazysnap.profile.v1", "manifest": MANIFEST, "layers": [LAYER],
            "accesses": [[0, "f", 0, LAYER, 0.0, *span]]}
    with pytest.raises(InvalidProfile, match="access #0"):
        decode_profile(signed_profile(body))


def test_image_plan_interleaves_layers_in_first_access_order(six, monkeypatch) -> None:
    _, chunks, _ = six
    from snapshotter.remote import profile as module

    monkeypatch.setattr(module, "_GROUP_BYTES", 2 * (chunks[0].end - chunks[0].offset))
    profile = Profile(MANIFEST, (
        _spanned(LAYER2, chunks[4], 0.0), _spanned(LAYER, chunks[3], 0.1),   # group 1
        _spanned(LAYER, chunks[1], 0.2), _spanned(LAYER, chunks[0], 0.3),    # group 2
        _spanned(LAYER2, chunks[4], 0.4),  # again: fetched once
        Access(LAYER, "old", chunks[5].digest, 0, 0.5),  # no span: left to the TOC plan
        _spanned(str(Digest.of(b"not in the image")), chunks[2], 0.6),
    ))
    steps = plan_image_profile(profile, [LAYER, LAYER2])
    assert steps == [(LAYER2, [chunks[4]]), (LAYER, [chunks[3]]),
                     (LAYER, [chunks[0], chunks[1]])]
    assert plan_image_profile(profile, []) == []


async def test_prefetch_steps_keep_their_order_across_blobs(six, cache) -> None:
    data, chunks, _ = six
    source = FakeSource(data)
    order: list[str] = []

    def logged(name: str):  # type: ignore[no-untyped-def]
        async def fetch(start: int, end: int) -> bytes:
            order.append(f"{name}@{start}")
            return await source(start, end)
        return fetch

    blob1 = RemoteBlob(logged("one"), cache, blob_size=len(data), name="one")
    blob2 = RemoteBlob(logged("two"), cache, blob_size=len(data), name="two")
    results = await prefetch_steps(
        [(blob2, [chunks[4]]), (blob1, [chunks[0]]), (blob2, [chunks[2]])], parallel=1)
    assert order == [f"two@{chunks[4].offset}", f"one@{chunks[0].offset}",
                     f"two@{chunks[2].offset}"]
    assert results[blob1].chunks == 1 and results[blob2].chunks == 2
    assert results[blob1].complete and results[blob2].bytes_fetched > 0
