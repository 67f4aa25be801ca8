"""The benchmark suite's `--smoke` mode, run by CI so the harness cannot rot.

It checks that every part runs and produces the numbers the report is made of, not how
good they are: smoke images are tiny and one repetition on a shared machine is noise.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.__main__ import PARTS, main
from tests.e2e.harness import remove_tree

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.fuse, pytest.mark.slow]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Short, because the daemon's unix sockets live below it (sun_path is 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="lzb", dir="/tmp"))
    yield d
    remove_tree(d)


@pytest.mark.timeout(600)
def test_smoke_run_measures_every_part(tmp_path: Path, scratch: Path) -> None:
    out = tmp_path / "results" / "results.json"
    status = main(["--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                   "--scratch", str(scratch)])

    doc = json.loads(out.read_text())
    assert [n for n in doc["notes"] if "failed" in n] == []
    assert status == 0
    rows = doc["summary"]
    assert {r["part"] for r in rows} == set(PARTS)
    ratios = {(r["part"], r["case"], r["metric"], r["variant"]): r["ratio"] for r in rows}
    for image in ("pyslim", "manyfiles"):
        for cond in ("unshaped", "100mbit-20ms"):
            ratio = ratios[("cold_start", f"{image} @ {cond}", "exit_s", "lazysnap")]
            assert ratio is not None and ratio > 0
            # Lazy: the container started without downloading the whole image.
            fetched = ratios[("cold_start", f"{image} @ {cond}", "bytes", "lazysnap")]
            assert fetched is not None and fetched < 1.0
    assert ratios[("read_path", "seq warm", "throughput", "lazysnap")] is not None
    fresh = "seq cached, files just written (page cache dropped)"
    assert ratios[("read_path", fresh, "throughput", "lazysnap native dir")] is not None
    assert ratios[("metadata", "find -ls, second", "s", "lazysnap")] is not None
    assert ratios[("nonlazy", "pyslim @ unshaped", "exit_s", "lazysnap-gzip")] is not None
    by_metric = {(r["part"], r["metric"], r["variant"]): r["median"] for r in rows}
    assert by_metric[("memory", "bytes_per_entry", "lazysnap")] > 0
    assert by_metric[("memory", "parser_idle_VmRSS", "lazysnap")] > 0  # the TOC parser runs
    assert by_metric[("sharing", "refetched_shared_bytes", "lazysnap")] == 0
    assert by_metric[("sharing", "bytes_ratio", "lazysnap")] <= 1.05
    # Every measurement was also written as a JSON line, and the table beside it.
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    assert len(lines) == len(doc["records"])
    assert "| cold_start |" in out.with_suffix(".md").read_text()
