"""The agent's endpoints end to end: real agent process, real dev-api over loopback."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.agent import REPO, AgentProcess, login
from tests.fixtures.devapi import DevApi

MakeAgent = Callable[..., AgentProcess]


def test_login_good_bad_and_offline(make_agent: MakeAgent, dev_api: DevApi) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    bad = agent.request("POST", "/login", {"email": dev_api.email, "password": "wrong-pass-123"})
    assert bad.status == 401
    assert bad.json()["error"] == "bad_credentials"
    assert agent.request("GET", "/status").json()["authenticated"] is False

    good = agent.request("POST", "/login", {"email": dev_api.email, "password": dev_api.password})
    assert good.status == 200, good.body
    assert good.json() == {"status": "ok", "verified": True}
    assert agent.request("GET", "/status").json()["authenticated"] is True

    dev_api.stop()
    offline = agent.request(
        "POST", "/login", {"email": dev_api.email, "password": dev_api.password}
    )
    assert offline.status == 200
    assert offline.json()["verified"] is False

    log = agent.log()
    assert dev_api.password not in log
    assert "wrong-pass-123" not in log
    assert dev_api.email in log  # the log does say who logged in


def test_cli_login_reads_password_from_env_and_stdin(
    make_agent: MakeAgent, dev_api: DevApi
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    from_env = agent.cli("login", "--email", dev_api.email, AZAION_PASSWORD=dev_api.password)
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout.strip() == "logged in"
    wrong = agent.cli("login", "--email", dev_api.email, input="not-the-password\n")
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("azaion-loader: error: ")
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert "not-the-password" not in wrong.stderr + agent.log()


def test_upload_then_load_round_trip_over_the_socket(
    make_agent: MakeAgent, dev_api: DevApi, agent_root: Path
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = agent_root / "model.bin"
    source.write_bytes(data)

    up = agent.cli("upload", str(source), "--folder", "models", "--json")
    assert up.returncode == 0, up.stderr
    out = agent_root / "loaded.bin"
    down = agent.cli("load", "model.bin", "--folder", "models", "-o", str(out))
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()

    reply = agent.request("POST", "/load/model.bin", {"folder": "models"})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert int(reply.headers["Content-Length"]) == len(data)
    assert reply.body == data
    # The cache holds ciphertext only: the plaintext appears in no file under the agent's dirs.
    probe = data[4096 : 4096 + 64]
    for path in Path(agent.env["MODEL_CACHE_DIR"]).rglob("*"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):  # the index's temp file
            assert probe not in path.read_bytes()  # may come and go meanwhile


def test_load_missing_resource_is_404_and_cli_leaves_no_file(
    make_agent: MakeAgent, dev_api: DevApi, agent_root: Path
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    reply = agent.request("POST", "/load/absent.bin", {"folder": "models"})
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"
    out = agent_root / "absent.bin"
    result = agent.cli("load", "absent.bin", "--folder", "models", "-o", str(out))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in agent_root.iterdir() if p.name.startswith(".absent.bin.")]


def test_load_without_credentials_is_401(make_agent: MakeAgent, dev_api: DevApi) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    reply = agent.request("POST", "/load/model.bin", {"folder": "models"})
    assert reply.status == 401
    assert reply.json()["error"] == "not_authenticated"


def test_upload_with_folder_after_file_is_refused_clearly(
    make_agent: MakeAgent, dev_api: DevApi
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\n'
        b'abc\r\n--b\r\nContent-Disposition: form-data; name="folder"\r\n\r\nmodels\r\n--b--\r\n'
    )
    reply = agent.request(
        "POST", "/upload/m.bin", body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert reply.status == 400
    assert "folder" in reply.json()["message"]


def test_unlock_without_archive_is_404(make_agent: MakeAgent, dev_api: DevApi) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    reply = agent.request("POST", "/unlock")
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"
    status = agent.request("GET", "/unlock/status").json()
    assert set(status) >= {"state", "error", "progress"}


def test_cli_unlock_without_agent_fails_clearly(agent_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "unlock", "--wait", "--socket", str(agent_root / "x")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "the agent is not running" in result.stderr


def test_status_says_whether_signatures_are_enforced(
    make_agent: MakeAgent, dev_api: DevApi, tmp_path: Path
) -> None:
    """Read afresh on each /status: no key, then a key and a broken key file installed."""
    from agent import signing

    publishers = tmp_path / "publishers.d"
    publishers.mkdir()
    agent = make_agent(RESOURCE_API_URL=dev_api.url, LOADER_PUBLISHERS_DIR=str(publishers))
    before = agent.request("GET", "/status").json()["signatures"]
    assert before == {"enforced": False, "keys": [], "problems": []}

    public = signing.write_key_pair(tmp_path / "publisher.key", "team")
    (publishers / "team.pub").write_text(public.to_line())
    (publishers / "broken.pub").write_text("not a key\n")
    after = agent.request("GET", "/status").json()["signatures"]

    assert after["enforced"] is True and after["keys"] == [public.name]
    assert len(after["problems"]) == 1 and "broken.pub" in after["problems"][0]
