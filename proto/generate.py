"""Regenerate snapshotter/service/_proto from proto/ (run: python proto/generate.py).

Generated modules are rewritten to import each other through the package, so they
need no sys.path tricks; tests/service/test_proto_fresh.py fails if they are stale.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE = "snapshotter.service._proto"
FILES = [
    "containerd/types/mount.proto",
    "containerd/services/snapshots/v1/snapshots.proto",
    "lazysnap/cri/v1/pull.proto",
]


def generate(out_dir: Path) -> None:
    """Write the generated package into out_dir (which is created)."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(
            [
                "protoc",
                f"-I{PROTO_DIR}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *(str(PROTO_DIR / f) for f in FILES),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = re.sub(r"^from containerd\.", f"from {PACKAGE}.containerd.", src.read_text(),
                          flags=re.M)
            dest.write_text(text)
        for d in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
            (d / "__init__.py").touch()


def main() -> None:
    target = PROTO_DIR.parent / "snapshotter" / "service" / "_proto"
    if target.exists():
        shutil.rmtree(target)
    generate(target)
    print(f"generated {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
