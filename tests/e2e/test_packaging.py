"""packaging/ stays in step with the code: the example config names every key with its default,
the containerd snippet is valid TOML wired to lazysnap, and the unit starts the console script."""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import tomllib

from snapshotter import config
from tests.e2e.harness import REPO_ROOT

PACKAGING = REPO_ROOT / "packaging"


def test_example_config_lists_every_key_with_its_default() -> None:
    text = (PACKAGING / "config.toml").read_text()

    assert set(tomllib.loads(text)) == {f.name for f in dataclasses.fields(config.Config)}
    loaded = config.load(argparse.Namespace(config=PACKAGING / "config.toml"))
    assert loaded == config.Config()


def test_containerd_snippet_points_cri_and_the_proxy_plugin_at_lazysnap() -> None:
    snippet = tomllib.loads((PACKAGING / "containerd-config.toml").read_text())

    plugin = snippet["proxy_plugins"]["lazysnap"]
    assert plugin["type"] == "snapshot"
    assert plugin["address"] == str(config.Config().address)
    cri = snippet["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "lazysnap", "disable_snapshot_annotations": False}


def test_systemd_unit_runs_lazysnap_serve() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(PACKAGING / "lazysnap.service")

    assert unit["Service"]["ExecStart"].split()[:2] == ["/usr/local/bin/lazysnap", "serve"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_containerd_drop_in_registers_only_the_proxy_plugin() -> None:
    """An imported CRI section would replace config.toml's whole CRI section in containerd 1.x."""
    drop_in = tomllib.loads((PACKAGING / "containerd/lazysnap.toml").read_text())

    assert set(drop_in) == {"version", "proxy_plugins"}
    plugin = drop_in["proxy_plugins"]["lazysnap"]
    assert plugin["type"] == "snapshot"
    assert plugin["address"] == str(config.Config().address)
    assert plugin["exports"]["root"].rstrip("/") == str(config.Config().root)


def _manifest(name: str) -> dict[str, dict]:
    import yaml

    docs = yaml.safe_load_all((PACKAGING / "kubernetes" / name).read_text())
    return {d["kind"]: d for d in docs}


def _pod(name: str) -> dict:
    return _manifest(name)["DaemonSet"]["spec"]["template"]["spec"]


def test_in_pod_daemonset_shares_mounts_fuse_and_the_socket_with_the_node() -> None:
    pod = _pod("lazysnap-daemonset.yaml")
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    defaults = config.Config()

    assert pod["hostPID"] is True
    assert container["securityContext"]["privileged"] is True
    assert mounts["state"]["mountPath"] == host["state"] == str(defaults.root)
    assert mounts["state"]["mountPropagation"] == "Bidirectional"
    assert mounts["fuse"]["mountPath"] == host["fuse"] == "/dev/fuse"
    assert host["run"] == mounts["run"]["mountPath"] == str(defaults.address.parent)
    cfg = tomllib.loads(_manifest("lazysnap-daemonset.yaml")["ConfigMap"]["data"]["config.toml"])
    assert cfg["address"] == str(defaults.address)
    assert container["args"] == ["serve", "--config", "/etc/lazysnap/config.toml"]


def test_installer_daemonset_enters_the_node_and_its_config_is_valid(tmp_path) -> None:
    pod = _pod("lazysnap-installer.yaml")
    (container,) = pod["containers"]
    text = _manifest("lazysnap-installer.yaml")["ConfigMap"]["data"]["config.toml"]
    (tmp_path / "config.toml").write_text(text)

    assert pod["hostPID"] is True
    assert container["securityContext"]["privileged"] is True
    assert container["command"] == ["/usr/share/lazysnap/install-on-host.sh"]
    loaded = config.load(argparse.Namespace(config=tmp_path / "config.toml"))
    assert loaded.address == config.Config().address
    assert "install-on-host.sh" in (PACKAGING / "kubernetes/Dockerfile").read_text()
