"""How a conversion reports progress: a Protocol, and renderings for a terminal, a log, nobody.

The pipeline calls these from the trio thread and (`advance`) from worker threads, so
every implementation must be thread-safe. `rich` is imported only for a terminal.
"""

from __future__ import annotations

import threading
import time
from typing import IO, Any, Protocol

__all__ = ["ConvertProgress", "LineProgress", "NullProgress", "RichProgress", "human_size"]


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ConvertProgress(Protocol):
    """Lifecycle: `start` once, then per layer `layer_started`, `phase`*, `advance`*,
    `layer_done`; `note` any time; `close` at the end, on success and on failure.

    `key` is the source layer digest; `fetched` counts bytes downloaded (registry
    sources only), `advance` compressed source bytes converted.
    """

    def start(self, layers: int, total_bytes: int) -> None: ...
    def layer_started(self, key: str, size: int) -> None: ...
    def phase(self, key: str, phase: str) -> None: ...
    def fetched(self, key: str, nbytes: int) -> None: ...
    def advance(self, key: str, nbytes: int) -> None: ...
    def layer_done(self, key: str, before: int, after: int, uploaded: bool) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    def start(self, layers: int, total_bytes: int) -> None:
        pass

    def layer_started(self, key: str, size: int) -> None:
        pass

    def phase(self, key: str, phase: str) -> None:
        pass

    def fetched(self, key: str, nbytes: int) -> None:
        pass

    def advance(self, key: str, nbytes: int) -> None:
        pass

    def layer_done(self, key: str, before: int, after: int, uploaded: bool) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress(NullProgress):
    """One line per finished layer: for logs and pipes, where bars would be noise."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._done = 0
        self._layers = 0
        self._started: dict[str, float] = {}

    def _line(self, text: str) -> None:
        with self._lock:
            print(text, file=self._out, flush=True)

    def start(self, layers: int, total_bytes: int) -> None:
        self._layers = layers
        self._line(f"converting {layers} layers, {human_size(total_bytes)}")

    def layer_started(self, key: str, size: int) -> None:
        self._started[key] = time.monotonic()

    def layer_done(self, key: str, before: int, after: int, uploaded: bool) -> None:
        with self._lock:
            self._done += 1
            n = self._done
        took = time.monotonic() - self._started.get(key, time.monotonic())
        pushed = "pushed" if uploaded else "already at destination"
        self._line(
            f"[{n}/{self._layers}] {key[:19]}: {human_size(before)} -> {human_size(after)} "
            f"in {took:.1f}s ({pushed})"
        )

    def note(self, text: str) -> None:
        self._line(text)


class RichProgress(NullProgress):
    """Bars on a terminal: one for all bytes, one per layer in flight."""

    def __init__(self, out: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._console = Console(file=out)
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._total: Any = None
        self._lock = threading.Lock()
        self._layers = 0
        self._done = 0

    def start(self, layers: int, total_bytes: int) -> None:
        self._layers = layers
        self._bars.start()
        self._total = self._bars.add_task(f"layers 0/{layers}", total=total_bytes)

    def layer_started(self, key: str, size: int) -> None:
        with self._lock:
            self._tasks[key] = self._bars.add_task(f"  {key[7:19]} fetch", total=size)

    def phase(self, key: str, phase: str) -> None:
        task = self._tasks.get(key)
        if task is not None:
            description = f"  {key[7:19]} {phase}"
            if phase == "convert":  # the bar fills once while fetching, again converting
                self._bars.reset(task, description=description)
            else:
                self._bars.update(task, description=description)

    def fetched(self, key: str, nbytes: int) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._bars.advance(task, nbytes)

    def advance(self, key: str, nbytes: int) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._bars.advance(task, nbytes)
        self._bars.advance(self._total, nbytes)

    def layer_done(self, key: str, before: int, after: int, uploaded: bool) -> None:
        with self._lock:
            self._done += 1
            task = self._tasks.pop(key, None)
        if task is not None:
            self._bars.remove_task(task)
        self._bars.update(self._total, description=f"layers {self._done}/{self._layers}")
        pushed = "pushed" if uploaded else "already at destination"
        self.note(f"{key[:19]}: {human_size(before)} -> {human_size(after)} ({pushed})")

    def note(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._bars.stop()
