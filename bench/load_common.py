"""What the ``/load`` benchmarks share (``bench_load_socket.py``, ``bench_load_memory.py``,
``bench_load_cold.py``): the setting (a scratch directory, a dev-api, a real agent logged in to
it, a resource uploaded through the agent), the loads over the socket or loopback TCP, the raw
CDN download, and a probe process asking ``/status`` or ``/health`` while they run.

Not a benchmark itself (``make bench`` runs ``bench/bench_*.py`` only); the scripts import it
by name (``import load_common``: their own directory is first on ``sys.path``). Run as a script,
it is the probe (``--probe SOCKET --path /health``), so the probe's waits are the agent's, not
those of the busy benchmark process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.api_client import ResourceApiClient
from agent.localclient import AgentClient, UnixConnection
from azaion_loader_dev.harness.agent import AgentProcess, agent_env
from azaion_loader_dev.harness.devapi import DevApi
from azaion_loader_dev.harness.measure import MIB, cpu_seconds

FOLDER = "bench"
READ_BLOCK = MIB  # a /load client reads 1 MiB at a time
LOAD_TIMEOUT = 120.0  # seconds without a byte of a /load answer
PROBE_PAUSE = 0.005  # between probes: a steady trickle, not a flood

Timing = dict[str, float]  # "seconds" (wall) and "cpu"


def machine() -> str:
    """The first line of a benchmark's output."""
    return f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}"


@contextlib.contextmanager
def scratch(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A temporary directory, removed at the end. Short: a Unix socket path must fit in 108
    bytes."""
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-{secrets.token_hex(2)}-", dir=parent or "/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the agent -------------------------------------------------------------------------------------


def start_agent(root: Path, api: DevApi, tree: Path | None = None, **env: str) -> AgentProcess:
    """A fresh agent logged in to ``api``, at the log level a device runs at (``env`` on top);
    with ``tree``, that checkout's agent (``--compare``)."""
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "RESOURCE_API_URL": api.url,
        "LOADER_LOG_LEVEL": "INFO",
        "AZAION_EMAIL": api.email,
        "AZAION_PASSWORD": api.password,
        **env,
    }
    agent = AgentProcess(root, agent_env(root, **settings))
    if tree is not None:
        run = f"import sys, runpy; sys.path.insert(0, {str(tree)!r}); runpy.run_module('agent')"
        agent.argv = [sys.executable, "-c", run, "serve"]
    return agent.start()


def pid_of(agent: AgentProcess) -> int:
    assert agent.proc is not None
    return agent.proc.pid


def upload(agent: AgentProcess, source: Path, name: str) -> dict[str, Any]:
    """``source`` uploaded through the agent's socket as ``FOLDER/name``: the agent's answer
    (``big_sha256``, ``big_size``...)."""
    return AgentClient(agent.socket_path, timeout=600).upload(source, FOLDER, name)


def drop_cached(agent: AgentProcess, big_name: str) -> None:
    """Delete the cached big part (and any partial download): the next load fetches it."""
    directory = Path(agent.env["MODEL_CACHE_DIR"]) / FOLDER
    for path in (directory / big_name, directory / f".{big_name}.part"):
        path.unlink(missing_ok=True)


# -- loads -----------------------------------------------------------------------------------------


@dataclass
class Loaded:
    size: int  # body bytes
    first_byte: float  # time.perf_counter() when the first body bytes were read


def http_load(conn: http.client.HTTPConnection, name: str, digest: Any = None) -> Loaded:
    """``POST /load/<name>`` on ``conn`` (closed at the end), the body read ``READ_BLOCK`` at a
    time into one buffer, and hashed into ``digest`` if given."""
    try:
        body = json.dumps({"folder": FOLDER}).encode()
        conn.request("POST", f"/load/{name}", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit(f"/load/{name} answered {response.status}: {response.read()!r}")
        buffer = memoryview(bytearray(READ_BLOCK))
        first_byte = 0.0
        total = 0
        while count := response.readinto(buffer):
            if not total:
                first_byte = time.perf_counter()
            total += count
            if digest is not None:
                digest.update(buffer[:count])
        return Loaded(total, first_byte)
    finally:
        conn.close()


def socket_load(socket_path: Path, name: str, digest: Any = None) -> Loaded:
    """A ``/load`` over the agent's Unix socket."""
    return http_load(UnixConnection(socket_path, timeout=LOAD_TIMEOUT), name, digest)


def tcp_load(port: int, name: str, digest: Any = None) -> Loaded:
    """The same over loopback TCP."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=LOAD_TIMEOUT)
    return http_load(connection, name, digest)


def check_one_load(agent: AgentProcess, name: str, size: int, expected_sha256: str) -> None:
    """One load over the socket must send the plaintext: ``size`` bytes of that SHA-256."""
    digest = hashlib.sha256()
    received = socket_load(agent.socket_path, name, digest).size
    if received != size or digest.hexdigest() != expected_sha256:
        raise SystemExit(f"/load/{name} sent {received} bytes that are not the plaintext")


async def cdn_download(api: DevApi, big_name: str) -> Timing:
    """dev-api's raw CDN download of a big part (aiohttp GET, bytes discarded), timed from the
    first request after the login; CPU seconds of this process."""
    async with ResourceApiClient(api.url) as client:
        client.set_credentials(api.email, api.password)
        await client.login()
        wall, cpu = time.perf_counter(), cpu_seconds()
        async for _ in client.iter_big_part(FOLDER, big_name):
            pass
        return {"seconds": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}


# -- the probe -------------------------------------------------------------------------------------


def ask_once(socket_path: Path, path: str) -> float:
    """Seconds for one ``GET path`` on a new connection, as a local app would make it."""
    start = time.perf_counter()
    conn = UnixConnection(socket_path, timeout=10.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}")
    finally:
        conn.close()
    return time.perf_counter() - start


def probe_child(socket_path: Path, path: str) -> None:
    """Ask ``path`` until stdin closes; print [[monotonic start, seconds], ...] as JSON."""
    stop = threading.Event()

    def wait_for_stdin_to_close() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin_to_close, daemon=True).start()
    samples: list[tuple[float, float]] = []
    print("ready", flush=True)
    while not stop.is_set():
        started = time.monotonic()
        samples.append((started, ask_once(socket_path, path)))
        time.sleep(PROBE_PAUSE)
    print(json.dumps(samples), flush=True)


class Probe:
    """A separate process asking ``path`` (``/status``, ``/health``) every ``PROBE_PAUSE``
    while a load runs, each time on a new connection."""

    def __init__(self, socket_path: Path, path: str) -> None:
        self.path = path
        self._process = subprocess.Popen(
            [sys.executable, __file__, "--probe", str(socket_path), "--path", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        if self._process.stdout.readline().strip() != "ready":
            raise SystemExit(f"the {path} probe did not start")

    def latencies(self, start: float | None = None, end: float | None = None) -> list[float]:
        """Stop; the latencies (s) of the probes (started between ``start`` and ``end``, in
        ``time.monotonic()``, if given)."""
        out, _ = self._process.communicate("", timeout=60)
        if self._process.returncode != 0:
            raise SystemExit(f"the {self.path} probe failed")
        return [
            seconds
            for at, seconds in json.loads(out)
            if (start is None or start <= at) and (end is None or at <= end)
        ]


def quantile_ms(samples: list[float], q: float) -> float:
    """The ``q`` quantile of latencies in seconds, in milliseconds."""
    ordered = sorted(samples)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description="the probe of the /load benchmarks")
    parser.add_argument("--probe", type=Path, required=True, help="the agent's socket")
    parser.add_argument("--path", default="/health", help="what to ask (/health)")
    args = parser.parse_args()
    probe_child(args.probe, args.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
