"""Retrying transient failures: capped exponential backoff with full jitter.

``retry_call`` runs an async function until it succeeds, raises an error that waiting will not
fix, or the policy's budget (attempts, total time) runs out; then the last error is raised as
it is. A server's ``Retry-After`` (an exception attribute ``retry_after``, in seconds) is
honoured: the agent never comes back sooner than asked.

Randomness, sleeping and the clock are parameters, so the schedule is testable with fixed
inputs and the boot-time unlock can show "next try in 30 s (attempt 7)" from ``on_retry``.

Whoever retries also counts its retries in a ``RetryCounts`` (read by ``/metrics``), by the
operation it names and by ``cause_of`` the error: a word from ``RETRY_CAUSES``, never its text.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.errors import DockerUnavailable, UpstreamTimeout, UpstreamUnavailable

T = TypeVar("T")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
OnRetry = Callable[[int, float, BaseException], Awaitable[None] | None]
"""Called before each wait with (number of the attempt that just failed, 1-based; the delay in
seconds before the next one; the error)."""

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    UpstreamUnavailable,
    UpstreamTimeout,
    DockerUnavailable,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying. ``None`` for attempts or total time means no limit."""

    base_delay: float = 0.5
    max_delay: float = 30.0
    max_attempts: int | None = 5
    max_total: float | None = 120.0
    max_retry_after: float = 300.0
    """A server asking for a longer pause than this is waited for only this long."""

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("retry delays must satisfy 0 <= base_delay <= max_delay")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] after failed ``attempt``."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 62))
        return rng.uniform(0.0, ceiling)

    def delay(self, attempt: int, exc: BaseException, rng: random.Random) -> float:
        """The pause after failed ``attempt``: the backoff, but never less than Retry-After."""
        jittered = self.backoff(attempt, rng)
        asked = retry_after_of(exc)
        if asked is None:
            return jittered
        return max(jittered, min(asked, self.max_retry_after))

    def allows(self, attempt: int, elapsed: float, delay: float) -> bool:
        """Whether another attempt may follow failed ``attempt`` after ``delay`` more seconds."""
        if self.max_attempts is not None and attempt >= self.max_attempts:
            return False
        return self.max_total is None or elapsed + delay <= self.max_total


def retry_after_of(exc: BaseException) -> float | None:
    """The pause a server asked for, if the error carries one."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    return None


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retryable: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    on_retry: OnRetry | None = None,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    clock: Clock = time.monotonic,
) -> T:
    """Await ``fn()`` until it succeeds; retry only ``retryable`` errors, within ``policy``."""
    rng = rng or random.Random()
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except retryable as exc:
            pause = policy.delay(attempt, exc, rng)
            if not policy.allows(attempt, clock() - started, pause):
                raise
            if on_retry is not None:
                notified = on_retry(attempt, pause, exc)
                if notified is not None:
                    await notified
            await sleep(pause)


RETRY_CAUSES = ("throttled", "timeout", "unavailable", "docker_unavailable", "other")


def cause_of(exc: BaseException) -> str:
    """Why a retry was needed, as one of ``RETRY_CAUSES``: ``throttled`` when the server asked
    for a pause (``Retry-After``), then by the kind of the error."""
    if isinstance(exc, DockerUnavailable):
        return "docker_unavailable"
    if retry_after_of(exc) is not None:
        return "throttled"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    return "other"


class RetryCounts:
    """Retries so far by (operation, cause), for ``/metrics``. The owner names the operation
    (a constant of its own) and the cause comes from ``cause_of``, so every key is from a fixed
    set whatever the errors say."""

    def __init__(self) -> None:
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, operation: str, exc: BaseException) -> None:
        self._counts[(operation, cause_of(exc))] += 1

    def items(self) -> list[tuple[tuple[str, str], int]]:
        return list(self._counts.items())
