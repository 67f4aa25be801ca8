"""Bounded retries: exponential backoff with full jitter, honouring `Retry-After`.

Only `RegistryUnavailable` (connect errors, timeouts, 429, 5xx) is retried, and only for
requests the caller declares idempotent. Attempts and total time are both bounded.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from snapshotter.registry.errors import RegistryUnavailable

__all__ = ["RetryPolicy", "parse_retry_after", "with_retries"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`max_attempts` tries within `total_time` seconds (sleeps and attempts together).

    The n-th retry waits uniform(0, min(max_delay, base_delay * 2**(n-1))) seconds, or
    the server's Retry-After (plus a little jitter) when it sent one. A Retry-After
    beyond the remaining time ends the retries at once instead of sleeping past it.
    """

    max_attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0
    total_time: float = 120.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


_rng = random.Random()


async def with_retries(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    idempotent: bool = True,
    rng: random.Random = _rng,
) -> T:
    """Run `attempt` until it succeeds, raises a non-retryable error, or the budget ends."""
    deadline = trio.current_time() + policy.total_time
    for n in range(1, policy.max_attempts + 1):
        try:
            with trio.move_on_at(deadline) as scope:
                return await attempt()
            raise RegistryUnavailable(f"{what}: no answer within {policy.total_time:g}s")
        except RegistryUnavailable as exc:
            if scope.cancelled_caught or not (idempotent and exc.retryable):
                raise
            if n == policy.max_attempts:
                raise
            if exc.retry_after is not None:
                delay = exc.retry_after + rng.uniform(0.0, policy.base_delay)
            else:
                delay = policy.backoff(n, rng)
            if trio.current_time() + delay >= deadline:
                raise
            log.debug("%s: attempt %d failed (%s); retrying in %.2fs", what, n, exc, delay)
            await trio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
