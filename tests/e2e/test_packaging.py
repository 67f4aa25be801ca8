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
