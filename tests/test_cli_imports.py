"""What the command line imports, and when: each command pays only for what it uses.

``serve`` reaches READY=1 without the Docker SDK (the unlock imports it in a worker thread when
it first talks to the engine), the metrics library, the socket client, the packer, the OpenAPI
document or the development tools; a missing module it imports later still stops it at start
with one line.
Other commands do not import the agent's server, the format's cryptography or the development
CLI unless they use them; ``dev-api`` still shows its real flags. Each case runs in a fresh
interpreter (``sys.modules`` of this one holds whatever other tests imported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.cli.devapi import HELP
from tests.fixtures.agent import REPO

# Runs ``serve`` in this process; when READY=1 arrives on its NOTIFY_SOCKET, prints the
# modules imported by then and the garbage collector's state, and stops the agent as systemd
# would (SIGTERM).
SERVE_UNTIL_READY = """
import gc, json, os, signal, socket, sys, threading
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.bind(os.environ["NOTIFY_SOCKET"])

def on_ready():
    while b"READY=1" not in notify.recv(4096):
        pass
    print(json.dumps({
        "modules": sorted(sys.modules),
        "gc_enabled": gc.isenabled(),
        "frozen": gc.get_freeze_count(),
        "full_collections": gc.get_stats()[2]["collections"],
    }), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=on_ready, daemon=True).start()
from agent.cli import main
raise SystemExit(main(["serve"]))
"""
NOT_BEFORE_READY = (
    "docker",
    "requests",
    "urllib3",
    "agent.images",  # the SDK's user; the unlock talks to the engine through agent.engine
    "agent.localclient",
    "agent.pack",
    "agent.openapi",
    "azaion_loader_dev.cli",
    "prometheus_client",  # the metrics' registry is made by the first request
)


def serve_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "LOADER_SOCKET_PATH": str(tmp_path / "loader.sock"),
        "LOADER_HTTP_PORT": "0",
        "LOADER_STATE_DIR": str(tmp_path / "state"),
        "MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "IMAGES_PATH": str(tmp_path / "none.enc"),
        "LOADER_AUTO_UNLOCK": "false",
    }


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_reaches_ready_without_the_docker_sdk(tmp_path: Path) -> None:
    result = run_python(SERVE_UNTIL_READY, serve_env(tmp_path))
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout)["modules"])
    assert {"aiohttp.web", "agent.server", "agent.unlock"} <= modules  # it did serve
    assert [name for name in NOT_BEFORE_READY if name in modules] == []


def test_serve_collects_no_garbage_until_serving_then_collects_again(tmp_path: Path) -> None:
    """Start-up ran without a full collection (with one, the ~500 modules' objects cost ~25 ms);
    at READY=1 they are frozen out of later passes and collection is back on."""
    result = run_python(SERVE_UNTIL_READY, serve_env(tmp_path))
    assert result.returncode == 0, result.stderr
    at_ready = json.loads(result.stdout)
    assert at_ready["full_collections"] == 0
    assert at_ready["gc_enabled"] is True
    assert at_ready["frozen"] > 20_000  # start-up's objects (tens of thousands), not a handful


@pytest.mark.parametrize("missing", ["prometheus_client"])
def test_serve_without_a_module_it_imports_later_stops_at_start(
    tmp_path: Path, missing: str
) -> None:
    code = f"import sys; sys.modules[{missing!r}] = None\n{SERVE_UNTIL_READY}"
    result = run_python(code, serve_env(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""  # never READY=1
    [line] = result.stderr.splitlines()
    assert line.startswith("azaion-loader: error: this installation is incomplete: ")
    assert "not installed (reinstall azaion-loader)" in line


@pytest.mark.parametrize(
    ("argv", "not_imported"),
    [
        (["status"], ["agent.localclient", "agent.service", "cryptography", "docker"]),
        (["encrypt", "--key-fragment", "k", "a", "b"], ["agent.stream", "aiohttp", "pydantic"]),
        (["pack-images", "--out", "a", "--fragment-out", "f", "i"], ["agent.images", "docker"]),
        (["dev-api", "--port", "0"], ["azaion_loader_dev.cli", "aiohttp"]),
    ],
    ids=["status", "encrypt", "pack-images", "dev-api"],
)
def test_parsing_a_command_imports_none_of_what_commands_run(
    argv: list[str], not_imported: list[str]
) -> None:
    code = (
        "import json, sys\nfrom agent.cli import build_parser\n"
        f"build_parser(lazy=True).parse_args({argv!r})\nprint(json.dumps(sorted(sys.modules)))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout))
    assert [name for name in not_imported if name in modules] == []


def subcommands(lazy: bool) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    (sub,) = (a for a in build_parser(lazy=lazy)._actions if a.dest == "command")
    assert isinstance(sub, argparse._SubParsersAction)
    return sub


def summaries(lazy: bool) -> dict[str, str | None]:
    return {action.dest: action.help for action in subcommands(lazy)._get_subactions()}


def test_the_dev_api_stand_in_has_the_real_summary() -> None:
    assert summaries(lazy=True) == summaries(lazy=False)
    assert summaries(lazy=False)["dev-api"] == HELP


def test_dev_api_help_through_main_is_the_real_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # the same width here and in the child
    expected = subcommands(lazy=False).choices["dev-api"].format_help()
    assert "--data-dir DIR" in expected
    result = subprocess.run(
        [sys.executable, "-m", "agent", "dev-api", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
