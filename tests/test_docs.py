"""The configuration reference in README and the example config name every key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from snapshotter.config import Config

REPO = Path(__file__).resolve().parents[1]
KEYS = [f.name for f in dataclasses.fields(Config)]


@pytest.mark.parametrize("doc", ["README.md", "packaging/config.toml"])
def test_every_config_key_is_documented(doc: str) -> None:
    text = (REPO / doc).read_text()
    missing = [k for k in KEYS if f"`{k}`" not in text and f"\n{k} =" not in text
               and f"\n# {k} =" not in text]
    assert not missing, f"{doc} does not document {missing}"
