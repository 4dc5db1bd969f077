"""Settings: names and defaults of DESIGN.md, credentials files, clear errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.settings import load_settings
from tests.fixtures.agent import REPO, agent_env


def test_defaults_are_the_documented_ones() -> None:
    s = load_settings({})
    assert s.resource_api_url == "https://api.azaion.com"
    assert s.images_path == Path("/opt/azaion/images.enc")
    assert s.api_version == "latest"
    assert s.loader_socket_path == Path("/run/azaion-loader/loader.sock")
    assert (s.loader_http_host, s.loader_http_port) == ("127.0.0.1", 8765)
    assert s.loader_auto_unlock is True
    assert s.loader_state_dir == Path("/var/lib/azaion-loader")
    assert s.model_cache_dir == Path("/var/cache/azaion-loader")
    assert s.loader_device_fragment_path is None
    assert s.docker_host is None
    assert s.azaion_email is None and s.azaion_password is None


def test_environment_names_are_read() -> None:
    s = load_settings(
        {
            "RESOURCE_API_URL": "http://127.0.0.1:9/",
            "LOADER_HTTP_PORT": "0",
            "LOADER_AUTO_UNLOCK": "false",
            "DOCKER_HOST": "unix:///tmp/d.sock",
            "API_VERSION": "1.2",
            "LOADER_DEVICE_FRAGMENT_PATH": "",  # empty means unset
        }
    )
    assert s.resource_api_url == "http://127.0.0.1:9"
    assert s.loader_http_port == 0
    assert s.loader_auto_unlock is False
    assert s.docker_host == "unix:///tmp/d.sock"
    assert s.api_version == "1.2"
    assert s.loader_device_fragment_path is None


def test_credentials_directory_and_environment_precedence(tmp_path: Path) -> None:
    (tmp_path / "email").write_text("op@example.com\n")
    (tmp_path / "password").write_text("from-file-secret\n")
    s = load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert s.azaion_email == "op@example.com"
    assert s.azaion_password is not None
    assert s.azaion_password.get_secret_value() == "from-file-secret"
    s = load_settings({"CREDENTIALS_DIRECTORY": str(tmp_path), "AZAION_PASSWORD": "env-wins"})
    assert s.azaion_password is not None
    assert s.azaion_password.get_secret_value() == "env-wins"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("LOADER_HTTP_PORT", "abc", "valid integer"),
        ("LOADER_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("LOADER_SOCKET_PATH", "relative/loader.sock", "absolute path"),
        ("LOADER_STATE_DIR", "state", "absolute path"),
        ("LOADER_AUTO_UNLOCK", "perhaps", "valid boolean"),
        ("RESOURCE_API_URL", "ftp://x", "https://"),
        ("RESOURCE_API_URL", "http://api.azaion.com", "https://"),
        ("LOADER_HTTP_HOST", "0.0.0.0", "loopback"),
        ("LOADER_HTTP_HOST", "192.168.1.5", "loopback"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert str(info.value).startswith(f"invalid setting {name}: ")
    assert says in str(info.value)


def test_serve_with_bad_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    env = agent_env(tmp_path, LOADER_HTTP_PORT="abc", AZAION_PASSWORD="hunter2-secret")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "LOADER_HTTP_PORT" in lines[0]
    assert "hunter2-secret" not in result.stderr + result.stdout
    assert not Path(env["LOADER_SOCKET_PATH"]).exists()


def test_bad_password_value_is_never_echoed() -> None:
    # A password too long for anything is still not echoed back in an error.
    with pytest.raises(ConfigError) as info:
        load_settings({"LOADER_HTTP_PORT": "x", "AZAION_PASSWORD": "p@ss-do-not-show"})
    assert "p@ss-do-not-show" not in str(info.value)
