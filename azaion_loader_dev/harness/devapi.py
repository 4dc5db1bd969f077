"""dev-api, the reference Resource API + CDN, as a subprocess on a free loopback port.

``new_dev_api(directory)`` starts one with generated credentials and images key fragment, its
data, fragment and log in ``directory``; ``DevApi`` stops it, restarts it on the same port
("API down, then up") and drives its ``/_dev/`` admin endpoints (faults, statistics).
"""

from __future__ import annotations

import json
import secrets
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent import keys
from azaion_loader_dev.harness.process import stop_process

PROJECT_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
ANNOUNCEMENT = "dev-api listening on "


@dataclass
class DevApi:
    """A dev-api subprocess and what a client needs to talk to it."""

    data_dir: Path
    email: str
    password: str
    key_fragment: bytes
    key_fragment_path: Path
    log_path: Path | None  # None: its log goes to our stderr
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[str] | None = None
    # The command before its options (a test may start it as ``azaion-loader dev-api``).
    argv: list[str] = field(
        default_factory=lambda: [sys.executable, "-m", "azaion_loader_dev", "dev-api"]
    )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start it (on the port it had before, if it ran already) and wait until it listens."""
        command = [
            *self.argv,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--user",
            f"{self.email}:{self.password}",
            "--key-fragment",
            str(self.key_fragment_path),
            *self.extra_args,
        ]
        log: AbstractContextManager[IO[str] | None] = (
            self.log_path.open("a") if self.log_path else nullcontext()
        )
        with log as stderr:
            self.process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.port = self._read_port(self.process)

    def _read_port(self, process: subprocess.Popen[str]) -> int:
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                line = process.stdout.readline()
                if line.startswith(ANNOUNCEMENT):
                    return int(line.strip().rsplit(":", 1)[1])
            if process.poll() is not None:
                break
        process.kill()
        process.wait()
        log = self.log_path.read_text() if self.log_path else "(on stderr, above)"
        raise RuntimeError(f"dev-api did not start; its log:\n{log}")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, timeout=STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- the /_dev/ admin endpoints --------------------------------------------------------

    def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def faults(self, **spec: Any) -> None:
        """Arm one fault, e.g. ``faults(status=503, count=3)``; see docs/resource-api.md."""
        self._admin("POST", "/_dev/faults", spec)

    def clear_faults(self) -> None:
        self._admin("DELETE", "/_dev/faults")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("GET", "/_dev/stats")
        return result

    def clear_stats(self) -> None:
        self._admin("DELETE", "/_dev/stats")

    def count(self, method: str, path_prefix: str) -> int:
        """How many requests of ``method`` to paths starting with ``path_prefix`` it served."""
        counts: dict[str, int] = self.stats()["requests"]
        return sum(
            n
            for key, n in counts.items()
            if key.partition(" ")[0] == method and key.partition(" ")[2].startswith(path_prefix)
        )

    def log(self, path_prefix: str = "/") -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.stats()["log"]
        return [entry for entry in entries if entry["path"].startswith(path_prefix)]


def new_dev_api(
    directory: Path,
    extra_args: Sequence[str] = (),
    *,
    email: str | None = None,
    password: str | None = None,
    log_to_stderr: bool = False,
) -> DevApi:
    """A started dev-api keeping everything in ``directory``: its data (``data/``), its images
    key fragment (``images.fragment``, made unless there is one) and its log (``dev-api.log``,
    or our stderr). Credentials not given are generated."""
    directory.mkdir(parents=True, exist_ok=True)
    fragment_path = directory / "images.fragment"
    if fragment_path.exists():
        fragment = keys.read_fragment_file(fragment_path)
    else:
        fragment = keys.generate_fragment()
        keys.write_fragment_file(fragment_path, fragment)
    api = DevApi(
        data_dir=directory / "data",
        email=email or f"device-{secrets.token_hex(4)}@example.test",
        password=password or secrets.token_urlsafe(16),
        key_fragment=fragment,
        key_fragment_path=fragment_path,
        log_path=None if log_to_stderr else directory / "dev-api.log",
        extra_args=list(extra_args),
    )
    api.start()
    return api
