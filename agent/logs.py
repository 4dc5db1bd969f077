"""Logging: loguru to stderr, journald-aware; every line scrubbed, escaped and rate-limited.

Under journald (``JOURNAL_STREAM`` set) each line starts with the ``<N>`` syslog priority, so
``journalctl -p warning`` filters work and journald adds its own timestamp. Any value registered
with ``register_secret`` (passwords, tokens, key fragments) is replaced by ``***`` in every line,
as a last line of defence: the code never logs secrets on purpose either.

Callers can put text into messages (an email sent to ``POST /login``), so every message is made
one safe line before it is written: control characters (newlines, ESC, C1, Unicode line
separators and bidi overrides) are shown as escapes such as ``\\n`` or ``\\x1b``, and the length
is bounded. A call site that logs caller text wraps it in ``quote`` so a reader sees where it
starts and ends. ``RepeatLimit`` keeps a flood from one call site from filling the journal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

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
MESSAGE_LIMIT = 2000  # characters of a message written; the rest is counted, not shown
QUOTE_LIMIT = 200  # characters of one caller-supplied value written

# What could break a line, rewrite the terminal or reorder text on screen: C0 (with \n \r \t
# ESC), DEL, C1, the Arabic letter mark, LRM/RLM, U+2028/2029 line and paragraph separators,
# the bidi embeddings/overrides/isolates, and lone surrogates (undecodable bytes).
_CONTROL = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[{_CONTROL}]")
_UNSAFE_IN_QUOTES = re.compile(f'[{_CONTROL}\\\\"]')  # and what would end or fake the quotes
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}

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


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape(text: str, limit: int, unsafe: re.Pattern[str]) -> tuple[str, str]:
    """``text`` cut to ``limit`` characters with ``unsafe`` ones escaped, and what was cut."""
    escaped = unsafe.sub(_escape_char, text[:limit])
    rest = len(text) - limit
    return escaped, f"... ({rest} more characters)" if rest > 0 else ""


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as one line a terminal shows as is: controls escaped, at most ``limit`` shown."""
    escaped, cut = _escape(text, limit, _UNSAFE)
    return escaped + cut


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Caller-supplied ``text`` for a log line: escaped, bounded, in double quotes.

    Backslashes and quotes inside are escaped too, so the closing quote is always the real end.
    """
    escaped, cut = _escape(text, limit, _UNSAFE_IN_QUOTES)
    return f'"{escaped}"{cut}'


def _patch(record: Record) -> None:
    record["message"] = one_line(scrub(record["message"]))


@dataclass
class _Window:
    start: float
    passed: int = 1
    suppressed: int = 0


class RepeatLimit:
    """A sink filter: at most ``lines`` records per ``window`` seconds from one call site.

    A call site is the logging function's module, function and line, and the level. Records
    over the limit are dropped and counted; the first record that passes after the window ends
    with ``(N similar lines suppressed)``. Safe to call from several threads at once.
    """

    def __init__(
        self, lines: int = 10, window: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lines = lines
        self.window = window
        self._clock = clock
        # One entry per call site and level: bounded by the code, not by what callers send.
        self._windows: dict[tuple[str | None, str, int, str], _Window] = {}
        self._lock = threading.Lock()

    def __call__(self, record: Record) -> bool:
        site = (record["name"], record["function"], record["line"], record["level"].name)
        now = self._clock()
        with self._lock:
            window = self._windows.get(site)
            if window is None or now - window.start >= self.window:
                suppressed = window.suppressed if window is not None else 0
                self._windows[site] = _Window(start=now)
            elif window.passed < self.lines:
                window.passed += 1
                suppressed = 0
            else:
                window.suppressed += 1
                return False
        if suppressed:
            record["message"] += f" ({suppressed} similar lines suppressed)"
        return True


class JournalStream:
    """A loguru sink for journald's stream: every line of an entry (a traceback's too) carries
    the entry's ``<N>`` priority prefix, since journald reads the prefix line by line and gives
    a line without one the default priority (info). A traceback's lines are scrubbed and
    escaped like messages (an exception's text may carry a caller's bytes or a secret)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, message: Message) -> None:
        priority = SYSLOG_PRIORITY.get(message.record["level"].name, 6)
        first, *rest = str(message).rstrip("\n").split("\n")  # the message: safe already
        lines = [first, *(one_line(scrub(line)) for line in rest)]
        self._stream.write("".join(f"<{priority}>{line}\n" for line in lines))
        self._stream.flush()


class ConsoleStream:
    """The sink on a terminal or a file: tracebacks scrubbed of secrets like messages (their
    colours stay, so they are not escaped)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, message: Message) -> None:
        text = str(message)
        self._stream.write(scrub(text) if message.record["exception"] else text)
        self._stream.flush()


def under_journald(environ: Mapping[str, str]) -> bool:
    """Whether stderr goes to journald (systemd sets ``JOURNAL_STREAM`` for its services)."""
    return bool(environ.get("JOURNAL_STREAM"))


_JOURNAL_FORMAT = "{message}\n{exception}"
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
    logger.remove()
    logger.configure(patcher=_patch)
    limit = RepeatLimit()
    if under_journald(env):
        logger.add(
            JournalStream(sys.stderr),
            level=level,
            format=_JOURNAL_FORMAT,
            filter=limit,
            colorize=False,
            backtrace=False,
            diagnose=False,  # diagnose would print local variables: secrets included
        )
    else:
        logger.add(
            ConsoleStream(sys.stderr),
            level=level,
            format=_CONSOLE_FORMAT,
            colorize=sys.stderr.isatty(),
            filter=limit,
            backtrace=False,
            diagnose=False,
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
    sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    """A bug that escapes everything: one entry at priority crit, traceback included."""
    logger.opt(exception=(kind, error, traceback)).critical("unexpected error: {}", kind.__name__)
