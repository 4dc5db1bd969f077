"""The agent's log: one escaped, bounded line per message, scrubbed, and floods cut short.

In-process through ``setup_logging`` (journald format, so each line is ``<N>message``) with
stderr captured, plus one run of the real agent fed a forged email over its real socket.
"""

from __future__ import annotations

import io
import itertools
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from loguru import logger

from agent.logs import MESSAGE_LIMIT, RepeatLimit, quote, register_secret, setup_logging
from tests.fixtures.agent import AgentProcess

MakeAgent = Callable[..., AgentProcess]
Lines = Callable[[], list[str]]


@pytest.fixture
def bare_logger() -> Iterator[None]:
    """Only the test's own sinks (others would slow and serialise the threads); loguru's
    default stderr sink and no patcher afterwards."""
    logger.remove()
    yield
    logger.remove()
    logger.configure(patcher=lambda record: None)
    logger.add(_to_stderr)


def _to_stderr(message: str) -> None:
    sys.stderr.write(message)  # the stderr of the moment, as pytest swaps it per phase


@pytest.fixture
def journal(bare_logger: None) -> Iterator[Lines]:
    """The agent's logging as set up under journald; returns the lines written since last asked.

    ``setup_logging`` binds the ``sys.stderr`` of the moment, so it is given a buffer there.
    """
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stderr, buffer = sys.stderr, io.StringIO()
    sys.stderr = buffer
    try:
        setup_logging("DEBUG", environ={"JOURNAL_STREAM": "8:12345"})
    finally:
        sys.stderr = stderr

    def lines() -> list[str]:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        assert text.endswith("\n") or not text
        return text.splitlines()

    yield lines
    root.handlers[:], root.level = saved[0], saved[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(bare_logger: None) -> Iterator[tuple[list[str], FakeClock]]:
    """A sink of its own behind a ``RepeatLimit`` on a clock the test moves."""
    clock = FakeClock()
    lines: list[str] = []
    logger.add(lines.append, format="{message}", level="DEBUG", filter=RepeatLimit(clock=clock))
    yield lines, clock


# -- one line, escaped ----------------------------------------------------------------------------

CONTROLS = [
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\t", "\\t"),
    ("\x1b", "\\x1b"),
    ("\x00", "\\x00"),
    ("\x0b", "\\x0b"),
    ("\x0c", "\\x0c"),
    ("\x7f", "\\x7f"),
    ("\x85", "\\x85"),  # NEL: a line break to some readers
    ("\x9b", "\\x9b"),  # CSI: an ESC [ in one byte
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
    ("\u202e", "\\u202e"),  # right-to-left override
    ("\u2066", "\\u2066"),  # left-to-right isolate
    ("\u2069", "\\u2069"),
]


@pytest.mark.parametrize(("char", "shown"), CONTROLS, ids=[repr(c) for c, _ in CONTROLS])
def test_control_characters_are_shown_escaped(journal: Lines, char: str, shown: str) -> None:
    logger.info("credentials set for {}", f"a@b{char}<3>forged")
    assert journal() == [f"<6>credentials set for a@b{shown}<3>forged"]


def test_a_forged_line_with_terminal_escapes_stays_one_line(journal: Lines) -> None:
    email = "x@y\r\n<0>root login from 10.0.0.1\x1b[2K\x1b[1A\u2028\u202eevil"
    logger.warning("credentials set for {}", email)
    lines = journal()
    assert lines == [
        "<4>credentials set for x@y\\r\\n<0>root login from 10.0.0.1"
        "\\x1b[2K\\x1b[1A\\u2028\\u202eevil"
    ]


def test_standard_library_records_are_escaped_too(journal: Lines) -> None:
    logging.getLogger("aiohttp.server").error("bad request line %s", "GET /\n<2>forged")
    assert journal() == ["<3>bad request line GET /\\n<2>forged"]


def test_printable_unicode_is_kept(journal: Lines) -> None:
    text = "Привіт, Олена ✓ é 日本 👨‍👩‍👧 🔑"  # the family emoji is joined by U+200D
    logger.info("user {}", text)
    assert journal() == [f"<6>user {text}"]


def test_a_long_message_is_bounded(journal: Lines) -> None:
    logger.info("x{}", "y" * 10_000)
    (line,) = journal()
    assert line == "<6>x" + "y" * (MESSAGE_LIMIT - 1) + "... (8001 more characters)"


def test_a_traceback_keeps_its_lines_each_at_the_entrys_priority(journal: Lines) -> None:
    """journald reads the <N> prefix line by line: a traceback line without it would be
    filed at info, out of `journalctl -p err`."""
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed for {}", "a\nb")
    lines = journal()
    assert lines[0] == "<3>failed for a\\nb"
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines), lines


# -- quote ------------------------------------------------------------------------------------


def test_quote_marks_where_caller_text_starts_and_ends() -> None:
    assert quote("a@b.c") == '"a@b.c"'
    assert quote("") == '""'
    # A quote or backslash inside cannot close the value early or fake an escape.
    assert quote('a", verified: "true') == '"a\\", verified: \\"true"'
    assert quote("a\\nb") == '"a\\\\nb"'
    assert quote("a\nb\x1b\u2028") == '"a\\nb\\x1b\\u2028"'
    assert quote("Олена 🔑") == '"Олена 🔑"'


def test_quote_is_bounded_outside_the_quotes() -> None:
    assert quote("z" * 300) == '"' + "z" * 200 + '"... (100 more characters)'
    assert quote("z" * 20, limit=5) == '"zzzzz"... (15 more characters)'
    assert quote("z" * 5, limit=5) == '"zzzzz"'


def test_a_quoted_value_logs_as_one_line(journal: Lines) -> None:
    logger.info("credentials set for {}", quote('x"\n<3>y'))
    assert journal() == ['<6>credentials set for "x\\"\\n<3>y"']


# -- scrubbing --------------------------------------------------------------------------------


def test_registered_secrets_are_scrubbed(journal: Lines) -> None:
    register_secret("scrub-test-Kq7vX2")
    register_secret(b"scrub-test-\nbytes")  # scrubbed before its newline is escaped
    register_secret("ab")  # too short: would blank out parts of words ("table")
    logger.info("token scrub-test-Kq7vX2 and scrub-test-\nbytes on a table")
    assert journal() == ["<6>token *** and *** on a table"]


# -- repeated lines ---------------------------------------------------------------------------


def _flood(count: int) -> None:
    for i in range(count):
        logger.warning("flood {}", i)


def test_a_flood_from_one_call_site_is_cut_to_ten_lines(journal: Lines) -> None:
    _flood(1000)
    assert journal() == [f"<4>flood {i}" for i in range(10)]


def test_call_sites_do_not_suppress_each_other(journal: Lines) -> None:
    _flood(1000)
    for i in range(12):
        logger.warning("first {}", i)
        logger.warning("second {}", i)
        logger.log("INFO" if i % 2 else "ERROR", "both {}", i)  # one line, two levels
    lines = journal()
    assert lines[:10] == [f"<4>flood {i}" for i in range(10)]
    for site in ("<4>first", "<4>second"):
        assert [line for line in lines if line.startswith(site)] == [
            f"{site} {i}" for i in range(10)
        ]
    assert [line for line in lines if "both" in line] == [
        f"{'<6>' if i % 2 else '<3>'}both {i}" for i in range(12)
    ]


def test_the_next_line_after_the_window_counts_what_was_dropped(
    limited: tuple[list[str], FakeClock],
) -> None:
    lines, clock = limited
    _flood(1000)
    assert lines == [f"flood {i}\n" for i in range(10)]
    clock.now += 9.9
    _flood(5)
    assert len(lines) == 10
    clock.now += 0.1
    _flood(3)
    assert lines[10:] == [
        "flood 0 (995 similar lines suppressed)\n",
        "flood 1\n",
        "flood 2\n",
    ]
    clock.now += 10
    _flood(1)
    assert lines[13:] == ["flood 0\n"]  # nothing was dropped in that window


def test_every_dropped_line_is_counted_once_across_threads(bare_logger: None) -> None:
    """Eight threads flood one call site while windows keep expiring (the clock ticks 0.5 s
    per record): each record is either written or counted in exactly one suppression note."""
    ticks = itertools.count()
    lines: list[str] = []
    logger.add(
        lines.append,
        format="{message}",
        filter=RepeatLimit(lines=3, window=10.0, clock=lambda: next(ticks) * 0.5),
    )
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter lets it
    try:
        threads = [threading.Thread(target=_flood, args=(4000,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    for _ in range(40):
        next(ticks)  # 20 s on: the next line closes the last window
    _flood(1)
    notes = [re.search(r" \((\d+) similar lines suppressed\)$", line.rstrip()) for line in lines]
    suppressed = sum(int(note.group(1)) for note in notes if note)
    assert len(lines) - 1 + suppressed == 8 * 4000
    assert len(lines) < 8 * 4000 / 2  # and most were dropped


# -- the real agent ---------------------------------------------------------------------------


def test_a_forged_email_cannot_add_a_line_to_the_agents_log(make_agent: MakeAgent) -> None:
    agent = make_agent(JOURNAL_STREAM="8:12345")
    email = "ops@example.com\n<2>disk failure on /dev/sda\x1b[1A\x1b[2K\u2028<2>again"
    agent.request("POST", "/login", {"email": email, "password": "forged-line-pass-1"})
    agent.stop()
    log = agent.log()
    lines = [line for line in log.splitlines() if line]
    assert all(line[:3] in ("<7>", "<6>", "<5>", "<4>", "<3>", "<2>") for line in lines), lines
    assert not any("disk failure" in line and line.startswith("<2>") for line in lines), lines
    assert "\x1b" not in log and "\u2028" not in log


def test_a_traceback_is_scrubbed_and_escaped_like_a_message(journal: Lines) -> None:
    """An exception's text may carry a secret or a caller's bytes: the traceback's lines are
    held to the same rules as messages."""
    secret = "s3cr3t-in-an-exception"
    register_secret(secret)
    try:
        raise ValueError(f"bad {secret}\rforged\x1b[2J")
    except ValueError:
        logger.exception("failed")
    lines = journal()
    text = "\n".join(lines)
    assert secret not in text and "***" in text
    assert "\x1b" not in text and "\r" not in text
    assert any(line.startswith("<3>ValueError: bad ***\\rforged\\x1b[2J") for line in lines)
