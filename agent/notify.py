"""systemd notification (sd_notify), optional and harmless.

Does nothing without ``NOTIFY_SOCKET``; failures are logged, never raised: a broken notify
socket must not take the agent down.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import sdnotify
from loguru import logger


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._notifier: sdnotify.SystemdNotifier | None = None
        if self.enabled:
            try:
                # debug=True makes sdnotify raise instead of silently dropping messages.
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError as exc:
                logger.warning("cannot reach systemd's notify socket: {}", exc)
        self.watchdog_interval = _watchdog_interval(env)
        self._last_status: str | None = None

    def _send(self, message: str) -> None:
        if self._notifier is None:
            return
        try:
            # As UTF-8, written to sdnotify's connected socket: its notify() encodes Latin-1
            # and raises on anything else (a Cyrillic path, an emoji in a message).
            self._notifier.socket.sendall(message.encode("utf-8", "replace"))
        except OSError as exc:
            logger.warning("systemd notification failed: {}", exc)

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.socket.close()
            self._notifier = None

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping from the event loop itself: a blocked loop stops the pings, as it should."""
        if self.watchdog_interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC``, if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC={!r}: not a number", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None
