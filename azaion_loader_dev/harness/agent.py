"""Run the real agent (``python -m agent serve``) as a subprocess on a real Unix socket."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.localclient import UnixConnection
from azaion_loader_dev.harness.process import stop_process

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
POLL_INTERVAL = 0.02
T = TypeVar("T")


def short_tmpdir(prefix: str = "al-") -> Path:
    """A temp dir short enough for Unix socket paths (108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL)  # a polling period, not a stand-in for synchronisation


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def unix_request(
    sock_path: Path,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    return _exchange(UnixConnection(sock_path, timeout), method, path, body, headers)


def tcp_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> Reply:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    return _exchange(conn, method, path, body, headers)


def _exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str] | None,
) -> Reply:
    """One request on a new connection, closed after the whole answer was read."""
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


@dataclass
class AgentProcess:
    root: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    # How the agent is started (a benchmark may start a variant of it).
    argv: list[str] = field(default_factory=lambda: [sys.executable, "-m", "agent", "serve"])

    def __post_init__(self) -> None:
        self.log_path = self.root / "agent.log"

    @property
    def socket_path(self) -> Path:
        return Path(self.env["LOADER_SOCKET_PATH"])

    @property
    def port(self) -> int:
        return int(self.env["LOADER_HTTP_PORT"])

    def start(self, wait: bool = True, **popen: Any) -> AgentProcess:
        """Start it, its output to ``log_path`` (``stdout=None, stderr=None``: to ours)."""
        with self.log_path.open("ab") as log:
            popen.setdefault("stdout", log)
            popen.setdefault("stderr", log)
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=PROJECT_ROOT, **popen)
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self) -> None:
        def serving() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            try:
                return self.request("GET", "/health").status == 200
            except OSError:
                return False

        wait_for(serving, START_TIMEOUT, "the agent to serve")

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
        headers = dict(kw.pop("headers", {}) or {})
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return unix_request(self.socket_path, method, path, body, headers, **kw)

    def cli(
        self, *args: str, input: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args, "--socket", str(self.socket_path)],
            env={**self.env, **env},
            cwd=PROJECT_ROOT,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if not stop_process(self.proc, sig, timeout):
            raise AssertionError(f"agent did not stop within {timeout} s:\n{self.log()}")
        return self.proc.returncode


def agent_env(root: Path, **overrides: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LOADER_", "AZAION_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))
        and k not in ("RESOURCE_API_URL", "IMAGES_PATH", "MODEL_CACHE_DIR", "JOURNAL_STREAM")
    }
    env.update(
        PYTHONUNBUFFERED="1",
        LOADER_SOCKET_PATH=str(root / "run" / "loader.sock"),
        LOADER_HTTP_PORT=str(free_port()),
        LOADER_STATE_DIR=str(root / "state"),
        MODEL_CACHE_DIR=str(root / "cache"),
        IMAGES_PATH=str(root / "images.enc"),
        # Nothing listens there unless a test gives a dev-api.
        RESOURCE_API_URL=f"http://127.0.0.1:{free_port()}",
        LOADER_AUTO_UNLOCK="false",
        LOADER_LOG_LEVEL="DEBUG",
        # The tests run as root (always allowed); the package's group does not exist here.
        LOADER_ALLOWED_GROUPS="root",
    )
    env.update(overrides)
    return env
