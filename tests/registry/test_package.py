"""Completeness: public names are exported, and registry errors keep their categories."""

from __future__ import annotations

import inspect

import snapshotter.registry as registry
from snapshotter.errors import category
from snapshotter.registry import errors as registry_errors


def test_all_matches_public_names() -> None:
    public = {n for n in vars(registry) if not n.startswith("_") and n[0].isupper()}
    assert set(registry.__all__) == public
    assert set(registry_errors.__all__) == {
        n
        for n, v in vars(registry_errors).items()
        if inspect.isclass(v) and v.__module__ == registry_errors.__name__
    }


def test_every_registry_error_has_a_category() -> None:
    for name in registry_errors.__all__:
        cls = getattr(registry_errors, name)
        assert category(cls("x")) is not None, name
