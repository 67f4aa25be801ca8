"""Completeness: each convert module exports exactly what it defines, every convert error
has a category (and so an exit code), and the package re-exports the public API."""

from __future__ import annotations

import importlib
import inspect

import pytest

import snapshotter.convert as convert
from snapshotter.cli import EXIT_CODES
from snapshotter.convert import errors as convert_errors
from snapshotter.errors import category

MODULES = ["errors", "layer", "mediatypes", "pipeline", "progress", "rewrite", "stores"]


@pytest.mark.parametrize("name", MODULES)
def test_all_matches_what_the_module_defines(name: str) -> None:
    module = importlib.import_module(f"snapshotter.convert.{name}")
    defined = {
        n for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(v) or inspect.isfunction(v))
        and v.__module__ == module.__name__
    }
    assert defined <= set(module.__all__), name
    assert all(hasattr(module, n) for n in module.__all__)


def test_package_exports_resolve() -> None:
    assert all(hasattr(convert, n) for n in convert.__all__)


def test_every_convert_error_has_an_exit_code() -> None:
    for name in convert_errors.__all__:
        cat = category(getattr(convert_errors, name)("x"))
        assert cat is not None and cat in EXIT_CODES, name
