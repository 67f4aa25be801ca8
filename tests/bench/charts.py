"""PNG charts of a run's summary: cold-start bars per image and mode, bytes fetched vs size.

Optional: without matplotlib the run still writes its JSON and table, and says so.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["write_charts"]


def write_charts(summary: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write `<out stem>-cold-start.png` and `<out stem>-bytes.png`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cold = [r for r in summary if r["part"] == "cold_start"]
    if not cold:
        return []
    written = []

    exit_s: dict[str, dict[str, float]] = defaultdict(dict)
    for r in cold:
        if r["metric"] == "exit_s":
            exit_s[r["case"]][r["variant"]] = r["median"]
    cases = sorted(exit_s)
    modes = sorted({m for c in exit_s.values() for m in c}, key=lambda m: (m != "overlayfs", m))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, [exit_s[c].get(mode, 0) for c in cases], width, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([c.replace(" @ ", "\n") for c in cases], fontsize=8)
    ax.set_ylabel("pull + run until exit (s, median)")
    ax.set_title("Cold start")
    ax.legend()
    fig.tight_layout()
    path = out.with_name(out.stem + "-cold-start.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fetched: dict[str, dict[str, float]] = defaultdict(dict)
    for r in cold:
        if r["metric"] == "bytes":
            image = r["case"].split(" @ ")[0]
            fetched[image][r["variant"]] = max(fetched[image].get(r["variant"], 0), r["median"])
    images = sorted(fetched)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(images)), 4))
    for i, mode in enumerate(modes):
        xs = [j + i * width for j in range(len(images))]
        ax.bar(xs, [fetched[im].get(mode, 0) / 1e6 for im in images], width, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(images))])
    ax.set_xticklabels(images)
    ax.set_ylabel("MB from the registry until exit (median)")
    ax.set_title("Bytes fetched (overlayfs = whole image)")
    ax.legend()
    fig.tight_layout()
    path = out.with_name(out.stem + "-bytes.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
