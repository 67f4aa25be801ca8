"""CredentialStore: per-image entries looked up by host, expiry, encryption at rest, restarts."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from snapshotter.cri.store import DATA_FILE, KEY_FILE, CredentialStore, UnsafeKeyFile
from snapshotter.registry.credentials import Credential

SECRET = "hunter2-very-secret"
HOST = "reg.example:5000"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _store(tmp_path: Path, clock: Clock, ttl: float = 3600) -> CredentialStore:
    return CredentialStore(tmp_path / "cri", ttl, clock=clock)


async def test_lookup_by_host_returns_the_newest_credential(tmp_path: Path, clock: Clock) -> None:
    store = _store(tmp_path, clock)
    store.remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET))
    clock.now += 1
    store.remember(f"{HOST}/b:v1", HOST, Credential("bob", SECRET))
    store.remember("other.example/c:v1", "other.example", Credential("carol", SECRET))

    assert await store.lookup(HOST) == Credential("bob", SECRET)
    assert await store.lookup("other.example") == Credential("carol", SECRET)
    assert await store.lookup("nobody.example") is None


async def test_entries_expire_after_ttl(tmp_path: Path, clock: Clock) -> None:
    store = _store(tmp_path, clock, ttl=60)
    store.remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET))

    clock.now += 59
    assert await store.lookup(HOST) is not None
    clock.now += 2
    assert await store.lookup(HOST) is None
    assert store.entries() == []


async def test_ttl_zero_keeps_entries_until_forgotten(tmp_path: Path, clock: Clock) -> None:
    store = _store(tmp_path, clock, ttl=0)
    store.remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET))
    clock.now += 10 * 365 * 86400
    assert [e.expires_at for e in store.entries()] == [None]

    assert await _store(tmp_path, clock, ttl=0).lookup(HOST) == Credential("alice", SECRET)
    assert store.forget(f"{HOST}/a:v1")
    assert await store.lookup(HOST) is None
    assert not store.forget(f"{HOST}/a:v1")


async def test_entries_survive_a_restart_until_they_expire(tmp_path: Path, clock: Clock) -> None:
    first = _store(tmp_path, clock, ttl=100)
    first.remember(f"{HOST}/a:v1", HOST, Credential(identity_token=SECRET))

    second = _store(tmp_path, clock, ttl=100)
    assert await second.lookup(HOST) == Credential(identity_token=SECRET)
    [entry] = second.entries()
    assert (entry.image, entry.host, entry.kind) == (f"{HOST}/a:v1", HOST, "identity-token")
    assert entry.expires_at == clock.now + 100

    clock.now += 101
    assert await _store(tmp_path, clock, ttl=100).lookup(HOST) is None


async def test_revert_restores_the_previous_entry(tmp_path: Path, clock: Clock) -> None:
    store = _store(tmp_path, clock)
    image = f"{HOST}/a:v1"
    store.remember(image, HOST, Credential("alice", "good"))
    previous = store.remember(image, HOST, Credential("alice", "wrong"))
    store.revert(image, previous)
    assert await _store(tmp_path, clock).lookup(HOST) == Credential("alice", "good")

    fresh = store.remember("x.example/b:v1", "x.example", Credential("bob", "wrong"))
    store.revert("x.example/b:v1", fresh)
    assert await store.lookup("x.example") is None


def test_secrets_are_encrypted_at_rest_with_a_root_only_key(tmp_path: Path, clock: Clock) -> None:
    store = _store(tmp_path, clock)
    store.remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET, "token-" + SECRET))

    directory = tmp_path / "cri"
    data = (directory / DATA_FILE).read_bytes()
    assert SECRET.encode() not in data and b"alice" not in data
    for path, mode in ((directory, 0o700), (directory / KEY_FILE, 0o600),
                       (directory / DATA_FILE, 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert (directory / KEY_FILE).stat().st_uid == os.geteuid()


def test_secrets_never_reach_the_log(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = _store(tmp_path, clock)
    previous = store.remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET))
    store.revert(f"{HOST}/a:v1", previous)
    store.remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET))
    _store(tmp_path, clock)
    store.forget(f"{HOST}/a:v1")

    assert caplog.records, "the store says what it does"
    assert SECRET not in caplog.text
    assert SECRET not in repr(store.entries()) + repr(Credential("alice", SECRET))


@pytest.mark.allow_log_errors
async def test_undecryptable_data_starts_empty_and_is_replaced(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    _store(tmp_path, clock).remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET))
    (tmp_path / "cri" / KEY_FILE).write_bytes(b"A" * 43 + b"=")  # valid Fernet key, wrong one

    store = _store(tmp_path, clock)
    assert await store.lookup(HOST) is None
    assert "unreadable (InvalidToken)" in caplog.text
    store.remember(f"{HOST}/b:v1", HOST, Credential("bob", SECRET))
    assert await _store(tmp_path, clock).lookup(HOST) == Credential("bob", SECRET)


def test_lost_key_discards_the_data_it_encrypted(tmp_path: Path, clock: Clock) -> None:
    _store(tmp_path, clock).remember(f"{HOST}/a:v1", HOST, Credential("alice", SECRET))
    (tmp_path / "cri" / KEY_FILE).unlink()

    store = _store(tmp_path, clock)  # no warning: a new key, and no stale data to fail on
    assert store.entries() == []
    assert not (tmp_path / "cri" / DATA_FILE).exists()


@pytest.mark.allow_log_errors
def test_key_readable_by_others_is_tightened(tmp_path: Path, clock: Clock) -> None:
    _store(tmp_path, clock)
    key = tmp_path / "cri" / KEY_FILE
    key.chmod(0o644)

    _store(tmp_path, clock)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_key_that_is_a_symlink_is_refused(tmp_path: Path, clock: Clock) -> None:
    directory = tmp_path / "cri"
    directory.mkdir()
    (tmp_path / "elsewhere").write_bytes(b"A" * 43 + b"=")
    (directory / KEY_FILE).symlink_to(tmp_path / "elsewhere")

    with pytest.raises(UnsafeKeyFile):
        _store(tmp_path, clock)
