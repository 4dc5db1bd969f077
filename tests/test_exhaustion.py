"""Local callers cannot exhaust the agent: connection budgets, idle timeouts, half-closes.

The real agent process, often under a low RLIMIT_NOFILE (the issue: at 1024 descriptors, idle
TCP connections took every one of them, the Unix socket stopped answering and accept() errors
filled the log).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from agent.connections import Throttle, descriptors_needed
from agent.service import log_loop_errors
from tests.fixtures.agent import AgentProcess, tcp_request, wait_for

MakeAgent = Callable[..., AgentProcess]

LIMIT = 16  # LOADER_MAX_CONNECTIONS in these tests
NOFILE = 256  # the agent's RLIMIT_NOFILE: far fewer than the flood below
FLOOD = 300
REQUEST = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"


def nofile(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn giving the agent these descriptor limits."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def start(
    make_agent: MakeAgent, soft: int = NOFILE, hard: int = NOFILE, **env: str
) -> AgentProcess:
    agent = make_agent(start=False, **env)
    return agent.start(preexec_fn=nofile(soft, hard))


def open_fds(agent: AgentProcess) -> int:
    assert agent.proc is not None
    return len(os.listdir(f"/proc/{agent.proc.pid}/fd"))


def connect(agent: AgentProcess, over: str) -> socket.socket:
    if over == "tcp":
        return socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(agent.socket_path))
    return sock


@contextmanager
def flood(agent: AgentProcess, count: int) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(agent, "tcp")) for _ in range(count)]
        for sock in socks:
            sock.setblocking(False)  # for answered_and_closed
        yield socks


def answered_and_closed(sock: socket.socket) -> bool:
    """True once the agent wrote to ``sock`` (its 503); False while it holds it open, idle."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def refused(socks: list[socket.socket], expected: int) -> list[socket.socket]:
    """Wait until ``expected`` of ``socks`` got the agent's 503; return those."""

    def done() -> list[socket.socket] | None:
        found = [sock for sock in socks if answered_and_closed(sock)]
        return found if len(found) >= expected else None

    return wait_for(done, 10, f"{expected} connections to be refused")


def read_until_eof(sock: socket.socket, timeout: float) -> bytes:
    """Everything the agent sends until it closes; fails if it has not closed by ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the agent did not close within {timeout} s; got {data!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def responses(data: bytes) -> list[tuple[int, Any]]:
    """(status, JSON body) of each HTTP response in ``data``, which holds whole responses."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers["Content-Length"])
        found.append((int(lines[0].split()[1]), json.loads(rest[:length])))
        data = rest[length:]
    return found


def health_within(agent: AgentProcess, seconds: float) -> None:
    started = time.monotonic()
    reply = agent.request("GET", "/health", timeout=seconds)
    elapsed = time.monotonic() - started
    assert (reply.status, reply.json()) == (200, {"status": "healthy"})
    assert elapsed < seconds, elapsed


def test_tcp_flood_leaves_the_socket_answering_with_bounded_descriptors(
    make_agent: MakeAgent,
) -> None:
    agent = start(make_agent, LOADER_MAX_CONNECTIONS=str(LIMIT), LOADER_IDLE_TIMEOUT="60")
    baseline = open_fds(agent)
    with flood(agent, FLOOD) as socks:
        turned_away = refused(socks, FLOOD - LIMIT)
        assert len(turned_away) == FLOOD - LIMIT
        # Exactly the budget stays open and idle; the rest got a 503 and were closed.
        assert sum(not answered_and_closed(sock) for sock in socks) == LIMIT
        status, body = responses(read_until_eof(turned_away[0], 5))[0]
        assert (status, body["error"]) == (503, "too_many_connections")
        health_within(agent, 2.0)
        # The budget plus the one /health connection (and slack for a file or two).
        assert open_fds(agent) <= baseline + LIMIT + 3
    # Once the flood lets go, the port serves again.
    wait_for(lambda: _tcp_health(agent), 10, "the TCP port to answer after the flood")


def _tcp_health(agent: AgentProcess) -> bool:
    try:
        return tcp_request(agent.port, "GET", "/health").status == 200
    except OSError:
        return False


def test_flood_adds_a_line_or_two_to_the_log(make_agent: MakeAgent) -> None:
    agent = start(make_agent, LOADER_MAX_CONNECTIONS=str(LIMIT), LOADER_IDLE_TIMEOUT="60")
    before = agent.log_path.stat().st_size
    with flood(agent, FLOOD) as socks:
        refused(socks, FLOOD - LIMIT)
        for _ in range(500):  # connect and drop at once, over and over
            connect(agent, "tcp").close()
        # The agent accepts in order: once this one is refused, so were all before it.
        with connect(agent, "tcp") as last:
            assert responses(read_until_eof(last, 10))[0][0] == 503
        health_within(agent, 2.0)
    grown = agent.log_path.read_bytes()[before:].decode(errors="replace")
    assert len(grown) < 2048, grown
    assert "Traceback" not in grown
    assert 1 <= grown.count("refusing new ones") <= 2, grown


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_idle_and_slow_header_connections_are_closed(make_agent: MakeAgent, over: str) -> None:
    agent = make_agent(LOADER_IDLE_TIMEOUT="1")
    idle = connect(agent, over)
    slow = connect(agent, over)
    slow.sendall(REQUEST[:20])
    kept_alive = connect(agent, over)
    kept_alive.sendall(REQUEST)
    opened = time.monotonic()
    with idle, slow, kept_alive:
        for sock, expect_answer in ((idle, False), (slow, False), (kept_alive, True)):
            data = read_until_eof(sock, 5)
            assert bool(data) == expect_answer, data
        elapsed = time.monotonic() - opened
    # Closed by the timeout (not at once), within about LOADER_IDLE_TIMEOUT.
    assert 0.8 <= elapsed <= 4, elapsed


def test_a_trickled_header_does_not_extend_the_timeout(make_agent: MakeAgent) -> None:
    agent = make_agent(LOADER_IDLE_TIMEOUT="1")
    opened = time.monotonic()
    with connect(agent, "tcp") as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        sock.settimeout(0.2)  # paces the trickle: one byte per 0.2 s unless the agent closes
        while True:
            if time.monotonic() - opened > 5:
                raise AssertionError("a trickling caller kept its connection for 5 s")
            try:
                sock.sendall(b"a")
                assert sock.recv(1) == b"", "the agent answered a request it never got"
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    assert time.monotonic() - opened <= 3


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_half_closed_request_is_answered_then_closed(make_agent: MakeAgent, over: str) -> None:
    agent = make_agent(LOADER_IDLE_TIMEOUT="30")
    with connect(agent, over) as one, connect(agent, over) as two:
        one.sendall(REQUEST)
        one.shutdown(socket.SHUT_WR)
        two.sendall(REQUEST + b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\nGET /hea")
        two.shutdown(socket.SHUT_WR)
        # Answered, then closed at once: far sooner than the 30 s idle timeout.
        assert responses(read_until_eof(one, 5)) == [(200, {"status": "healthy"})]
        answered = responses(read_until_eof(two, 5))
        assert [status for status, _ in answered] == [200, 404]


def test_half_close_with_nothing_complete_closes_at_once(make_agent: MakeAgent) -> None:
    agent = make_agent(LOADER_IDLE_TIMEOUT="30", LOADER_BODY_TIMEOUT="30")
    with connect(agent, "tcp") as cut, connect(agent, "tcp") as partial:
        cut.sendall(
            b"POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"email": '
        )
        cut.shutdown(socket.SHUT_WR)
        partial.sendall(REQUEST[:20])
        partial.shutdown(socket.SHUT_WR)
        # No answer to a body cut short or half a head, and no waiting for a timeout.
        assert read_until_eof(cut, 5) == b""
        assert read_until_eof(partial, 5) == b""
    health_within(agent, 2.0)


def test_soft_descriptor_limit_is_raised_to_what_the_budgets_need(make_agent: MakeAgent) -> None:
    needed = descriptors_needed(2, 256)  # the default LOADER_MAX_CONNECTIONS, two listeners
    agent = start(make_agent, soft=64, hard=4096)
    assert agent.proc is not None
    limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
    soft = int(
        next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3]
    )
    assert soft >= needed


def test_descriptor_limit_too_low_for_the_budgets_stops_with_one_line(
    make_agent: MakeAgent,
) -> None:
    agent = make_agent(start=False, LOADER_MAX_CONNECTIONS="1000")
    agent.start(wait=False, preexec_fn=nofile(512, 512))
    assert agent.proc is not None
    assert agent.proc.wait(20) == 2
    lines = agent.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert "LOADER_MAX_CONNECTIONS" in lines[0] and "LimitNOFILE" in lines[0]
    assert not agent.socket_path.exists()  # the socket it had bound is gone again


def test_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = Throttle(5.0, clock=lambda: now[0])
    assert throttle() == 0
    assert [throttle() for _ in range(3)] == [None, None, None]
    now[0] += 4.9
    assert throttle() is None
    now[0] += 0.1
    assert throttle() == 4
    assert throttle() is None


def test_loop_errors_are_logged_once_per_interval_with_a_count() -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")

    async def fail_to_accept_often() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(log_loop_errors(interval=60.0))
        error = OSError(errno.EMFILE, "Too many open files")
        for _ in range(1000):
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": error}
            )

    try:
        asyncio.run(fail_to_accept_often())
    finally:
        logger.remove(sink)
    assert len(lines) == 1, lines
    assert "socket.accept() out of system resource" in lines[0]
    assert "Too many open files" in lines[0]  # the exception's traceback follows the message
