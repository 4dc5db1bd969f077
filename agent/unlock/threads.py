"""Blocking work off the event loop, for the unlock: a daemon worker thread that stops with it.

A daemon thread (not the default executor) so a stuck engine cannot hold up exit; the thread
is told to stop through a ``threading.Event`` that the pipeline checks between pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from agent.retry import Clock

T = TypeVar("T")

CLOSE_TIMEOUT = 30.0  # how long a cancelled caller waits for the thread to notice


async def in_thread(fn: Callable[[], T], cancel: threading.Event) -> T:
    """Run ``fn`` in a daemon thread; if we are cancelled, set ``cancel`` and wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:
            call_soon(loop, settle, None, exc)
        else:
            call_soon(loop, settle, result, None)

    threading.Thread(target=work, name="unlock-worker", daemon=True).start()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(future), CLOSE_TIMEOUT)
        raise


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` on ``loop``, from any thread; nothing if the loop is gone (nobody waits)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class Throttle:
    """True at most once per ``interval`` seconds of ``clock`` (thread-local use only)."""

    def __init__(self, interval: float, clock: Clock) -> None:
        self._interval = interval
        self._clock = clock
        self._next = 0.0

    def due(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True
