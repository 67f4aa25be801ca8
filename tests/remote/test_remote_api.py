"""`__all__` of cache/ and remote/ names exactly what each module defines for others."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "snapshotter.cache.chunks",
    "snapshotter.remote.blob",
    "snapshotter.remote.layer",
    "snapshotter.remote.prefetch",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_the_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    defined = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(v) or inspect.isfunction(v))
        and v.__module__ == name
    }
    assert defined <= set(module.__all__)
    assert all(hasattr(module, n) for n in module.__all__)
