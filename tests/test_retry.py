"""agent.retry: the backoff schedule and the retry loop, with fixed randomness and a fake clock."""

from __future__ import annotations

import random

import pytest

from agent.errors import BadCredentials, UpstreamTimeout, UpstreamUnavailable
from agent.retry import RetryPolicy, retry_call


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Throttled(UpstreamUnavailable):
    def __init__(self, retry_after: float) -> None:
        super().__init__("busy")
        self.retry_after = retry_after


class Failing:
    """An async callable that raises ``errors`` one per call, then returns "done"."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = list(errors)
        self.calls: list[int] = []

    async def __call__(self) -> str:
        self.calls.append(1)
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_backoff_is_full_jitter_under_a_capped_exponential() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0)
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(10.0, 2 ** (attempt - 1))
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # the whole range is used, not just the bottom


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0)
    first = [policy.backoff(n, random.Random(1)) for n in range(1, 8)]
    second = [policy.backoff(n, random.Random(1)) for n in range(1, 8)]
    assert first == second
    expected = [random.Random(1).uniform(0, min(30.0, 0.5 * 2 ** (n - 1))) for n in range(1, 8)]
    assert first == expected


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert RetryPolicy(max_delay=30.0).backoff(10_000, random.Random(0)) <= 30.0


async def test_retries_transient_errors_until_success() -> None:
    time = FakeTime()
    fn = Failing([UpstreamUnavailable("503")] * 3)
    result = await retry_call(
        fn, RetryPolicy(max_attempts=5), sleep=time.sleep, clock=time.clock, rng=random.Random(0)
    )
    assert result == "done"
    assert len(fn.calls) == 4
    assert len(time.sleeps) == 3


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    time = FakeTime()
    errors: list[BaseException] = [UpstreamUnavailable(f"fail {n}") for n in range(10)]
    fn = Failing(errors)
    with pytest.raises(UpstreamUnavailable, match="fail 2"):
        await retry_call(fn, RetryPolicy(max_attempts=3), sleep=time.sleep, clock=time.clock)
    assert len(fn.calls) == 3
    assert len(time.sleeps) == 2


async def test_gives_up_when_the_next_wait_would_pass_max_total() -> None:
    time = FakeTime()
    policy = RetryPolicy(base_delay=4.0, max_delay=4.0, max_attempts=None, max_total=10.0)
    fn = Failing([UpstreamTimeout("slow")] * 100)
    with pytest.raises(UpstreamTimeout):
        await retry_call(fn, policy, sleep=time.sleep, clock=time.clock, rng=random.Random(3))
    assert time.now <= 10.0
    assert 1 < len(fn.calls) < 100


async def test_no_attempt_limit_keeps_going() -> None:
    time = FakeTime()
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0, max_attempts=None, max_total=None)
    fn = Failing([UpstreamUnavailable("down")] * 50)
    assert await retry_call(fn, policy, sleep=time.sleep, clock=time.clock) == "done"
    assert len(fn.calls) == 51


async def test_permanent_errors_are_not_retried() -> None:
    time = FakeTime()
    fn = Failing([BadCredentials("no")])
    with pytest.raises(BadCredentials):
        await retry_call(fn, RetryPolicy(), sleep=time.sleep, clock=time.clock)
    assert len(fn.calls) == 1
    assert time.sleeps == []


async def test_retry_after_is_honoured_and_capped() -> None:
    time = FakeTime()
    policy = RetryPolicy(base_delay=0.01, max_delay=0.01, max_retry_after=60.0, max_total=None)
    fn = Failing([Throttled(7.0), Throttled(3600.0)])
    await retry_call(fn, policy, sleep=time.sleep, clock=time.clock)
    assert time.sleeps == [7.0, 60.0]


async def test_on_retry_gets_attempt_delay_and_error_sync_or_async() -> None:
    time = FakeTime()
    seen: list[tuple[int, float, str]] = []

    def sync_callback(attempt: int, delay: float, exc: BaseException) -> None:
        seen.append((attempt, delay, str(exc)))

    async def async_callback(attempt: int, delay: float, exc: BaseException) -> None:
        seen.append((attempt, delay, str(exc)))

    for callback in (sync_callback, async_callback):
        fn = Failing([UpstreamUnavailable("a"), UpstreamUnavailable("b")])
        await retry_call(fn, RetryPolicy(), on_retry=callback, sleep=time.sleep, clock=time.clock)
    assert [(a, e) for a, _, e in seen] == [(1, "a"), (2, "b")] * 2
    assert [d for _, d, _ in seen] == time.sleeps


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=5, max_delay=1)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
