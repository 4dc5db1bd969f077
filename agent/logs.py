"""Logging: loguru to stderr, journald-aware, with secrets scrubbed from every line.

Under journald (``JOURNAL_STREAM`` set) each line starts with the ``<N>`` syslog priority, so
``journalctl -p warning`` filters work and journald adds its own timestamp. Any value registered
with ``register_secret`` (passwords, tokens, key fragments) is replaced by ``***`` in every line,
as a last line of defence: the code never logs secrets on purpose either.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

# loguru level name -> syslog priority (sd-daemon(3)).
SYSLOG_PRIORITY = {
    "TRACE": 7,
    "DEBUG": 7,
    "INFO": 6,
    "SUCCESS": 5,
    "WARNING": 4,
    "ERROR": 3,
    "CRITICAL": 2,
}
_MIN_SECRET_LENGTH = 4

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | bytes | None) -> None:
    """Never let ``value`` appear in a log line."""
    if not value:
        return
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(text) >= _MIN_SECRET_LENGTH:
        with _secrets_lock:
            _secrets.add(text)


def scrub(text: str) -> str:
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _patch(record: Record) -> None:
    record["message"] = scrub(record["message"])


def _journal_format(record: Record) -> str:
    priority = SYSLOG_PRIORITY.get(record["level"].name, 6)
    return f"\\<{priority}>{{message}}\n{{exception}}"


_CONSOLE_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"
)


class _InterceptHandler(logging.Handler):
    """Route the standard library's logging (aiohttp, docker) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        if record.name == "aiohttp.access":
            level = "DEBUG"  # one line per request would flood the journal
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str = "INFO", environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    under_journald = bool(env.get("JOURNAL_STREAM"))
    logger.remove()
    logger.configure(patcher=_patch)
    logger.add(
        sys.stderr,
        level=level,
        format=_journal_format if under_journald else _CONSOLE_FORMAT,
        colorize=False if under_journald else None,
        backtrace=False,
        diagnose=False,  # diagnose would print local variables: secrets included
    )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
