"""The local API's request and response bodies, as pydantic models.

Requests are validated with them (``agent.server``); the OpenAPI document (``agent.openapi``)
is generated from them, so the document and the code cannot drift apart.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from agent.defaults import NAME_MAX_LENGTH

MAX_FIELD = 1024
# A resource or folder name: one plain path component. Letters, digits, '.', '_', '-', '+',
# starting with a letter or digit, never "..". Written without look-ahead so that JSON Schema
# tools (and hypothesis) can use it as is. The server validates every name with it.
NAME_PATTERN = r"[A-Za-z0-9](?:\.?[A-Za-z0-9_+-])*\.?"
_NAME = f"^{NAME_PATTERN}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_FIELD)


class LoginRequest(_Request):
    email: str = Field(max_length=MAX_FIELD)
    password: SecretStr = Field(max_length=MAX_FIELD)


class UnlockRequest(_Request):
    """Optional credentials: both, or neither."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["email", "password"], "properties": {
                    "email": {"type": "string"}, "password": {"type": "string"}}},
                {"properties": {"email": {"type": "null"}, "password": {"type": "null"}}},
            ]
        }
    )  # fmt: skip
    email: str | None = Field(default=None, min_length=1, max_length=MAX_FIELD)
    password: SecretStr | None = Field(default=None, min_length=1, max_length=MAX_FIELD)

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.email is not None and self.password is not None:
            return self.email, self.password.get_secret_value()
        return None

    @property
    def partial(self) -> bool:
        """One of the two without the other."""
        return (self.email is None) != (self.password is None)


class LoadRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"folder": "models"}]})

    folder: str = Field(pattern=_NAME, max_length=NAME_MAX_LENGTH)
    filename: str | None = Field(
        default=None,
        pattern=_NAME,
        max_length=NAME_MAX_LENGTH,
        description="if given, must equal the path's",
    )


class HealthResponse(BaseModel):
    status: Literal["healthy"]


class UnlockState(StrEnum):
    """The unlock workflow's states (``agent.unlock`` draws how they follow each other)."""

    IDLE = "idle"
    CHECKING = "checking"
    WAITING = "waiting"  # backing off a transient fault; progress.stage says which stage
    AUTHENTICATING = "authenticating"
    DOWNLOADING_KEY = "downloading_key"
    LOADING = "loading"
    VERIFYING = "verifying"
    READY = "ready"
    ERROR = "error"


class UnlockProgress(BaseModel):
    stage: UnlockState
    bytes_done: int
    bytes_total: int
    percent: float


class UpdateStatus(BaseModel):
    """The last update (a new archive loaded beside the installed release): ``ready`` once it
    is the installed release, ``error`` if it failed (the device stays on the release before)."""

    state: UnlockState
    error: str | None
    progress: UnlockProgress
    message: str | None = None
    release: int | None = None


class UnlockStatus(BaseModel):
    """``/unlock/status``, and the ``unlock`` of ``/status``: made by ``UnlockManager``."""

    state: UnlockState
    error: str | None
    progress: UnlockProgress
    message: str | None = None
    attempt: int | None = None
    next_retry_in: float | None = None
    retry_reason: str | None = None
    images: int | None = None
    release: int | None = None  # the installed release, once ready
    publisher: str | None = None  # the key id whose signature it carries, if signed
    update: UpdateStatus | None = None  # once an update has run


class ReadyResponse(BaseModel):
    """``GET /ready``: 200 when the images are unlocked, 503 otherwise."""

    ready: bool
    state: UnlockState
    message: str | None


class SignatureStatus(BaseModel):
    """Publisher signatures on this device: ``enforced`` once a key is installed."""

    enforced: bool
    keys: list[str]  # key ids (hex) trusted now
    problems: list[str]  # key files that could not be read (they trust nothing)


class CacheStatus(BaseModel):
    """The big-part cache (``MODEL_CACHE_DIR``) against its bound (``LOADER_CACHE_MAX_BYTES``)."""

    used_bytes: int = Field(description="complete big parts and partial downloads on disk")
    max_bytes: int = Field(description="the bound; parts no load reads are evicted past it")
    parts: int = Field(description="complete big parts cached")
    evictions: int = Field(description="parts evicted (least recently used) since start")
    orphans_removed: int = Field(
        description="parts removed since start because no resource uses them any more"
    )


class StatusResponse(BaseModel):
    status: Literal["healthy"]
    version: str
    authenticated: bool
    modelCacheDir: str  # the original service's field name
    unlock: UnlockStatus
    signatures: SignatureStatus
    cache: CacheStatus


class LoginResponse(BaseModel):
    status: Literal["ok"]
    verified: bool = Field(description="false when the Resource API could not be reached")


class UploadResult(BaseModel):
    """What an upload stored (``ResourceStore.upload``)."""

    folder: str
    name: str
    size: int = Field(description="plaintext bytes")
    small_size: int = Field(description="bytes kept by the Resource API")
    big_size: int = Field(description="bytes kept by the CDN")
    big_sha256: str = Field(description="the big part's SHA-256, also its name on the CDN")
    publisher: str | None = Field(
        default=None, description="the key id (hex) that signed it (upload --sign-key)"
    )
    release: int | None = Field(default=None, description="the signed release number")


class UploadResponse(UploadResult):
    status: Literal["ok"]


class UploadStatement(BaseModel):
    """A signed upload's first step (``POST /upload/{filename}/statement``): encrypted and
    spooled, stored only once the publisher's signature over ``statement`` comes back."""

    status: Literal["signature_needed"]
    upload_id: str = Field(description="names this upload in its signature step")
    folder: str
    name: str
    size: int = Field(description="plaintext bytes received")
    key_id: str = Field(description="the key id (hex) that must sign")
    release: int
    statement: str = Field(
        description="hex of the bytes to sign (docs/format.md, 'Publisher signatures')"
    )
    manifest: str = Field(description="what the statement's manifest_sha256 covers")
    expires_in: float = Field(description="seconds before the upload is dropped unsigned")


class UploadSignatureRequest(_Request):
    """A signed upload's second step: the signature over its statement."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "folder": "models",
                    "upload_id": "0" * 32,
                    "public_key": "A" * 43 + "=",
                    "signature": "0" * 128,
                }
            ]
        }
    )
    folder: str = Field(pattern=_NAME, max_length=NAME_MAX_LENGTH)
    upload_id: str = Field(pattern="^[0-9a-f]{32}$")
    public_key: str = Field(
        pattern="^[A-Za-z0-9+/]{43}=$",
        description="the signer's raw Ed25519 public key in base64, as in its .pub line",
    )
    signature: str = Field(pattern="^[0-9a-f]{128}$", description="Ed25519, hex")


class ErrorResponse(BaseModel):
    error: str = Field(description="short machine-readable code")
    message: str = Field(description="a human sentence")
