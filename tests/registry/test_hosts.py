from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.registry.hosts import ALL_CAPABILITIES, load_endpoints


def write(hosts_dir: Path, host: str, text: str) -> None:
    (hosts_dir / host).mkdir(parents=True, exist_ok=True)
    (hosts_dir / host / "hosts.toml").write_text(text)


def test_without_hosts_toml_the_registry_over_https(tmp_path: Path) -> None:
    [ep] = load_endpoints(tmp_path, "registry.example:5000")
    assert ep.base_url == "https://registry.example:5000/v2"
    assert ep.capabilities == ALL_CAPABILITIES
    assert not ep.http_fallback and not ep.is_mirror


def test_docker_hub_default_server() -> None:
    [ep] = load_endpoints(None, "docker.io")
    assert ep.base_url == "https://registry-1.docker.io/v2"
    assert ep.upstream == "docker.io"


@pytest.mark.parametrize("host", ["localhost:5000", "127.0.0.1:5000", "[::1]:5000"])
def test_loopback_without_hosts_toml_may_fall_back_to_http(tmp_path: Path, host: str) -> None:
    [ep] = load_endpoints(tmp_path, host)
    assert ep.scheme == "https" and ep.http_fallback
    plain = ep.as_plain_http()
    assert plain.base_url == f"http://{host}/v2" and not plain.http_fallback


def test_loopback_with_hosts_toml_uses_what_it_says(tmp_path: Path) -> None:
    write(tmp_path, "127.0.0.1:5000", 'server = "https://127.0.0.1:5000"\n')
    [ep] = load_endpoints(tmp_path, "127.0.0.1:5000")
    assert ep.scheme == "https" and not ep.http_fallback


def test_mirrors_in_file_order_then_server(tmp_path: Path) -> None:
    write(
        tmp_path,
        "docker.io",
        """
server = "https://registry-1.docker.io"

[host."https://mirror-b.example"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  ca = "certs/b-ca.pem"
  client = [["certs/c.cert", "certs/c.key"]]
  [host."https://mirror-b.example".header]
    x-custom = ["1", "2"]

[host."http://mirror-a.example:8080/some/prefix"]
  capabilities = ["pull"]
  override_path = true
""",
    )
    eps = load_endpoints(tmp_path, "docker.io")
    assert [ep.base_url for ep in eps] == [
        "https://mirror-b.example/v2",
        "http://mirror-a.example:8080/some/prefix",
        "https://registry-1.docker.io/v2",
    ]
    b, a, server = eps
    assert b.is_mirror and a.is_mirror and not server.is_mirror
    assert b.capabilities == {"pull", "resolve"} and a.capabilities == {"pull"}
    assert server.capabilities == ALL_CAPABILITIES
    assert b.skip_verify and not a.skip_verify
    assert b.ca == (tmp_path / "docker.io" / "certs/b-ca.pem",)
    d = tmp_path / "docker.io"
    assert b.client_certs == ((d / "certs/c.cert", d / "certs/c.key"),)
    assert b.headers == (("x-custom", "1"), ("x-custom", "2"))
    assert {ep.upstream for ep in eps} == {"docker.io"}


def test_server_options_at_top_level(tmp_path: Path) -> None:
    write(
        tmp_path,
        "reg.example",
        'server = "https://reg.example"\nca = ["/abs/ca.pem"]\nclient = "/abs/client.pem"\n',
    )
    [ep] = load_endpoints(tmp_path, "reg.example")
    assert ep.ca == (Path("/abs/ca.pem"),)
    assert ep.client_certs == ((Path("/abs/client.pem"), None),)


def test_default_directory_applies_to_unlisted_hosts(tmp_path: Path) -> None:
    write(tmp_path, "_default", '[host."https://cache.example"]\n  capabilities = ["pull"]\n')
    eps = load_endpoints(tmp_path, "quay.io")
    assert [ep.base_url for ep in eps] == ["https://cache.example/v2", "https://quay.io/v2"]
    assert eps[0].upstream == "quay.io"


@pytest.mark.parametrize(
    "text",
    [
        "server = [",
        'server = "ftp://x"',
        '[host."https://m"]\n capabilities = ["fly"]',
        '[host."https://m"]\n skip_verify = "yes"',
        '[host."https://m"]\n client = [["a", "b", "c"]]',
        "server = 5",
    ],
)
def test_invalid_files_are_invalid_argument(tmp_path: Path, text: str) -> None:
    write(tmp_path, "reg.example", text)
    with pytest.raises(InvalidArgument, match=r"reg\.example"):
        load_endpoints(tmp_path, "reg.example")


def test_endpoints_without_tls_settings_share_one_verifying_context(tmp_path: Path) -> None:
    import ssl

    from snapshotter.registry.tls import ssl_context

    write(tmp_path, "r.example", '[host."https://m.example"]\n  skip_verify = true\n')
    mirror, server = load_endpoints(tmp_path, "r.example")
    plain = load_endpoints(tmp_path, "other.example")[0]
    shared = ssl_context(None)
    assert ssl_context(server) is shared and ssl_context(plain) is shared
    lax = ssl_context(mirror)
    # skip_verify gets a context of its own: the shared one must keep verifying.
    assert lax is not shared and lax.verify_mode == ssl.CERT_NONE
    assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname
