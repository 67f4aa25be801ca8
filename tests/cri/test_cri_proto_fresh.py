"""The checked-in CRI test client code must be what its generator produces."""

from __future__ import annotations

import filecmp
import importlib.util
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "tests" / "e2e" / "cri_proto" / "generate.py"


def test_generated_cri_client_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("cri_proto_generate", GENERATOR)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate(tmp_path / "out")

    fresh = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.py*"))
    ours = sorted(p.relative_to(mod.TARGET) for p in mod.TARGET.rglob("*.py*"))
    assert fresh == ours, f"file list differs: run `python {GENERATOR.relative_to(REPO)}`"
    stale = [str(p) for p in fresh
             if not filecmp.cmp(tmp_path / "out" / p, mod.TARGET / p, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `python {GENERATOR.relative_to(REPO)}`"


def test_package_exports_every_public_name() -> None:
    import snapshotter.cri as pkg

    public = {n for n, v in vars(pkg).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert set(pkg.__all__) == public
