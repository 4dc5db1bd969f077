"""The local HTTP API (aiohttp): routes, the local-only guard, and the one error middleware.

Served on the Unix socket and on loopback TCP by ``agent.service``. Endpoints keep the original
service's paths and fields (health, status, login, load, upload, unlock, unlock/status).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from aiohttp import BodyPartReader, web
from loguru import logger
from pydantic import BaseModel, ValidationError

from agent import __version__, errors
from agent.logs import register_secret
from agent.schemas import (
    ErrorResponse,
    HealthResponse,
    LoadRequest,
    LoginRequest,
    LoginResponse,
    StatusResponse,
    UnlockRequest,
    UnlockStatus,
    UploadResponse,
)
from agent.settings import Settings

if TYPE_CHECKING:
    from agent.api_client import ResourceApiClient
    from agent.resources import ResourceStore
    from agent.unlock import UnlockManager

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The one mapping from the agent's errors to HTTP: (status, short code). Looked up along the
# exception's MRO, so a subclass without its own row takes its parent's.
ERROR_STATUS: dict[type[errors.LoaderError], tuple[int, str]] = {
    errors.LoaderError: (500, "internal_error"),
    errors.ConfigError: (500, "config_error"),
    errors.RequestError: (400, "bad_request"),
    errors.InvalidName: (400, "invalid_name"),
    errors.ForbiddenRequest: (403, "forbidden"),
    errors.PayloadTooLarge: (413, "payload_too_large"),
    errors.NotFoundError: (404, "not_found"),
    errors.ConflictError: (409, "conflict"),
    errors.NotImplementedYet: (501, "not_implemented"),
    errors.AuthError: (401, "unauthorized"),
    errors.NotAuthenticated: (401, "not_authenticated"),
    errors.BadCredentials: (401, "bad_credentials"),
    errors.UpstreamError: (502, "upstream_error"),
    errors.UpstreamUnavailable: (503, "upstream_unavailable"),
    errors.UpstreamTimeout: (504, "upstream_timeout"),
    errors.UpstreamForbidden: (403, "upstream_forbidden"),
    errors.UpstreamNotFound: (404, "not_found"),
    errors.StreamError: (502, "integrity_error"),
    errors.WrongKeyError: (502, "wrong_key"),
    errors.TamperedError: (502, "tampered"),
    errors.TruncatedError: (502, "truncated"),
    errors.TrailingDataError: (502, "trailing_data"),
    errors.UnsupportedFormatError: (502, "unsupported_format"),
    errors.DockerError: (502, "docker_error"),
    errors.DockerUnavailable: (503, "docker_unavailable"),
    errors.UnlockError: (500, "unlock_failed"),
}

# Names for the Host header that only a local client sends. "unix" and "localhost" are what
# HTTP clients put there when talking over a Unix socket.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "unix", "azaion-loader"})
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
SAFE_NAME_RULE = (
    "must be a plain name: letters, digits, '.', '_', '-', '+', starting with a letter or digit, "
    "at most 255 characters, no '..' or path separators"
)
CHUNK = 256 * 1024


@dataclass
class Services:
    """What the handlers use; built and closed by ``agent.service``."""

    settings: Settings
    api: ResourceApiClient
    resources: ResourceStore
    unlock: UnlockManager


SERVICES = web.AppKey("services", Services)


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def status_for(exc: errors.LoaderError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return ERROR_STATUS[errors.LoaderError]


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes JSON ``{"error", "message"}``; no traceback reaches a client."""
    try:
        return await handler(request)
    except errors.LoaderError as exc:
        status, code = status_for(exc)
        log = logger.warning if status < 500 else logger.error
        log("{} {} -> {} {}: {}", request.method, request.raw_path, status, code, exc)
        return error_response(status, code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, re.sub(r"\W+", "_", exc.reason.lower()))
        message = _http_message(request, exc)
        return error_response(exc.status, code, message)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unexpected error in {} {}", request.method, request.raw_path)
        return error_response(500, "internal_error", "internal error; see the agent's log")


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    # raw_path: percent-encoded as sent, so no control characters reach the message or the log.
    path = request.raw_path.split("?", 1)[0]
    if exc.status == 404:
        return f"no such endpoint: {request.method} {path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {path}"
    if exc.status == 413:
        return "request body is too large"
    return exc.text or exc.reason


def _is_loopback_host(host: str) -> bool:
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8765
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:  # localhost:8765
        name = name.split(":", 1)[0]
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and _is_loopback_host(parts.netloc)


def _over_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def local_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS-rebinding and CSRF guard: this API is for local programs, not for web pages."""
    host = request.headers.get("Host")
    if host is None:
        if not _over_unix_socket(request):
            raise errors.ForbiddenRequest("requests must carry a Host header naming localhost")
    elif not _is_loopback_host(host):
        raise errors.ForbiddenRequest("this API serves local clients only (foreign Host header)")
    origin = request.headers.get("Origin")
    if origin is not None and not _is_loopback_origin(origin):
        raise errors.ForbiddenRequest("cross-origin requests are refused (foreign Origin header)")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise errors.ForbiddenRequest("cross-site requests are refused")
    _refuse_dot_segments(request.raw_path)
    return await handler(request)


def _refuse_dot_segments(raw_path: str) -> None:
    """'.' and '..' segments (plain or percent-encoded) are traversal attempts, not typos.

    The URL library would silently resolve them (``/load/..`` becomes ``/``); refuse instead.
    """
    path = unquote(raw_path.split("?", 1)[0])
    if any(segment in (".", "..") for segment in path.split("/")):
        raise errors.InvalidName("the path must not contain '.' or '..' segments")


def validate_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise errors.InvalidName(f"{field} {SAFE_NAME_RULE}")
    return value


M = TypeVar("M", bound=BaseModel)


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body; the message names the field, never echoes the value."""
    body = await request.read()  # bounded by the app's client_max_size (413 past it)
    if not body:
        data: Any = {}
    else:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise errors.RequestError("request body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise errors.RequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise errors.RequestError(f"field '{where}': {first['msg']}") from None


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy"})


async def status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response(
        {
            "status": "healthy",
            "version": __version__,
            "authenticated": services.api.authenticated,
            "modelCacheDir": str(services.settings.model_cache_dir),
            "unlock": services.unlock.snapshot(),
        }
    )


async def login(request: web.Request) -> web.Response:
    body = await read_model(request, LoginRequest)
    password = body.password.get_secret_value()
    register_secret(password)
    services = request.app[SERVICES]
    try:
        await services.api.login(body.email, password)
        verified = True
    except (errors.UpstreamUnavailable, errors.UpstreamTimeout):
        # Offline: keep them for later; the unlock retries until the API answers.
        services.api.set_credentials(body.email, password)
        verified = False
        logger.warning("Resource API unreachable: credentials kept, not yet verified")
    logger.info("credentials set for {} (verified: {})", body.email, verified)
    if services.settings.loader_auto_unlock:
        await _start_unlock_quietly(services)
    return web.json_response({"status": "ok", "verified": verified})


async def _start_unlock_quietly(services: Services) -> None:
    """Start the automatic unlock that was waiting for credentials, if there is one to do."""
    if services.unlock.snapshot()["state"] not in ("idle", "error"):
        return
    try:
        await services.unlock.start()
    except errors.NotFoundError as exc:
        logger.info("no automatic unlock: {}", exc)


async def unlock(request: web.Request) -> web.Response:
    body = await read_model(request, UnlockRequest)
    services = request.app[SERVICES]
    if body.email and body.password:
        register_secret(body.password.get_secret_value())
        services.api.set_credentials(body.email, body.password.get_secret_value())
    elif body.email or body.password:
        raise errors.RequestError("give both email and password, or neither")
    snapshot = await services.unlock.start()
    return web.json_response(snapshot, status=200 if snapshot["state"] == "ready" else 202)


async def unlock_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICES].unlock.snapshot())


async def load(request: web.Request) -> web.StreamResponse:
    filename = validate_name(request.match_info["filename"], "filename")
    body = await read_model(request, LoadRequest)
    folder = validate_name(body.folder, "folder")
    if body.filename is not None and body.filename != filename:
        raise errors.RequestError("filename in the body differs from the one in the path")
    resource = await request.app[SERVICES].resources.open(folder, filename)
    try:
        # Pull the first verified chunk before the headers go out, so that a wrong key or a
        # tampered first chunk is still a JSON error rather than a cut-off body.
        first = await anext(aiter(resource), b"")
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream"},
        )
        response.content_length = resource.size
        await response.prepare(request)
        if first:
            await response.write(first)
        async for chunk in resource:
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        await resource.aclose()


async def upload(request: web.Request) -> web.Response:
    filename = validate_name(request.match_info["filename"], "filename")
    settings = request.app[SERVICES].settings
    limit = settings.loader_max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
    if not request.content_type.startswith("multipart/"):
        raise errors.RequestError("upload must be multipart/form-data with fields folder and file")
    reader = await request.multipart()
    folder = request.query.get("folder")
    async for part in reader:
        if not isinstance(part, BodyPartReader) or part.name is None:
            raise errors.RequestError("unexpected nested multipart in upload")
        if part.name == "folder":
            folder = (await part.read(decode=True)).decode("utf-8", "replace")[:1024]
        elif part.name == "file":
            if folder is None:
                raise errors.RequestError(
                    "send the 'folder' field before 'file' (or give it as ?folder=)"
                )
            folder = validate_name(folder, "folder")
            result = await request.app[SERVICES].resources.upload(
                folder, filename, _limited(part, limit)
            )
            return web.json_response({"status": "ok", **dataclasses.asdict(result)})
        else:
            await part.release()
    raise errors.RequestError("upload has no 'file' field")


async def _limited(part: BodyPartReader, limit: int) -> AsyncIterator[bytes]:
    total = 0
    while chunk := await part.read_chunk(CHUNK):
        total += len(chunk)
        if total > limit:
            raise errors.PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
        yield chunk


async def openapi_document(request: web.Request) -> web.Response:
    from agent.openapi import build_document

    return web.json_response(build_document(ENDPOINTS))


@dataclass(frozen=True)
class Endpoint:
    """One route of the local API; the router and the OpenAPI document are both built from
    this table, so they cannot disagree."""

    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    ok_status: tuple[int, ...] = (200,)
    errors: tuple[int, ...] = ()
    binary_response: bool = False
    multipart_request: bool = False


# Every endpoint may also answer 403 (foreign Host/Origin), 400 (bad path) and 500.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/health", health, "Liveness probe", response=HealthResponse),
    Endpoint("GET", "/status", status, "Agent, credentials and unlock status",
             response=StatusResponse),
    Endpoint("POST", "/login", login, "Set credentials (checked against the Resource API)",
             request=LoginRequest, response=LoginResponse, errors=(401, 413, 502, 504)),
    Endpoint("POST", "/load/{filename}", load, "Fetch and decrypt a resource",
             request=LoadRequest, binary_response=True,
             errors=(401, 403, 404, 413, 502, 503, 504)),
    Endpoint("POST", "/upload/{filename}", upload, "Encrypt, split and upload a resource",
             response=UploadResponse, multipart_request=True,
             errors=(401, 403, 409, 413, 502, 503, 504)),
    Endpoint("POST", "/unlock", unlock, "Start the unlock of the Docker images",
             request=UnlockRequest, response=UnlockStatus, ok_status=(200, 202),
             errors=(404, 413)),
    Endpoint("GET", "/unlock/status", unlock_status, "Progress of the unlock",
             response=UnlockStatus),
    Endpoint("GET", "/openapi.json", openapi_document, "This document (OpenAPI 3.1)"),
)  # fmt: skip
COMMON_ERRORS = (400, 403, 500)
ERROR_SCHEMA = ErrorResponse


def create_app(services: Services) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, local_only_middleware],
        client_max_size=services.settings.loader_max_json_bytes,
    )
    app[SERVICES] = services
    for endpoint in ENDPOINTS:
        app.router.add_route(endpoint.method, endpoint.path, endpoint.handler)
    return app
