from __future__ import annotations

import email.utils
import random

import pytest
import trio

from snapshotter.registry.errors import RangeNotSupported, RegistryUnavailable
from snapshotter.registry.retry import RetryPolicy, parse_retry_after, with_retries

POLICY = RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=8.0, total_time=60.0)


class Script:
    """Plays a list of outcomes: "ok", or an exception to raise; records call times."""

    def __init__(self, steps: list[object]) -> None:
        self.steps = list(steps)
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.times.append(trio.current_time())
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return str(step)


def unavailable(retry_after: float | None = None) -> RegistryUnavailable:
    return RegistryUnavailable("503", retry_after=retry_after)


async def test_succeeds_after_transient_failures(autojump_clock: object) -> None:
    script = Script([unavailable(), unavailable(), "ok"])
    assert await with_retries(POLICY, script, what="t") == "ok"
    assert len(script.times) == 3


async def test_backoff_is_jittered_and_grows(autojump_clock: object) -> None:
    script = Script([unavailable(), unavailable(), unavailable(), "ok"])
    await with_retries(POLICY, script, what="t", rng=random.Random(7))
    gaps = [b - a for a, b in zip(script.times, script.times[1:], strict=False)]
    assert all(0 <= g <= cap for g, cap in zip(gaps, [1.0, 2.0, 4.0], strict=True))


async def test_honours_retry_after(autojump_clock: object) -> None:
    script = Script([unavailable(retry_after=7.0), "ok"])
    await with_retries(POLICY, script, what="t")
    assert 7.0 <= script.times[1] - script.times[0] <= 7.0 + POLICY.base_delay


async def test_gives_up_after_max_attempts(autojump_clock: object) -> None:
    script = Script([unavailable()] * 10)
    with pytest.raises(RegistryUnavailable):
        await with_retries(POLICY, script, what="t")
    assert len(script.times) == POLICY.max_attempts


async def test_retry_after_beyond_budget_gives_up_at_once(autojump_clock: object) -> None:
    script = Script([unavailable(retry_after=3600.0), "ok"])
    start = trio.current_time()
    with pytest.raises(RegistryUnavailable):
        await with_retries(POLICY, script, what="t")
    assert trio.current_time() - start < 1.0 and len(script.times) == 1


async def test_total_time_bounds_a_hanging_attempt(autojump_clock: object) -> None:
    async def hang() -> str:
        await trio.sleep_forever()
        raise AssertionError

    start = trio.current_time()
    with pytest.raises(RegistryUnavailable, match="no answer within 60s"):
        await with_retries(POLICY, hang, what="t")
    assert trio.current_time() - start == pytest.approx(60.0)


async def test_not_idempotent_or_not_retryable_fails_at_once(autojump_clock: object) -> None:
    script = Script([unavailable(), "ok"])
    with pytest.raises(RegistryUnavailable):
        await with_retries(POLICY, script, what="t", idempotent=False)
    script = Script([RangeNotSupported("x"), "ok"])
    with pytest.raises(RangeNotSupported):
        await with_retries(POLICY, script, what="t")
    assert len(script.times) == 1


async def test_other_errors_are_not_retried() -> None:
    script = Script([ValueError("boom"), "ok"])
    with pytest.raises(ValueError):
        await with_retries(POLICY, script, what="t")


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(when, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(1, usegmt=True), now=1_000_000) == 0.0
