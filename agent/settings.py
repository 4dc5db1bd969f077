"""Settings from the environment (names and defaults fixed by DESIGN.md).

The systemd unit also reads them from ``/etc/azaion-loader/loader.env``. Credentials come from
``AZAION_EMAIL`` / ``AZAION_PASSWORD`` or, preferably, from the files ``email`` and ``password``
in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``); the environment wins when both exist.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.defaults import DEFAULT_SOCKET_PATH
from agent.errors import ConfigError

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    resource_api_url: str = "https://api.azaion.com"
    images_path: Path = Path("/opt/azaion/images.enc")
    api_version: str = "latest"
    loader_socket_path: Path = Path(DEFAULT_SOCKET_PATH)
    loader_http_host: str = "127.0.0.1"
    loader_http_port: int = Field(default=8765, ge=0, le=65535)
    loader_auto_unlock: bool = True
    loader_state_dir: Path = Path("/var/lib/azaion-loader")
    model_cache_dir: Path = Path("/var/cache/azaion-loader")
    # The most the big-part cache keeps (bytes); unset: a quarter of its file system, when the
    # agent starts (agent.cache.default_max_bytes).
    loader_cache_max_bytes: int | None = None
    loader_device_fragment_path: Path | None = None
    # Publisher keys the device trusts (*.pub); with one installed, everything must be signed.
    loader_publishers_dir: Path = Path("/etc/azaion-loader/publishers.d")
    # Accept a signed archive whose release is lower than the installed one (for this boot).
    loader_allow_downgrade: bool = False
    docker_host: str | None = None
    azaion_email: str | None = None
    azaion_password: SecretStr | None = None
    # Limits on what local callers may send: JSON bodies are small; uploads stream.
    loader_max_json_bytes: int = Field(default=64 * 1024, gt=0)
    loader_max_upload_bytes: int = Field(default=16 * 1024 * MiB, gt=0)
    # How long a graceful stop waits for responses in flight.
    loader_shutdown_timeout: float = Field(default=10.0, gt=0)
    # Local connections: at most this many open on each listener (the Unix socket keeps its
    # own budget, so a flood of TCP connections never starves it); a connection that sends no
    # complete request head for this long (idle keep-alive included) is closed; a request body
    # that stalls this long between two pieces is refused.
    loader_max_connections: int = Field(default=256, ge=4, le=16384)
    loader_idle_timeout: float = Field(default=15.0, gt=0)
    loader_body_timeout: float = Field(default=60.0, gt=0)
    # Upstream transfers (Resource API, CDN): the largest big part a small part may claim, the
    # least throughput a transfer must keep over each window, and its overall deadline.
    loader_max_resource_bytes: int = Field(default=16 * 1024 * MiB, gt=0)
    loader_upstream_min_rate: int = Field(default=16 * 1024, ge=0)
    loader_upstream_rate_window: float = Field(default=30.0, gt=0)
    loader_upstream_deadline: float = Field(default=3600.0, gt=0)
    # All /load calls together hold at most this much ciphertext and plaintext in memory
    # (agent.resources.LoadBuffers); loads beyond it wait their turn, first come first served.
    loader_load_buffer_mib: int = Field(default=32, ge=4, le=4096)
    loader_log_level: str = "INFO"
    # Groups whose members (besides root and the agent's own user) may call the endpoints that
    # change state or return protected data; resolved when serve starts (agent.peers).
    loader_allowed_groups: str = "azaion-loader"

    @field_validator("loader_cache_max_bytes")
    @classmethod
    def _cache_bound(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(
                "must be a number of bytes greater than 0 (unset: a quarter of the cache's "
                "file system)"
            )
        return value

    @field_validator("loader_log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("resource_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value.startswith("http://"):
            # Plain HTTP would carry the password and tokens in the clear: only a local
            # reference server (dev-api) may be reached that way.
            if not is_loopback(urlsplit(value).hostname or ""):
                raise ValueError("must use https:// (http:// only for a loopback dev-api)")
        elif not value.startswith("https://"):
            raise ValueError("must start with https://")
        return value.rstrip("/")

    @field_validator("loader_http_host")
    @classmethod
    def _loopback_host(cls, value: str) -> str:
        # The Host/Origin guard stops browsers, not programs on the network: the port must not
        # be reachable from outside this device at all.
        if not is_loopback(value):
            raise ValueError("must be a loopback address (127.0.0.1, ::1 or localhost)")
        return value

    @field_validator(
        "images_path",
        "loader_socket_path",
        "loader_state_dir",
        "model_cache_dir",
        "loader_device_fragment_path",
        "loader_publishers_dir",
    )
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value

    @field_validator("loader_socket_path")
    @classmethod
    def _fits_sun_path(cls, value: Path) -> Path:
        if len(os.fsencode(value)) > 107:
            raise ValueError("is longer than a Unix socket path may be (107 bytes)")
        return value


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _credentials_from_directory(environ: Mapping[str, str]) -> dict[str, str]:
    """Read ``email`` / ``password`` from systemd's credentials directory, if any."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    found: dict[str, str] = {}
    if not directory:
        return found
    for name, field in (("email", "azaion_email"), ("password", "azaion_password")):
        path = Path(directory, name)
        try:
            found[field] = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read credential {path}: {exc.strerror}") from exc
    return found


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build the settings from ``environ`` (default ``os.environ``) and explicit overrides.

    A bad value raises ``ConfigError`` naming the variable, never echoing the value (it may be
    a secret).
    """
    env = dict(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    for field in Settings.model_fields:
        for key in (field.upper(), field):
            # An empty assignment (``FOO=`` in loader.env) means "not set": keep the default.
            if env.get(key):
                values[field] = env[key]
                break
    for field, value in _credentials_from_directory(env).items():
        values.setdefault(field, value)
    values.update(overrides)
    try:
        # Validate our merged mapping only: the environment was already read above.
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    name = str(first["loc"][0]).upper() if first["loc"] else "settings"
    message = str(first["msg"])
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more invalid setting{'s' if more > 1 else ''})" if more else ""
    return f"invalid setting {name}: {message}{suffix}"
