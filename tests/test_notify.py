"""sd_notify over a real NOTIFY_SOCKET: READY, STATUS, WATCHDOG pings, STOPPING."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.agent import AgentProcess, unix_request

MakeAgent = Callable[..., AgentProcess]


class NotifyListener:
    """Stands in for systemd's notify socket: a real AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        raw = self.sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    def until(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")
            message = self.next(remaining)
            if key in message:
                return message


@pytest.fixture
def notify_socket(agent_root: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(agent_root / "notify.sock")
    yield listener
    listener.sock.close()


def test_ready_status_watchdog_stopping(
    make_agent: MakeAgent, notify_socket: NotifyListener
) -> None:
    agent = make_agent(start=False, NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="200000")
    agent.start(wait=False)
    ready = notify_socket.until("READY")
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("serving; ")
    assert ready["MAINPID"] == str(agent.proc.pid if agent.proc else -1)
    # READY=1 means every listener accepts: the socket answers right now, no retry.
    assert unix_request(agent.socket_path, "GET", "/health").status == 200
    # Watchdog pings at half of WATCHDOG_USEC (0.1 s): several arrive within a second or two.
    pings = 0
    deadline = time.monotonic() + 5
    while pings < 5 and time.monotonic() < deadline:
        if notify_socket.next().get("WATCHDOG") == "1":
            pings += 1
    assert pings == 5
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    stopping = notify_socket.until("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert agent.proc.wait(20) == 0
    assert not agent.socket_path.exists()


def test_nothing_sent_without_notify_socket(make_agent: MakeAgent, agent_root: Path) -> None:
    # With NOTIFY_SOCKET unset the agent runs normally and says nothing anywhere.
    agent = make_agent(WATCHDOG_USEC="100000")
    assert agent.request("GET", "/health").status == 200
    assert agent.stop() == 0
    assert "notification failed" not in agent.log()


def test_watchdog_not_for_another_pid(make_agent: MakeAgent, notify_socket: NotifyListener) -> None:
    agent = make_agent(
        start=False,
        NOTIFY_SOCKET=str(notify_socket.path),
        WATCHDOG_USEC="100000",
        WATCHDOG_PID="1",
    )
    agent.start(wait=False)
    notify_socket.until("READY")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    notify_socket.until("STOPPING")
    assert agent.proc.wait(20) == 0
    assert not any("WATCHDOG" in m for m in notify_socket.messages)


@pytest.mark.parametrize("text", ["образы готовы 🚀", "ready: 1 image loaded", "tab\tand ünïcödé"])
def test_status_carries_any_utf8_text_intact(
    notify_socket: NotifyListener, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sdnotify's own notify() encodes Latin-1 and raises on Cyrillic or emoji; the agent
    sends UTF-8 (what systemd reads) over the same real datagram socket."""
    from agent.notify import Notifier

    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))  # sdnotify reads os.environ
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path)})
    try:
        notifier.status(text)
        assert notify_socket.next(5)["STATUS"] == text
        notifier.ready(f"serving; {text}")
        assert notify_socket.next(5)["STATUS"] == f"serving; {text}"
    finally:
        notifier.close()
