"""RegistryClient against the in-memory fake: manifests, ranges, retries, redirects, push."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from snapshotter.digest import Digest
from snapshotter.errors import ClosedError, DataLoss, InvalidArgument
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import (
    BlobNotFound,
    ManifestNotFound,
    PlatformNotFound,
    RangeNotSupported,
    RegistryRejected,
    RegistryUnavailable,
    ShortRead,
    Unauthorized,
)
from snapshotter.registry.reference import Reference
from tests.registry.fakeregistry import STORAGE_HOST, FakeRegistry
from tests.registry.images import OCI_MANIFEST, add_multiarch, manifest_doc

MakeClient = Callable[..., RegistryClient]
REF = Reference.parse("registry.test/team/app:v1")
DATA = bytes(range(256)) * 64  # 16 KiB


def blob_path(digest: str, repo: str = "team/app") -> str:
    return f"/v2/{repo}/blobs/{digest}"


async def test_get_manifest_by_tag_then_digest(fake: FakeRegistry, make_client: MakeClient) -> None:
    doc = manifest_doc(fake, [b"layer-one", b"layer-two"])
    digest = fake.add_manifest("team/app", "v1", doc, OCI_MANIFEST)
    client = make_client()
    m = await client.get_manifest(REF)
    assert str(m.digest) == digest and m.media_type == OCI_MANIFEST
    assert [str(layer.digest) for layer in m.layers] == [d["digest"] for d in doc["layers"]]
    assert m.layers[1].size == len(b"layer-two")
    assert m.layers[0].annotations == {"containerd.io/snapshot/stargz/toc.digest": "toc-0"}
    assert json.loads(m.raw) == doc
    pinned = await client.get_manifest(REF.with_digest(Digest.parse(digest)))
    assert pinned.raw == m.raw


async def test_a_recent_manifest_is_shared_within_max_age(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    """Two parts of the daemon resolving one tag at once cost one GET; later, within
    max_age, none; with max_age 0, or without max_age, a GET each; failures are not kept."""
    doc = manifest_doc(fake, [b"layer-one"])
    fake.add_manifest("team/app", "v1", doc, OCI_MANIFEST)
    client = make_client()

    def gets() -> int:
        return sum(1 for s in fake.seen if s.method == "GET" and "/manifests/" in str(s.url))

    got: list[object] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(lambda: _append(got, client.get_manifest(REF, max_age=60.0)))
    assert gets() == 1 and len(got) == 3 and got[0] is got[1] is got[2]
    assert await client.get_manifest(REF, max_age=60.0) is got[0] and gets() == 1
    await client.get_manifest(REF, max_age=0.0)
    await client.get_manifest(REF)
    assert gets() == 3
    other = Reference.parse("registry.test/team/app:v2")
    with pytest.raises(ManifestNotFound):
        await client.get_manifest(other, max_age=60.0)
    fake.add_manifest("team/app", "v2", doc, OCI_MANIFEST)
    assert (await client.get_manifest(other, max_age=60.0)).raw == got[0].raw  # type: ignore[attr-defined]


async def _append(out: list[object], coro) -> None:  # type: ignore[no-untyped-def]
    out.append(await coro)


@pytest.mark.parametrize(
    ("wanted", "expect"),
    [("linux/arm64", "linux/arm64/v8"), ("linux/arm/v7", "linux/arm/v7"), ("linux/amd64", None)],
)
async def test_index_selects_platform(
    fake: FakeRegistry, make_client: MakeClient, wanted: str, expect: str | None
) -> None:
    digests = add_multiarch(
        fake, "team/app", "v1", ["linux/amd64", "linux/arm64/v8", "linux/arm/v6", "linux/arm/v7"]
    )
    m = await make_client().get_manifest(REF, platform=wanted)
    assert str(m.digest) == digests[expect or wanted]


async def test_index_without_the_platform(fake: FakeRegistry, make_client: MakeClient) -> None:
    add_multiarch(fake, "team/app", "v1", ["linux/s390x"])
    with pytest.raises(PlatformNotFound, match="linux/riscv64"):
        await make_client().get_manifest(REF, platform="linux/riscv64")


async def test_manifest_not_found_and_bad_digest(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    client = make_client()
    with pytest.raises(ManifestNotFound, match="MANIFEST_UNKNOWN"):
        await client.get_manifest(REF)
    doc = manifest_doc(fake, [b"x"])
    fake.add_manifest("team/app", "v1", doc, OCI_MANIFEST)
    wrong = Digest.of(b"something else")
    fake.manifests[("team/app", str(wrong))] = fake.manifests[("team/app", "v1")]
    with pytest.raises(DataLoss):
        await client.get_manifest(REF.with_digest(wrong))


async def test_blob_size_and_ranges(fake: FakeRegistry, make_client: MakeClient) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    assert await client.blob_size(REF, digest) == len(DATA)
    assert await client.read_blob_range(REF, digest, 0, 10) == DATA[:10]
    assert await client.read_blob_range(REF, digest, 1000, 5000) == DATA[1000:5000]
    assert await client.read_blob_range(REF, digest, len(DATA) - 51, len(DATA)) == DATA[-51:]
    ranges = [s.headers["range"] for s in fake.seen if "range" in s.headers]
    assert ranges == ["bytes=0-9", "bytes=1000-4999", f"bytes={len(DATA) - 51}-{len(DATA) - 1}"]
    with pytest.raises(InvalidArgument):
        await client.read_blob_range(REF, digest, 10, 10)
    with pytest.raises(BlobNotFound):
        await client.read_blob_range(REF, Digest.of(b"absent"), 0, 1)
    with pytest.raises(BlobNotFound):
        await client.blob_size(REF, Digest.of(b"absent"))


async def test_range_ignored_small_blob_is_trimmed_large_is_refused(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    small = Digest.parse(fake.add_blob(DATA))
    large_data = b"L" * (2 << 20)
    large = Digest.parse(fake.add_blob(large_data))
    fake.script(blob_path(str(small)), ["ignore-range"])
    fake.script(blob_path(str(large)), ["ignore-range", "ignore-range"])
    client = make_client()
    assert await client.read_blob_range(REF, small, 100, 200) == DATA[100:200]
    with pytest.raises(RangeNotSupported):
        await client.read_blob_range(REF, large, 100, 200)
    # the whole blob asked as a range is fine as a 200
    assert await client.read_blob_range(REF, large, 0, len(large_data)) == large_data


async def test_wrong_content_range_is_refused(fake: FakeRegistry, make_client: MakeClient) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    bad = (206, {"Content-Range": f"bytes 0-9/{len(DATA)}"})
    fake.script(blob_path(str(digest)), [bad])
    with pytest.raises(ShortRead):
        await make_client().read_blob_range(REF, digest, 10, 20)


async def test_blob_tail_tells_the_size_in_one_request(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    assert await client.read_blob_tail(REF, digest, 51) == (DATA[-51:], len(DATA))
    # More than the blob: all of it (a 206 for the whole range).
    assert await client.read_blob_tail(REF, digest, len(DATA) + 100) == (DATA, len(DATA))
    seen = [(s.method, s.headers.get("range")) for s in fake.seen]
    assert seen == [("GET", "bytes=-51"), ("GET", f"bytes=-{len(DATA) + 100}")]


async def test_blob_tail_range_ignored_small_is_trimmed_large_refused(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    small = Digest.parse(fake.add_blob(DATA))
    large = Digest.parse(fake.add_blob(b"L" * (2 << 20)))
    fake.script(blob_path(str(small)), ["ignore-range"])
    fake.script(blob_path(str(large)), ["ignore-range", "ignore-range"])
    client = make_client()
    assert await client.read_blob_tail(REF, small, 100) == (DATA[-100:], len(DATA))
    with pytest.raises(RangeNotSupported):
        await client.read_blob_tail(REF, large, 100)


@pytest.mark.parametrize("content_range", ["bytes 0-9/{n}", "bytes {a}-{z}/*", "bytes {a}-{y}/{n}"])
async def test_blob_tail_not_ending_at_the_end_is_refused(
    fake: FakeRegistry, make_client: MakeClient, content_range: str
) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    n = len(DATA)
    header = content_range.format(n=n, a=n - 10, y=n - 2, z=n - 1)
    fake.script(blob_path(str(digest)), [(206, {"Content-Range": header})])
    with pytest.raises(ShortRead):
        await make_client().read_blob_tail(REF, digest, 10)


async def test_retries_scripted_faults(fake: FakeRegistry, make_client: MakeClient) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    fake.script(blob_path(str(digest)), [503, "connect", "timeout", "ok"])
    assert await make_client().read_blob_range(REF, digest, 0, 4) == DATA[:4]
    assert len(fake.requests_to("registry.test")) == 4


async def test_gives_up_after_max_attempts(fake: FakeRegistry, make_client: MakeClient) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    fake.script(blob_path(str(digest)), [503, 502, 500, 429, "ok"])
    with pytest.raises(RegistryUnavailable, match="HTTP 429"):
        await make_client().read_blob_range(REF, digest, 0, 4)
    assert len(fake.seen) == 4


async def test_retry_after_is_honoured(
    fake: FakeRegistry, make_client: MakeClient, autojump_clock: object
) -> None:
    import trio

    digest = Digest.parse(fake.add_blob(DATA))
    fake.script(blob_path(str(digest)), [(429, {"Retry-After": "5"}), "ok"])
    start = trio.current_time()
    assert await make_client().blob_size(REF, digest) == len(DATA)
    assert trio.current_time() - start >= 5.0


async def test_4xx_is_not_retried(fake: FakeRegistry, make_client: MakeClient) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    fake.script(blob_path(str(digest)), [400, "ok"])
    with pytest.raises(InvalidArgument, match="HTTP 400"):
        await make_client().read_blob_range(REF, digest, 0, 4)
    assert len(fake.seen) == 1


async def test_redirect_is_reused_until_it_expires(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    fake.auth, fake.users = "basic", {"u": "registry-password"}
    fake.redirect_blobs = True
    from snapshotter.registry.credentials import Credential, StaticCredentials

    creds = StaticCredentials({"registry.test": Credential("u", "registry-password")})
    client = make_client(extra_credentials=creds)
    digest = Digest.parse(fake.add_blob(DATA))
    for i in range(3):
        assert await client.read_blob_range(REF, digest, i, i + 10) == DATA[i : i + 10]
    registry_gets = fake.requests_to("registry.test", "GET")
    storage_gets = fake.requests_to(STORAGE_HOST, "GET")
    assert len(storage_gets) == 3
    assert len([s for s in registry_gets if s.headers.get("authorization")]) == 1
    assert all("authorization" not in s.headers for s in storage_gets)
    assert await client.blob_size(REF, digest) == len(DATA)  # HEAD follows too
    assert fake.requests_to(STORAGE_HOST, "HEAD")
    # storage says the signature expired: back to the registry for a fresh URL
    fake.storage_expired = True
    fake.seen.clear()
    with pytest.raises(Unauthorized):
        await client.read_blob_range(REF, digest, 0, 10)
    assert len(fake.requests_to("registry.test", "GET")) >= 1
    fake.storage_expired = False
    fake.seen.clear()
    assert await client.read_blob_range(REF, digest, 0, 10) == DATA[:10]
    assert [s.url.host for s in fake.seen if s.method == "GET"][:2] == [
        "registry.test",
        STORAGE_HOST,
    ]


async def test_storage_failures_send_us_back_to_the_registry(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    fake.redirect_blobs = True
    client = make_client()
    digest = Digest.parse(fake.add_blob(DATA))
    await client.read_blob_range(REF, digest, 0, 10)
    storage_path = f"/store/{digest}"
    # the remembered URL refuses the connection: resolved again, read succeeds
    fake.script(storage_path, ["connect"])
    fake.seen.clear()
    assert await client.read_blob_range(REF, digest, 0, 10) == DATA[:10]
    assert [s.url.host for s in fake.seen] == [STORAGE_HOST, "registry.test", STORAGE_HOST]
    # storage answers garbage: the read fails, and the URL is not trusted again
    fake.script(storage_path, [(206, {"Content-Range": "bytes 0-1/2"})])
    with pytest.raises(ShortRead):
        await client.read_blob_range(REF, digest, 0, 10)
    fake.seen.clear()
    assert await client.read_blob_range(REF, digest, 0, 10) == DATA[:10]
    assert [s.url.host for s in fake.seen] == ["registry.test", STORAGE_HOST]


async def test_redirect_cache_entries_expire(
    fake: FakeRegistry, make_client: MakeClient, autojump_clock: object
) -> None:
    import trio

    fake.redirect_blobs = True
    client = make_client()
    digest = Digest.parse(fake.add_blob(DATA))
    await client.read_blob_range(REF, digest, 0, 10)
    await trio.sleep(client.redirects.max_ttl + 1)
    fake.seen.clear()
    await client.read_blob_range(REF, digest, 0, 10)
    assert [s.url.host for s in fake.seen] == ["registry.test", STORAGE_HOST]


def test_signed_url_expiry() -> None:
    from snapshotter.registry.redirects import RedirectCache, url_expiry

    s3 = "https://s3/x?X-Amz-Date=20260101T000000Z&X-Amz-Expires=600&X-Amz-Signature=abc"
    assert url_expiry(s3) == 1767225600 + 600
    assert url_expiry("https://cdn/x?Expires=1700000000&Signature=a") == 1700000000
    assert url_expiry("https://blob/x?se=2026-01-01T00:00:00Z&sig=a") == 1767225600
    assert url_expiry("https://plain/x") is None
    cache = RedirectCache()
    cache.put(("h", "r", "d"), "https://cdn/x?Expires=1000")  # long expired: not kept
    assert len(cache) == 0


async def test_get_blob_verifies(fake: FakeRegistry, make_client: MakeClient) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    assert await client.get_blob(REF, digest) == DATA
    fake.blobs[str(digest)] = DATA[:-1] + b"!"
    with pytest.raises(DataLoss):
        await client.get_blob(REF, digest)


async def test_mirror_failover(fake: FakeRegistry, make_client: MakeClient, tmp_path: Path) -> None:
    (tmp_path / "registry.test").mkdir()
    (tmp_path / "registry.test" / "hosts.toml").write_text(
        'server = "https://registry.test"\n'
        '[host."https://mirror.test"]\n  capabilities = ["pull", "resolve"]\n'
    )
    digest = Digest.parse(fake.add_blob(DATA))
    path = blob_path(str(digest))
    fake.script(path, [503, 503, 503, 503])  # the mirror stays down through its retries
    client = make_client(hosts_dir=tmp_path)
    assert await client.read_blob_range(REF, digest, 0, 4) == DATA[:4]
    hosts = [s.url.host for s in fake.seen]
    assert hosts == ["mirror.test"] * 4 + ["registry.test"]
    assert fake.seen[0].url.params["ns"] == "registry.test"
    assert "ns" not in fake.seen[-1].url.params
    # the failed mirror is skipped for a while rather than taxing every read
    fake.seen.clear()
    await client.read_blob_range(REF, digest, 4, 8)
    assert [s.url.host for s in fake.seen] == ["registry.test"]


LOOPBACK = Reference.parse("127.0.0.1:5000/team/app:v1")


def _loopback(fake: FakeRegistry, make_client: MakeClient, tmp_path: Path, speaks: str):  # type: ignore[no-untyped-def]
    """A client for a loopback registry that speaks only `speaks`, without hosts.toml."""
    fake.speaks["127.0.0.1:5000"] = speaks
    return make_client(hosts_dir=tmp_path)


@pytest.mark.parametrize("speaks", ["http", "https"])
async def test_a_loopback_registry_is_asked_both_ways_once_and_then_its_own(
    fake: FakeRegistry, make_client: MakeClient, tmp_path: Path, speaks: str
) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    client = _loopback(fake, make_client, tmp_path, speaks)
    assert await client.read_blob_range(LOOPBACK, digest, 0, 4) == DATA[:4]
    # Both at once: the answer can cancel the other before it is sent (the mock answers
    # at once), so each scheme is asked at most once, and the server's is among them.
    first = [s.url.scheme for s in fake.seen]
    assert speaks in first and sorted(set(first)) == sorted(first)
    fake.seen.clear()
    assert await client.read_blob_range(LOOPBACK, digest, 4, 8) == DATA[4:8]
    assert {s.url.scheme for s in fake.seen} == {speaks}


async def test_a_tls_registry_that_answers_with_an_error_is_asked_tls_only_after(
    fake: FakeRegistry, make_client: MakeClient, tmp_path: Path
) -> None:
    client = _loopback(fake, make_client, tmp_path, "https")
    with pytest.raises(BlobNotFound):
        await client.read_blob_range(LOOPBACK, Digest.of(b"absent"), 0, 4)
    fake.seen.clear()
    digest = Digest.parse(fake.add_blob(DATA))
    assert await client.read_blob_range(LOOPBACK, digest, 0, 4) == DATA[:4]
    assert [s.url.scheme for s in fake.seen] == ["https"]


async def test_a_push_to_a_loopback_registry_probes_tls_first_and_runs_once(
    fake: FakeRegistry, make_client: MakeClient, tmp_path: Path
) -> None:
    client = _loopback(fake, make_client, tmp_path, "http")
    data = b"pushed once"
    await client.push_blob(LOOPBACK, data, Digest.of(data))
    posts = [s for s in fake.seen if s.method in ("POST", "PUT", "PATCH")]
    assert posts and {s.url.scheme for s in posts} == {"http"}
    assert fake.has_blob("team/app", str(Digest.of(data)))


async def test_no_http_fallback_for_non_loopback(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    fake.script(blob_path(str(digest)), ["tls"] * 4)
    with pytest.raises(RegistryUnavailable, match="cannot connect"):
        await make_client().read_blob_range(REF, digest, 0, 4)
    assert {s.url.scheme for s in fake.seen} == {"https"}


async def test_push_blob_monolithic_chunked_skip_and_mount(
    fake: FakeRegistry, make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapshotter.registry import push

    client = make_client()
    small = b"small blob"
    await client.push_blob(REF, small, Digest.of(small))
    assert fake.blobs[str(Digest.of(small))] == small
    assert fake.has_blob("team/app", str(Digest.of(small)))
    assert [s.method for s in fake.seen] == ["HEAD", "POST", "PUT"]

    monkeypatch.setattr(push, "CHUNK_SIZE", 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(DATA)
    fake.seen.clear()
    await client.push_blob(REF, big, Digest.of(DATA))
    assert fake.blobs[str(Digest.of(DATA))] == DATA
    methods = [s.method for s in fake.seen]
    assert methods == ["HEAD", "POST", *["PATCH"] * 17, "PUT"]
    assert fake.seen[2].headers["content-range"] == "0-999"

    fake.seen.clear()
    await client.push_blob(REF, DATA, Digest.of(DATA))  # present: HEAD only
    assert [s.method for s in fake.seen] == ["HEAD"]

    other = Reference.parse("registry.test/other/app:v1")
    fake.seen.clear()
    await client.push_blob(other, DATA, Digest.of(DATA), mount_from="team/app")
    assert [s.method for s in fake.seen] == ["HEAD", "POST"]
    assert fake.seen[1].url.params["from"] == "team/app"
    assert fake.has_blob("other/app", str(Digest.of(DATA)))

    with pytest.raises(DataLoss):
        await client.push_blob(REF, b"abc", Digest.of(b"abd"))


async def test_put_manifest(fake: FakeRegistry, make_client: MakeClient) -> None:
    client = make_client()
    doc = manifest_doc(fake, [b"x"])
    raw = json.dumps(doc).encode()
    digest = await client.put_manifest(REF, raw, OCI_MANIFEST)
    assert digest == Digest.of(raw)
    assert fake.manifests[("team/app", "v1")] == (raw, OCI_MANIFEST)
    m = await client.get_manifest(REF)
    assert m.digest == digest


async def test_closed_client(make_client: MakeClient) -> None:
    client = make_client()
    await client.aclose()
    await client.aclose()  # idempotent
    with pytest.raises(ClosedError):
        await client.get_manifest(REF)


# --- several ranges in one request --------------------------------------------------------

SPANS = [(0, 10), (100, 150), (4000, 5000)]


def _asked(fake: FakeRegistry) -> list[str]:
    return [s.headers["range"] for s in fake.seen if "range" in s.headers]


async def test_ranges_come_in_one_multipart_request(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    assert await client.read_blob_ranges(REF, digest, SPANS) == [DATA[a:b] for a, b in SPANS]
    assert _asked(fake) == ["bytes=0-9,100-149,4000-4999"]
    assert client.multi_range(REF.host)


@pytest.mark.parametrize("answer", ["first", "ignore"])
async def test_a_server_without_multi_range_gets_single_ranges_from_then_on(
    fake: FakeRegistry, make_client: MakeClient, answer: str
) -> None:
    fake.multi_range = answer
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    want = [DATA[a:b] for a, b in SPANS]
    assert await client.read_blob_ranges(REF, digest, SPANS) == want
    first = ["bytes=0-9"] if answer == "first" else []  # what the 206 held is used
    assert sorted(_asked(fake)[1:]) == sorted([*(
        f"bytes={a}-{b - 1}" for a, b in SPANS if f"bytes={a}-{b - 1}" not in first)])
    assert not client.multi_range(REF.host)
    fake.seen.clear()
    assert await client.read_blob_ranges(REF, digest, SPANS) == want
    assert sorted(_asked(fake)) == sorted(f"bytes={a}-{b - 1}" for a, b in SPANS)


def _multipart(parts: list[tuple[int, int, bytes]], total: int) -> bytes:
    body = b""
    for first, last, data in parts:
        body += (b"--XB\r\nContent-Range: bytes %d-%d/%d\r\n\r\n" % (first, last, total)
                 + data + b"\r\n")  # fmt: skip
    return body + b"--XB--\r\n"


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ([(0, 9, DATA[:10]), (100, 149, DATA[100:150]), (200, 209, DATA[200:210])], "not asked"),
        ([(0, 9, DATA[:10]), (100, 149, DATA[100:149])], "not 50 bytes"),
        ([(0, 9, DATA[:10])], "cut short"),
    ],
    ids=["part-not-asked", "part-short", "no-closing-delimiter"],
)
async def test_a_wrong_multipart_answer_is_refused(
    parts: list[tuple[int, int, bytes]], error: str
) -> None:
    from snapshotter.registry.responses import ranges_body

    body = _multipart(parts, len(DATA))
    if error == "cut short":
        body = body[: -len(b"--XB--\r\n")]
    response = httpx.Response(
        206, content=body, headers={"Content-Type": "multipart/byteranges; boundary=XB"}
    )
    with pytest.raises(ShortRead, match=error):
        await ranges_body(response, [(0, 10), (100, 150)], "test")


async def test_merged_and_reordered_parts_are_sliced() -> None:
    from snapshotter.registry.responses import ranges_body

    body = _multipart([(100, 199, DATA[100:200]), (0, 19, DATA[:20])], len(DATA))
    response = httpx.Response(
        206, content=body, headers={"Content-Type": 'multipart/byteranges; boundary="XB"'}
    )
    got = await ranges_body(response, [(0, 10), (100, 150), (160, 200), (500, 510)], "test")
    assert got == [DATA[:10], DATA[100:150], DATA[160:200], None]


async def test_a_refused_first_multi_range_request_falls_back_to_single_ranges(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    digest = Digest.parse(fake.add_blob(DATA))
    fake.script(blob_path(str(digest)), [416])
    client = make_client()
    assert await client.read_blob_ranges(REF, digest, SPANS) == [DATA[a:b] for a, b in SPANS]
    assert not client.multi_range(REF.host)
    # Once the host is known to answer them, a refusal is an error like any other.
    other = make_client()
    await other.read_blob_ranges(REF, digest, SPANS)
    fake.script(blob_path(str(digest)), [416])
    with pytest.raises(RegistryRejected):
        await other.read_blob_ranges(REF, digest, SPANS)
