"""Regenerate tests/e2e/_cri_proto from tests/e2e/cri_proto.

Run: python tests/e2e/cri_proto/generate.py

The generated modules import each other through the `tests.e2e._cri_proto` package;
tests/cri/test_cri_proto_fresh.py fails if the checked-in code is stale.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE = "tests.e2e._cri_proto"
TARGET = PROTO_DIR.parent / "_cri_proto"
FILES = ["runtime/v1/api.proto"]


def generate(out_dir: Path) -> None:
    """Write the generated package into out_dir (which is created)."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                          f"--grpc_python_out={tmp}", *(str(PROTO_DIR / f) for f in FILES)])
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")
        for src in sorted(Path(tmp).rglob("*.py*")):
            dest = out_dir / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = re.sub(r"^from runtime\.", f"from {PACKAGE}.runtime.", src.read_text(),
                          flags=re.M)
            # Generated code follows protoc's style, not ours.
            dest.write_text("# ruff: noqa\n" + text)
    for d in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()


def main() -> None:
    if TARGET.exists():
        shutil.rmtree(TARGET)
    generate(TARGET)
    print(f"generated {TARGET}", file=sys.stderr)


if __name__ == "__main__":
    main()
