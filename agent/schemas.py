"""The local API's request and response bodies, as pydantic models.

Requests are validated with them (``agent.server``); the OpenAPI document (``agent.openapi``)
is generated from them, so the document and the code cannot drift apart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

MAX_FIELD = 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_FIELD)


class LoginRequest(_Request):
    email: str
    password: SecretStr


class UnlockRequest(_Request):
    """Optional credentials; both or neither."""

    email: str | None = None
    password: SecretStr | None = None


class LoadRequest(_Request):
    folder: str
    filename: str | None = Field(default=None, description="if given, must equal the path's")


class HealthResponse(BaseModel):
    status: Literal["healthy"]


class UnlockProgress(BaseModel):
    stage: str
    bytes_done: int
    bytes_total: int
    percent: float


class UnlockStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: Literal[
        "idle",
        "checking",
        "waiting",
        "authenticating",
        "downloading_key",
        "loading",
        "verifying",
        "ready",
        "error",
    ]
    error: str | None
    progress: UnlockProgress
    message: str | None = None
    attempt: int | None = None
    next_retry_in: float | None = None
    retry_reason: str | None = None
    images: int | None = None


class StatusResponse(BaseModel):
    status: Literal["healthy"]
    version: str
    authenticated: bool
    modelCacheDir: str  # the original service's field name
    unlock: UnlockStatus


class LoginResponse(BaseModel):
    status: Literal["ok"]
    verified: bool = Field(description="false when the Resource API could not be reached")


class UploadResponse(BaseModel):
    status: Literal["ok"]
    folder: str
    name: str
    size: int
    small_size: int
    big_size: int
    big_sha256: str


class ErrorResponse(BaseModel):
    error: str = Field(description="short machine-readable code")
    message: str = Field(description="a human sentence")
