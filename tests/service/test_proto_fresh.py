"""The checked-in generated code must be what `python proto/generate.py` produces."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path / "_proto")
    checked_in = REPO / "snapshotter" / "service" / "_proto"
    fresh = sorted(p.relative_to(tmp_path / "_proto") for p in (tmp_path / "_proto").rglob("*.py*"))
    ours = sorted(p.relative_to(checked_in) for p in checked_in.rglob("*.py*"))
    assert fresh == ours, "file list differs: run `python proto/generate.py`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / "_proto" / p, checked_in / p,
                                                      shallow=False)]
    assert not stale, f"stale generated code {stale}: run `python proto/generate.py`"
