"""A long-lived nursery that a service's callbacks spawn background work into."""

from __future__ import annotations

from typing import Any

import trio

__all__ = ["TaskHost"]


class TaskHost:
    """Base for trio services started with `nursery.start(service.run)`.

    `run` owns a nursery until cancelled; while it runs, `_nursery` is set and methods
    (called in the trio thread) may `start_soon` into it. Before `run` starts and after it
    ends, `_nursery` is None and such work is skipped.
    """

    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
