"""The WWW-Authenticate flows (Bearer and Basic) through RegistryClient on the fake."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from snapshotter.digest import Digest
from snapshotter.registry.auth import parse_challenges
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.credentials import Credential, StaticCredentials
from snapshotter.registry.errors import Unauthorized
from snapshotter.registry.reference import Reference
from tests.registry.fakeregistry import STORAGE_HOST, TOKEN_HOST, FakeRegistry

MakeClient = Callable[..., RegistryClient]
REF = Reference.parse("registry.test/team/app:v1")
OTHER = Reference.parse("registry.test/team/other:v1")
PASSWORD = "pa55-w0rd-never-logged"
DATA = b"0123456789" * 100


def creds(**kwargs: str) -> StaticCredentials:
    return StaticCredentials({"registry.test": Credential(**kwargs)})


def test_parse_challenges() -> None:
    [bearer, basic] = parse_challenges(
        [
            'Bearer realm="https://auth.example/token",service="reg",'
            'scope="repository:a/b:pull,push repository:c:pull", Basic realm="x"'
        ]
    )
    assert bearer.scheme == "bearer" and basic.scheme == "basic"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push repository:c:pull",
    }
    [esc] = parse_challenges(['Bearer realm="a\\"b", error=insufficient_scope'])
    assert esc.params == {"realm": 'a"b', "error": "insufficient_scope"}
    assert [c.scheme for c in parse_challenges(["", "Negotiate"])] == ["negotiate"]


async def test_bearer_anonymous_and_token_cached_per_scope(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    fake.auth = "bearer"
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    for i in range(3):
        assert await client.read_blob_range(REF, digest, i, i + 1) == DATA[i : i + 1]
    token_requests = fake.requests_to(TOKEN_HOST)
    assert len(token_requests) == 1
    assert token_requests[0].url.params.get_list("scope") == ["repository:team/app:pull"]
    assert token_requests[0].url.params["service"] == "fake"
    assert "authorization" not in token_requests[0].headers
    # a new scope: the realm is known, so the token is fetched before the request
    fake.seen.clear()
    await client.read_blob_range(OTHER, digest, 0, 1)
    assert [s.url.host for s in fake.seen] == [TOKEN_HOST, "registry.test"]


async def test_concurrent_requests_share_one_token(
    fake: FakeRegistry, make_client: MakeClient
) -> None:
    fake.auth = "bearer"
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    results: dict[int, bytes] = {}

    async def read(i: int) -> None:
        results[i] = await client.read_blob_range(REF, digest, i, i + 1)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(read, i)
    assert results == {i: DATA[i : i + 1] for i in range(10)}
    assert len(fake.requests_to(TOKEN_HOST)) == 1


async def test_bearer_with_password(fake: FakeRegistry, make_client: MakeClient) -> None:
    fake.auth, fake.users = "bearer", {"alice": PASSWORD}
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client(extra_credentials=creds(username="alice", password=PASSWORD))
    assert await client.blob_size(REF, digest) == len(DATA)
    [token_request] = fake.requests_to(TOKEN_HOST)
    assert token_request.method == "GET"
    assert token_request.headers["authorization"].startswith("Basic ")
    assert token_request.url.params["account"] == "alice"


async def test_bearer_with_identity_token(fake: FakeRegistry, make_client: MakeClient) -> None:
    fake.auth, fake.refresh_tokens = "bearer", {"refresh-xyz": "alice"}
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client(extra_credentials=creds(identity_token="refresh-xyz"))
    assert await client.blob_size(REF, digest) == len(DATA)
    [token_request] = fake.requests_to(TOKEN_HOST)
    assert token_request.method == "POST"
    form = dict(httpx_params(token_request.body))
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "refresh-xyz"
    assert form["scope"] == "repository:team/app:pull" and form["service"] == "fake"


def httpx_params(body: bytes) -> list[tuple[str, str]]:
    import httpx

    return list(httpx.QueryParams(body.decode()).multi_items())


async def test_token_refetched_after_expiry(
    fake: FakeRegistry, make_client: MakeClient, autojump_clock: object
) -> None:
    fake.auth, fake.token_lifetime = "bearer", 60
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    await client.blob_size(REF, digest)
    await trio.sleep(61)
    await client.blob_size(REF, digest)
    assert len(fake.requests_to(TOKEN_HOST)) == 2


async def test_revoked_token_is_replaced_once(fake: FakeRegistry, make_client: MakeClient) -> None:
    fake.auth = "bearer"
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client()
    await client.blob_size(REF, digest)
    fake._tokens.clear()  # the registry forgets every token it issued
    assert await client.blob_size(REF, digest) == len(DATA)
    assert len(fake.requests_to(TOKEN_HOST)) == 2


async def test_push_asks_for_push_scope(fake: FakeRegistry, make_client: MakeClient) -> None:
    fake.auth = "bearer"
    client = make_client()
    await client.push_blob(REF, DATA, Digest.of(DATA))
    requests = fake.requests_to(TOKEN_HOST)
    assert requests
    assert all("repository:team/app:pull,push" in s.url.params.get_list("scope") for s in requests)


async def test_realm_refuses_credentials(fake: FakeRegistry, make_client: MakeClient) -> None:
    fake.auth, fake.users = "bearer", {"alice": "the-right-one"}
    digest = Digest.parse(fake.add_blob(DATA))
    client = make_client(extra_credentials=creds(username="alice", password=PASSWORD))
    with pytest.raises(Unauthorized, match="refused credentials") as info:
        await client.blob_size(REF, digest)
    assert PASSWORD not in str(info.value)


async def test_basic_auth(fake: FakeRegistry, make_client: MakeClient) -> None:
    fake.auth, fake.users = "basic", {"bob": PASSWORD}
    digest = Digest.parse(fake.add_blob(DATA))
    with pytest.raises(Unauthorized):
        await make_client().blob_size(REF, digest)  # no credentials
    with pytest.raises(Unauthorized):
        await make_client(extra_credentials=creds(username="bob", password="nope")).blob_size(
            REF, digest
        )
    fake.seen.clear()
    client = make_client(extra_credentials=creds(username="bob", password=PASSWORD))
    for _ in range(3):
        await client.blob_size(REF, digest)
    statuses = [s.headers.get("authorization", "-")[:5] for s in fake.seen]
    assert statuses == ["-", "Basic", "Basic", "Basic"]  # one challenge, then up front


@pytest.mark.allow_log_errors
async def test_secrets_never_in_logs_or_errors(
    fake: FakeRegistry, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Drive success and failure paths at DEBUG; no secret may show up anywhere."""
    caplog.set_level(logging.DEBUG)
    secrets = [PASSWORD, "refresh-s3cret", "secret-signature"]
    fake.auth, fake.users = "bearer", {"alice": PASSWORD}
    fake.refresh_tokens = {"refresh-s3cret": "alice"}
    fake.redirect_blobs = True
    digest = Digest.parse(fake.add_blob(DATA))
    errors: list[BaseException] = []
    good = make_client(extra_credentials=creds(username="alice", password=PASSWORD))
    await good.read_blob_range(REF, digest, 0, 5)
    issued = list(fake._tokens)
    fake.storage_expired = True
    bad_cases = [
        (good, lambda c: c.read_blob_range(REF, digest, 0, 5)),
        (
            make_client(extra_credentials=creds(username="alice", password=PASSWORD + "x")),
            lambda c: c.blob_size(REF, digest),
        ),
        (
            make_client(extra_credentials=creds(identity_token="refresh-s3cret-wrong")),
            lambda c: c.blob_size(REF, digest),
        ),
    ]
    for client, call in bad_cases:
        try:
            await call(client)
        except Exception as exc:
            errors.append(exc)
    assert len(errors) == 3
    secrets += [*issued, "refresh-s3cret-wrong"]
    texts = [r.getMessage() for r in caplog.records]
    for exc in errors:
        seen: BaseException | None = exc
        while seen is not None:
            texts += [str(seen), repr(seen)]
            seen = seen.__cause__ or seen.__context__
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"secret leaked in: {text}"
    assert any(STORAGE_HOST in t for t in texts)  # the storage URL is logged, redacted
