from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from snapshotter.registry.credentials import (
    ChainedCredentials,
    Credential,
    DockerConfigCredentials,
    StaticCredentials,
    default_docker_config,
)

HELPER = """#!/bin/sh
# A docker credential helper speaking the `get` protocol from a table in $HELPER_TABLE.
[ "$1" = get ] || exit 2
read -r server
echo "$server" >> "$HELPER_LOG"
case "$server" in
  reg.example) echo '{"ServerURL":"reg.example","Username":"helper-user","Secret":"helper-pw"}' ;;
  https://index.docker.io/v1/) echo '{"Username":"<token>","Secret":"hub-refresh"}' ;;
  broken.example) echo 'not json' ;;
  crash.example) echo "secret-in-stderr" >&2; exit 3 ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "docker-credential-test"
    script.write_text(HELPER)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "helper.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HELPER_LOG", str(log))
    return log


def config(tmp_path: Path, doc: dict) -> DockerConfigCredentials:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return DockerConfigCredentials(path)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_auths_base64_and_key_forms(tmp_path: Path) -> None:
    creds = config(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hubuser:hub:pw")},
                "http://127.0.0.1:5000": {"auth": b64("local:pw")},
                "reg.example": {"username": "u", "password": "p"},
                "tok.example": {"auth": b64("u2:"), "identitytoken": "refresh-1"},
            }
        },
    )
    assert await creds.lookup("docker.io") == Credential("hubuser", "hub:pw")
    assert await creds.lookup("127.0.0.1:5000") == Credential("local", "pw")
    assert await creds.lookup("reg.example") == Credential("u", "p")
    assert await creds.lookup("tok.example") == Credential("u2", "", "refresh-1")
    assert await creds.lookup("other.example") is None


async def test_missing_file_means_no_credentials(tmp_path: Path) -> None:
    assert await DockerConfigCredentials(tmp_path / "absent.json").lookup("docker.io") is None


@pytest.mark.allow_log_errors
async def test_bad_auth_field_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    creds = config(tmp_path, {"auths": {"reg.example": {"auth": "%%%not-base64-s3cret"}}})
    assert await creds.lookup("reg.example") is None
    assert "not base64" in caplog.text and "s3cret" not in caplog.text


async def test_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    creds = config(tmp_path, {"auths": {}})
    assert await creds.lookup("reg.example") is None
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {"reg.example": {"auth": b64("new:pw")}}})
    )
    assert await creds.lookup("reg.example") == Credential("new", "pw")


async def test_cred_helpers_per_host(tmp_path: Path, helper: Path) -> None:
    creds = config(
        tmp_path,
        {
            "credHelpers": {"reg.example": "test", "docker.io": "test"},
            "auths": {"reg.example": {"auth": b64("ignored:x")}},
        },
    )
    assert await creds.lookup("reg.example") == Credential("helper-user", "helper-pw")
    assert await creds.lookup("docker.io") == Credential(identity_token="hub-refresh")
    assert helper.read_text().splitlines() == ["reg.example", "https://index.docker.io/v1/"]


async def test_creds_store_falls_back_to_auths(tmp_path: Path, helper: Path) -> None:
    creds = config(
        tmp_path, {"credsStore": "test", "auths": {"plain.example": {"auth": b64("a:b")}}}
    )
    assert await creds.lookup("reg.example") == Credential("helper-user", "helper-pw")
    assert await creds.lookup("plain.example") == Credential("a", "b")  # helper: not found
    assert await creds.lookup("nowhere.example") is None


@pytest.mark.allow_log_errors
@pytest.mark.parametrize("host", ["broken.example", "crash.example"])
async def test_broken_helper_warns_without_secrets(
    tmp_path: Path, helper: Path, caplog, host: str
) -> None:
    creds = config(tmp_path, {"credHelpers": {host: "test"}})
    with caplog.at_level(logging.DEBUG):
        assert await creds.lookup(host) is None
    assert "docker-credential-test" in caplog.text
    assert "secret-in-stderr" not in caplog.text


@pytest.mark.allow_log_errors
async def test_missing_helper_warns(tmp_path: Path, caplog) -> None:
    creds = config(tmp_path, {"credsStore": "does-not-exist"})
    assert await creds.lookup("reg.example") is None
    assert "docker-credential-does-not-exist not found" in caplog.text


async def test_chain_and_static() -> None:
    first = StaticCredentials({"a": Credential("x", "1")})
    second = StaticCredentials({"a": Credential("y", "2"), "b": Credential("z", "3")})
    chain = ChainedCredentials([first, second])
    assert await chain.lookup("a") == Credential("x", "1")
    assert await chain.lookup("b") == Credential("z", "3")
    assert await chain.lookup("c") is None


def test_repr_hides_secrets() -> None:
    text = repr(Credential("user", "pa55", "tok3n")) + str(Credential("user", "pa55"))
    assert "pa55" not in text and "tok3n" not in text and "user" in text


def test_default_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert default_docker_config() == tmp_path / "config.json"
    monkeypatch.delenv("DOCKER_CONFIG")
    assert default_docker_config() == Path.home() / ".docker" / "config.json"
