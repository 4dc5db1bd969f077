"""``azaion-loader status``: exit codes as ``vault status`` has them, against the real agent.

0 the images are ready, 1 error (the unlock failed, or no agent answers), 2 locked or the unlock
in progress. ``--json`` prints the agent's own GET /status document with the same exit codes.
Every state is reached for real: idle (no unlock started), waiting (credentials, but no Resource
API answers), error (an archive but no credentials) and ready (a packed archive, dev-api and the
test dockerd).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.agent import REPO, AgentProcess, wait_for
from tests.fixtures.archive import publish, unlock_settings
from tests.fixtures.devapi import DevApi
from tests.fixtures.dockerd import Dockerd, import_image

MakeAgent = Callable[..., AgentProcess]
READY, ERROR, LOCKED = 0, 1, 2
STATE_TIMEOUT = 20.0


def assert_status(agent: AgentProcess, code: int) -> dict[str, Any]:
    """``status`` and ``status --json`` both exit ``code``; returns the JSON document."""
    human = agent.cli("status")
    assert human.returncode == code, human.stdout + human.stderr
    assert human.stderr == ""
    assert "  images:        " in human.stdout
    as_json = agent.cli("status", "--json")
    assert as_json.returncode == code, as_json.stdout + as_json.stderr
    document: dict[str, Any] = json.loads(as_json.stdout)
    return document


def assert_settled_status(agent: AgentProcess, code: int, state: str) -> None:
    """In a state that no longer changes, ``--json`` is exactly GET /status's document."""
    document = assert_status(agent, code)
    assert document["unlock"]["state"] == state
    assert document == agent.request("GET", "/status").json()


def unlock_state(agent: AgentProcess) -> str:
    return str(agent.request("GET", "/unlock/status").json()["state"])


def status_without_agent(socket_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "status", "--socket", str(socket_path), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_locked_images_exit_2(shared_agent: AgentProcess) -> None:
    assert unlock_state(shared_agent) == "idle"
    assert_settled_status(shared_agent, LOCKED, "idle")


def test_an_unlock_in_progress_exits_2(make_agent: MakeAgent, agent_root: Path) -> None:
    archive = agent_root / "images.enc"
    archive.write_bytes(b"never read: the API is down before the key")
    agent = make_agent(AZAION_EMAIL="device@example.com", AZAION_PASSWORD="unused-password")
    assert agent.request("POST", "/unlock", {}).status == 202
    # No Resource API listens: the unlock tries, backs off and tries again, as long as it takes.
    trying = ("authenticating", "waiting")
    wait_for(lambda: unlock_state(agent) in trying, STATE_TIMEOUT, "the unlock to log in")
    document = assert_status(agent, LOCKED)
    # It goes on between the two calls (and counts down): compare all but the unlock's fields.
    assert document["unlock"]["state"] in trying
    current = agent.request("GET", "/status").json()
    assert document.keys() == current.keys()
    assert {**document, "unlock": None} == {**current, "unlock": None}


def test_a_failed_unlock_exits_1(make_agent: MakeAgent, agent_root: Path) -> None:
    (agent_root / "images.enc").write_bytes(b"never read: no credentials to fetch the key")
    agent = make_agent()
    agent.request("POST", "/unlock", {})
    wait_for(lambda: unlock_state(agent) == "error", STATE_TIMEOUT, "the unlock to fail")
    assert_settled_status(agent, ERROR, "error")
    assert "images:        error: " in agent.cli("status").stdout


@pytest.fixture
def socket_nobody_listens_on(agent_root: Path) -> Iterator[Path]:
    """A Unix socket that exists but is not listening: connecting is refused."""
    path = agent_root / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield path


@pytest.mark.parametrize("options", [(), ("--json",)])
def test_no_agent_exits_1_with_one_line(
    socket_nobody_listens_on: Path, agent_root: Path, options: tuple[str, ...]
) -> None:
    for path in (socket_nobody_listens_on, agent_root / "missing.sock"):
        result = status_without_agent(path, *options)
        assert result.returncode == ERROR, result.stderr
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("azaion-loader: error: the agent is not running: "), lines
        assert str(path) in lines[0]


def test_help_states_the_exit_codes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for line in ("0 the images are ready", "1 error: the unlock failed", "2 the images are locked"):
        assert line in help_text, result.stdout


@pytest.mark.docker
def test_ready_images_exit_0(
    make_agent: MakeAgent, dockerd: Dockerd, dev_api: DevApi, agent_root: Path
) -> None:
    ref = f"azaion/status-{secrets.token_hex(4)}:1.0"
    archive = publish(dockerd, dev_api, ref, import_image(dockerd.client, ref), agent_root)
    agent = make_agent(**unlock_settings(dockerd, dev_api, archive))
    waited = agent.cli("unlock", "--wait")
    assert waited.returncode == 0, waited.stderr + agent.log()
    assert_settled_status(agent, READY, "ready")
