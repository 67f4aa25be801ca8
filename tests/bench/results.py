"""Measurements, their medians and ratios against the baseline measured in the same run.

Each measurement is one `Record` (written as a JSON line as soon as it is taken, so a run
that dies half-way keeps what it measured). The summary groups records by
(part, case, metric), takes the median over repetitions for each variant, and divides by
the baseline variant's median: `ratio < 1` is faster for times, slower for throughputs
(the `better` column says which way is good).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Record", "Results", "machine_info"]


@dataclass(frozen=True)
class Record:
    part: str  # cold_start, read_path, metadata, memory, sharing, nonlazy
    case: str  # e.g. "pystack @ 100mbit-20ms"
    variant: str  # the mode, or "native"
    metric: str  # e.g. "exit_s", "seq_MBps", "bytes"
    value: float
    unit: str
    rep: int = 0
    baseline: str = ""  # the variant this metric is compared with ("" = none)
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def machine_info() -> dict[str, Any]:
    def _cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0]
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "host": platform.node(), "kernel": platform.release(), "cpu": cpu,
        "cpus": os.cpu_count(), "memory": meminfo.split(":", 1)[1].strip(),
        "containerd": _cmd("containerd", "--version"),
        "commit": _cmd("git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


class Results:
    def __init__(self, out: Path | None, meta: dict[str, Any]) -> None:
        self.records: list[Record] = []
        self.notes: list[str] = []
        self.meta = meta
        self.out = out
        self._lines = None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._lines = open(out.with_suffix(".jsonl"), "w")  # noqa: SIM115

    def add(self, record: Record) -> None:
        self.records.append(record)
        if self._lines is not None:
            self._lines.write(json.dumps(asdict(record)) + "\n")
            self._lines.flush()

    def note(self, text: str) -> None:
        """A line for the report: a skipped mode, a missed target, a check that failed."""
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def summary(self) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str, str], dict[str, list[Record]]] = defaultdict(
            lambda: defaultdict(list))
        for r in self.records:
            groups[(r.part, r.case, r.metric)][r.variant].append(r)
        rows = []
        for (part, case, metric), by_variant in groups.items():
            medians = {v: statistics.median(r.value for r in rs) for v, rs in by_variant.items()}
            any_r = next(iter(by_variant.values()))[0]
            base = any_r.baseline
            for variant, median in medians.items():
                ratio = None
                if base and base in medians and variant != base and medians[base]:
                    ratio = median / medians[base]
                rows.append({
                    "part": part, "case": case, "metric": metric, "variant": variant,
                    "median": median, "unit": any_r.unit, "n": len(by_variant[variant]),
                    "baseline": base, "ratio": ratio,
                    "better": "higher" if any_r.higher_is_better else "lower",
                })
        return rows

    def table(self) -> str:
        rows = self.summary()
        lines = [
            f"# lazysnap benchmark ({self.meta.get('mode', '')})",
            "",
            "machine: " + ", ".join(f"{k} {v}" for k, v in self.meta.get("machine", {}).items()),
            "conditions: " + "; ".join(f"{k} = {v}" for k, v in
                                       self.meta.get("conditions", {}).items()),
            "",
            "| part | case | metric | variant | median | n | ratio vs baseline | better |",
            "|---|---|---|---|---:|---:|---:|---|",
        ]
        for r in rows:
            ratio = f"{r['ratio']:.2f}x {r['baseline']}" if r["ratio"] is not None else ""
            lines.append(
                f"| {r['part']} | {r['case']} | {r['metric']} | {r['variant']} | "
                f"{_fmt(r['median'], r['unit'])} | {r['n']} | {ratio} | {r['better']} |")
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self._lines is not None:
            self._lines.close()
            self._lines = None
        if self.out is None:
            return
        doc = {"meta": self.meta, "summary": self.summary(), "notes": self.notes,
               "records": [asdict(r) for r in self.records]}
        self.out.write_text(json.dumps(doc, indent=1))
        try:
            from tests.bench.charts import write_charts

            write_charts(doc["summary"], self.out)
        except ImportError:
            self.notes.append("no charts: matplotlib is not installed")
        self.out.with_suffix(".md").write_text(self.table())


def _fmt(value: float, unit: str) -> str:
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB"):
            if abs(value) < 1024 or u == "GiB":
                return f"{value:.0f} {u}" if u == "B" else f"{value:.1f} {u}"
            value /= 1024
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.3g} {unit}"
