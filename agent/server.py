"""The local HTTP API (aiohttp): routes, the local-only guard, and the one error middleware.

Served on the Unix socket and on loopback TCP by ``agent.service``. Endpoints keep the original
service's paths and fields (health, status, login, load, upload, unlock, unlock/status), plus
ready, metrics (``agent.metrics``) and openapi.json.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar
from urllib.parse import unquote

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from loguru import logger
from pydantic import BaseModel, ValidationError

from agent import __version__, errors
from agent.connections import caller_eof
from agent.defaults import NAME_MAX_LENGTH
from agent.logs import quote
from agent.metrics import CONTENT_TYPE_LATEST, METRICS, Metrics
from agent.peers import AccessPolicy, AccountGroups, Peer, identify
from agent.routes import (
    LOOPBACK_AUTHORITY,
    SAFE_NAME_RULE,
    SERVICES,
    Endpoint,
    Handler,
    Services,
)
from agent.schemas import (
    NAME_PATTERN,
    CacheStatus,
    HealthResponse,
    LoadRequest,
    LoginRequest,
    LoginResponse,
    ReadyResponse,
    SignatureStatus,
    StatusResponse,
    UnlockRequest,
    UnlockState,
    UnlockStatus,
    UploadResponse,
    UploadSignatureRequest,
    UploadStatement,
)
from agent.signing import KEY_ID_SIZE, MAX_RELEASE, TrustStore

if TYPE_CHECKING:
    from agent.resources import Resource

# Host and Origin: this machine's names only (agent.routes.LOOPBACK_AUTHORITY).
LOOPBACK_HOST = re.compile(LOOPBACK_AUTHORITY)
LOOPBACK_ORIGIN = re.compile(r"https?://" + LOOPBACK_AUTHORITY)
# What some HTTP clients put in Host over a Unix socket; no browser can reach the socket.
SOCKET_ONLY_HOSTS = frozenset({"unix", "azaion-loader"})
SAFE_NAME = re.compile(NAME_PATTERN)
JSON_TYPES = re.compile(r"application/(?:[\w.+-]+\+)?json")
MAX_FIELD_BYTES = 1024  # the upload's 'folder' field
CHUNK = 256 * 1024
# A load's write: fits a Unix socket's default send buffer (208 KiB), so it usually leaves in
# one send() (bigger writes measured slower: the transport copies what send() does not take).
WRITE_SIZE = 192 * 1024
# While a load runs, its Unix socket's kernel send buffer is raised to this (the kernel caps it
# at net.core.wmem_max; Debian's default 208 KiB leaves it as it was), so a block leaves in one
# send(): 1 GiB over the socket, ~1.2x the throughput of 192 KiB writes where it is allowed.
LOAD_SEND_BUFFER = 2 * 1024 * 1024
# Over TCP, a block (1 MiB) per write: loopback TCP's buffer grows to take it (1 GiB, A/B:
# ~1.15x the throughput of 192 KiB writes, which left TCP below the previous version).
TCP_WRITE_SIZE = 1024 * 1024


# Bench-only switch (bench/bench_load.py measures the check against its absence); no setting
# turns it off.
PEER_CHECK = True


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
# Fixed sentences: nothing of the request (path, header, body) is echoed back.
_HTTP_MESSAGES = {
    404: "no such endpoint (GET /openapi.json lists them)",
    405: "this method is not allowed on this endpoint",
    413: "request body is too large",
}
CLIENT_GONE = "client_gone"  # the outcome of a load whose caller hung up


def outcome_of(exc: BaseException) -> str:
    """A failed load's or upload's outcome for /metrics: the short code the caller got (from
    the fixed tables above), never the error's text."""
    if isinstance(exc, errors.LoaderError):
        return errors.status_for(exc)[1]
    if isinstance(exc, web.HTTPException):
        return _HTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal_error")
    if isinstance(exc, asyncio.CancelledError | ConnectionResetError):
        return CLIENT_GONE
    return "internal_error"


@dataclass
class _Outcome:
    value: str = "ok"


@contextlib.contextmanager
def _counted(request: web.Request, operation: str) -> Iterator[_Outcome]:
    """Count one load or upload by outcome: ok, what it raised, or what the handler set (a
    failure after the answer's headers went out)."""
    outcome = _Outcome()
    try:
        yield outcome
    except BaseException as exc:
        outcome.value = outcome_of(exc)
        raise
    finally:
        request.app[METRICS].resource_operation(operation, outcome.value)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes JSON ``{"error", "message"}``; no traceback reaches a client."""
    try:
        return await handler(request)
    except errors.LoaderError as exc:
        status, code = errors.status_for(exc)
        log = logger.warning if status < 500 else logger.error
        log("{} {} -> {} {}: {}", request.method, quote(request.raw_path), status, code, exc)
        return error_response(status, code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, re.sub(r"\W+", "_", exc.reason.lower()))
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        response = error_response(exc.status, code, message)
        if hdrs.ALLOW in exc.headers:  # 405 names the methods that are allowed (RFC 9110)
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unexpected error in {} {}", request.method, quote(request.raw_path))
        return error_response(500, "internal_error", "internal error; see the agent's log")


def _is_loopback_host(host: str, over_unix_socket: bool) -> bool:
    if over_unix_socket and host.strip().lower() in SOCKET_ONLY_HOSTS:
        return True
    return LOOPBACK_HOST.fullmatch(host) is not None


def _over_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def local_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS-rebinding and CSRF guard: this API is for local programs, not for web pages.

    Also refuses what no client of this API sends and only widens the attack surface: full
    URLs as the request target (proxy style) and compressed bodies (decompression bombs).
    """
    if isinstance(request.match_info.http_exception, web.HTTPMethodNotAllowed):
        raise request.match_info.http_exception  # about the route, whoever asks
    over_unix_socket = _over_unix_socket(request)
    host = request.headers.get(hdrs.HOST)
    if host is None:
        if not over_unix_socket:
            raise errors.ForbiddenRequest("requests must carry a Host header naming localhost")
    elif not _is_loopback_host(host, over_unix_socket):
        raise errors.ForbiddenRequest("this API serves local clients only (foreign Host header)")
    if not request.raw_path.startswith("/"):
        raise errors.ForbiddenRequest("the request target must be a path, not a full URL")
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and not LOOPBACK_ORIGIN.fullmatch(origin):
        raise errors.ForbiddenRequest("cross-origin requests are refused (foreign Origin header)")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise errors.ForbiddenRequest("cross-site requests are refused")
    if request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() != "identity":
        raise errors.UnsupportedMediaType("compressed request bodies are not accepted")
    _refuse_dot_segments(request.raw_path)
    return await handler(request)


def _refuse_dot_segments(raw_path: str) -> None:
    """'.' and '..' segments (plain or percent-encoded) are traversal attempts, not typos.

    The URL library would silently resolve them (``/load/..`` becomes ``/``); refuse instead.
    """
    path = unquote(raw_path.split("?", 1)[0])
    if any(segment in (".", "..") for segment in path.split("/")):
        raise errors.InvalidName("the path must not contain '.' or '..' segments")


class PeerCheck:
    """Access by peer identity (``agent.peers``): endpoints not marked open need an allowed
    peer. The peer is asked of the kernel once per connection, when its first request needs
    it, and remembered with the connection."""

    def __init__(self, policy: AccessPolicy, open_handlers: frozenset[Handler]) -> None:
        self._policy = policy
        self._open = open_handlers
        self._groups = AccountGroups()
        self._peers: weakref.WeakKeyDictionary[object, Peer] = weakref.WeakKeyDictionary()
        # Threads of its own: the default pool may be busy hashing big parts for minutes, and
        # no caller's access decision should queue behind that.
        self._lookups = ThreadPoolExecutor(max_workers=2, thread_name_prefix="peer-lookup")

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    async def peer(self, request: web.Request) -> Peer:
        transport = request.transport
        if transport is None:
            return Peer("unknown", None)
        peer = self._peers.get(transport)
        if peer is None:
            # In a worker thread: the user database behind the groups may be NSS (LDAP, sssd).
            sock = transport.get_extra_info("socket")
            loop = asyncio.get_running_loop()
            peer = await loop.run_in_executor(self._lookups, identify, sock, self._groups)
            self._peers[transport] = peer
        return peer

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route_handler = request.match_info.route.handler
        if request.match_info.http_exception is not None or route_handler in self._open:
            return await handler(request)
        if not PEER_CHECK:
            return await handler(request)
        peer = await self.peer(request)
        if self._policy.allows(peer):
            return await handler(request)
        logger.warning(
            "refused {} {} from uid={} gid={} pid={} over {}: not an allowed peer",
            request.method,
            quote(request.raw_path),
            peer.uid,
            peer.gid,
            peer.pid,
            peer.listener,
        )
        who = "an unidentified peer" if peer.uid is None else f"uid {peer.uid}"
        return error_response(
            403,
            "forbidden",
            f"this endpoint is open to {self._policy.rule()} only; the caller ({who}) is not",
        )


async def hardening_headers(request: web.Request, response: web.StreamResponse) -> None:
    """No caching of answers (they may be decrypted models), no MIME sniffing, no version
    banner; and never a CORS header, so no web page may read an answer."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers[hdrs.SERVER] = "azaion-loader"


def validate_name(value: object, field: str) -> str:
    if not is_safe_name(value):
        raise errors.InvalidName(f"{field} {SAFE_NAME_RULE}")
    return value


def is_safe_name(value: object) -> TypeGuard[str]:
    return (
        isinstance(value, str)
        and len(value) <= NAME_MAX_LENGTH
        and SAFE_NAME.fullmatch(value) is not None
    )


M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
_NAME_ERRORS = frozenset({"string_pattern_mismatch", "string_too_long"})
NAME_FIELDS = frozenset({"folder", "filename"})


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body; messages name the field, never echo what was sent."""
    async with _body_deadline(request):
        body = await request.read()  # bounded by the app's client_max_size (413 past it)
    if not body:
        data: Any = {}
    else:
        _require_json(request)
        try:
            data = json.loads(body.decode("utf-8"))  # RFC 8259: UTF-8 only, no BOM
        except (UnicodeDecodeError, ValueError) as exc:
            raise errors.RequestError("request body is not valid JSON") from exc
        except RecursionError as exc:
            raise errors.RequestError("request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise errors.RequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(model, exc) from None


@contextlib.asynccontextmanager
async def _body_deadline(request: web.Request) -> AsyncIterator[None]:
    """A body that stalls (a caller holding the connection open) ends in 408."""
    seconds = request.app[SERVICES].settings.loader_body_timeout
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise errors.RequestTimeout(
            f"the request body did not arrive within {seconds:.0f} s (LOADER_BODY_TIMEOUT)"
        ) from exc


def _require_json(request: web.Request) -> None:
    content_type = request.headers.get(hdrs.CONTENT_TYPE)
    if content_type is not None and not JSON_TYPES.fullmatch(request.content_type):
        raise errors.UnsupportedMediaType("send the body as JSON (Content-Type: application/json)")


def _validation_error(model: type[BaseModel], exc: ValidationError) -> errors.RequestError:
    first = exc.errors()[0]
    known = list(model.model_fields)
    if first["type"] == "extra_forbidden":
        # The unknown key is the caller's input: say which are allowed instead of echoing it.
        return errors.RequestError(f"unknown field in the body; allowed: {', '.join(known)}")
    where = ".".join(str(part) for part in first["loc"] if part in known) or "body"
    if where in NAME_FIELDS and first["type"] in _NAME_ERRORS:
        return errors.InvalidName(f"{where} {SAFE_NAME_RULE}")
    return errors.RequestError(f"field '{where}': {first['msg']}")


def model_response(body: BaseModel, status: int = 200) -> web.Response:
    """A handler's answer: the model the OpenAPI document names for it, as JSON. Optional
    fields that were not set stay out (the unlock's retry fields appear only while waiting)."""
    return web.json_response(body.model_dump(mode="json", exclude_unset=True), status=status)


async def health(request: web.Request) -> web.Response:
    return model_response(HealthResponse(status="healthy"))


async def ready(request: web.Request) -> web.Response:
    """Readiness for apps and probes: 200 once the images are unlocked, 503 until then (or
    after a failure), with the unlock's state and message either way."""
    snapshot = request.app[SERVICES].unlock.snapshot()
    is_ready = snapshot.state is UnlockState.READY
    body = ReadyResponse(ready=is_ready, state=snapshot.state, message=snapshot.message)
    return model_response(body, status=200 if is_ready else 503)


async def status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = StatusResponse(
        status="healthy",
        version=__version__,
        authenticated=services.api.authenticated,
        modelCacheDir=str(services.settings.model_cache_dir),
        unlock=services.unlock.snapshot(),
        signatures=signature_status(services.settings.loader_publishers_dir),
        cache=CacheStatus(**dataclasses.asdict(services.resources.cache.usage())),
    )
    return model_response(body)


def signature_status(publishers_dir: Path) -> SignatureStatus:
    """The keys as they are now (read again whenever a key file changed), so the answer is
    what the next unlock and load will use."""
    store = TrustStore.current(publishers_dir)
    return SignatureStatus(
        enforced=store.enforced, keys=store.key_names(), problems=list(store.problems)
    )


async def login(request: web.Request) -> web.Response:
    body = await read_model(request, LoginRequest)
    password = body.password.get_secret_value()
    services = request.app[SERVICES]
    try:
        await services.api.login(body.email, password)
        verified = True
    except (errors.UpstreamUnavailable, errors.UpstreamTimeout):
        # Offline: keep them for later; the unlock retries until the API answers.
        services.api.set_credentials(body.email, password)
        verified = False
        logger.warning("Resource API unreachable: credentials kept, not yet verified")
    logger.info("credentials set for {} (verified: {})", quote(body.email), verified)
    if services.settings.loader_auto_unlock:
        await _start_unlock_quietly(services)
    return model_response(LoginResponse(status="ok", verified=verified))


async def _start_unlock_quietly(services: Services) -> None:
    """Start the automatic unlock that was waiting for credentials, if there is one to do."""
    if services.unlock.state not in (UnlockState.IDLE, UnlockState.ERROR):
        return
    try:
        await services.unlock.start()
    except errors.NotFoundError as exc:
        logger.info("no automatic unlock: {}", exc)


async def unlock(request: web.Request) -> web.Response:
    body = await read_model(request, UnlockRequest)
    services = request.app[SERVICES]
    if body.partial:
        raise errors.RequestError("give both email and password, or neither")
    if body.credentials is not None:
        email, password = body.credentials
        services.api.set_credentials(email, password)  # kept, so scrubbed from now on
    snapshot = await services.unlock.start()
    return model_response(snapshot, status=200 if snapshot.state is UnlockState.READY else 202)


async def unlock_status(request: web.Request) -> web.Response:
    return model_response(request.app[SERVICES].unlock.snapshot())


async def load(request: web.Request) -> web.StreamResponse:
    with _counted(request, "load") as outcome:
        return await _load(request, outcome)


async def _load(request: web.Request, outcome: _Outcome) -> web.StreamResponse:
    filename = validate_name(request.match_info["filename"], "filename")
    body = await read_model(request, LoadRequest)
    folder = validate_name(body.folder, "folder")
    if body.filename is not None and body.filename != filename:
        raise errors.RequestError("filename in the body differs from the one in the path")
    resource = await _unless_caller_leaves(
        request, request.app[SERVICES].resources.open(folder, filename)
    )
    if resource is None:  # nobody to answer any more (the connection is closed)
        outcome.value = CLIENT_GONE
        return error_response(503, CLIENT_GONE, "the caller left before the answer was ready")
    try:
        # Pull the first verified chunk before the headers go out, so that a wrong key or a
        # tampered first chunk is still a JSON error rather than a cut-off body. (From a slow
        # CDN, that may take long: a caller that leaves meanwhile is not waited for.)
        first = await _unless_caller_leaves(request, _first_block(resource))
        if first is None:
            outcome.value = CLIENT_GONE
            return error_response(503, CLIENT_GONE, "the caller left before the answer was ready")
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream"},
        )
        response.content_length = resource.size
        await response.prepare(request)
        stall = request.app[SERVICES].settings.loader_body_timeout
        try:
            with _sending_blocks(request) as write_size:
                if first:
                    await _send_block(response, first, write_size, stall, resource.turn)
                async for block in resource:
                    await _send_block(response, block, write_size, stall, resource.turn)
            await response.write_eof()
        except ConnectionResetError:
            outcome.value = CLIENT_GONE
            logger.info("client went away during the load of {}/{}", folder, filename)
        except TimeoutError:
            outcome.value = CLIENT_GONE
            logger.info(
                "client took nothing for {} s of the load of {}/{}", stall, folder, filename
            )
            if request.transport is not None:
                request.transport.close()
        except errors.LoaderError as exc:
            # The headers are out: cut the body short, so the client sees an incomplete answer
            # (fewer bytes than Content-Length) rather than a JSON error inside the data.
            outcome.value = outcome_of(exc)
            logger.error("load of {}/{} failed mid-stream: {}", folder, filename, exc)
            if request.transport is not None:
                request.transport.close()
        return response
    finally:
        await resource.aclose()


@contextlib.contextmanager
def _sending_blocks(request: web.Request) -> Iterator[int]:
    """While a load's blocks are sent, a write returns only once the transport has passed all
    of it to the kernel (its high-water mark 0): the block goes back to the pool only then, so
    the pool's bound covers what waits in user space for the socket, and no transport keeps a
    view of a block that is reused (Python >= 3.12 queues the caller's buffer, not a copy).
    Yields the size of each write: what the socket's send buffer takes in one ``send``."""
    transport = request.transport
    write_size = WRITE_SIZE
    if transport is not None:
        transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOAD_SEND_BUFFER)
            # The kernel reports double what it counts as payload room; keep some for overhead.
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
            write_size = max(WRITE_SIZE, granted - granted // 16)
        elif sock is not None:  # TCP grows its send buffer as the transfer goes on
            write_size = TCP_WRITE_SIZE
    try:
        yield write_size
    finally:
        if transport is not None and not transport.is_closing():
            transport.set_write_buffer_limits()


async def _send_block(
    response: web.StreamResponse,
    block: memoryview | bytes,
    write_size: int,
    stall: float,
    turn: Callable[[], Awaitable[None]],
) -> None:
    """Write ``block`` in pieces of ``write_size`` (one ``send`` each when the reader keeps
    up: what ``send`` does not take, the transport would copy), each in a turn of the loop
    that loads share (a ``send`` of 1 MiB copies for ~0.1 ms), within ``stall`` seconds: a
    reader that takes none of it for that long holds a block of the pool, and is cut
    (``TimeoutError``)."""
    async with asyncio.timeout(stall):
        for start in range(0, len(block), write_size):
            await turn()
            await response.write(block[start : start + write_size])


async def _first_block(resource: Resource) -> memoryview | bytes:
    return await anext(aiter(resource), b"")


async def _unless_caller_leaves(request: web.Request, opening: Awaitable[T]) -> T | None:
    """Await ``opening`` (which may wait for a whole CDN download) unless the caller closes
    its side while it runs: then it is given up (the download stops when nobody else waits),
    the connection is closed, and None returned. TCP cannot tell a half-close from a
    departure; like a proxy, the agent takes an EOF during the wait as one. A caller that had
    half-closed before asking is answered as usual."""
    eof = caller_eof(request)
    if eof is None or eof.done():
        return await opening
    task = asyncio.ensure_future(opening)
    try:
        await asyncio.wait((task, eof), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled():
        return task.result()
    logger.info("caller left while {} was being fetched", quote(request.raw_path))
    if request.transport is not None:
        request.transport.close()
    return None


Store = Callable[[str, str, AsyncIterator[bytes]], Awaitable[BaseModel]]


async def upload(request: web.Request) -> web.Response:
    resources = request.app[SERVICES].resources

    async def store(folder: str, name: str, chunks: AsyncIterator[bytes]) -> BaseModel:
        result = await resources.upload(folder, name, chunks)
        return UploadResponse(status="ok", **result.model_dump())

    with _counted(request, "upload"):
        return await _upload(request, store)


async def upload_statement(request: web.Request) -> web.Response:
    """A signed upload, step one: encrypt and spool, answer the statement to sign. The agent
    never holds a publisher's private key: ``azaion-loader upload --sign-key`` signs the
    statement and sends the signature (``upload_signature``), which stores the resource.
    Counted in /metrics at that step."""
    key_id = _query_key_id(request)
    release = _query_release(request)
    resources = request.app[SERVICES].resources

    async def store(folder: str, name: str, chunks: AsyncIterator[bytes]) -> BaseModel:
        pending = await resources.upload_for_signing(folder, name, chunks, key_id, release)
        return UploadStatement(
            status="signature_needed",
            upload_id=pending.upload_id,
            folder=folder,
            name=name,
            size=pending.size,
            key_id=key_id.hex(),
            release=release,
            statement=pending.statement.encode().hex(),
            manifest=pending.manifest.decode("utf-8"),
            expires_in=pending.expires_in,
        )

    return await _upload(request, store)


async def upload_signature(request: web.Request) -> web.Response:
    """A signed upload, step two: the publisher's signature over the statement; stores it."""
    with _counted(request, "upload"):
        filename = validate_name(request.match_info["filename"], "filename")
        body = await read_model(request, UploadSignatureRequest)
        result = await request.app[SERVICES].resources.commit_signature(
            body.upload_id,
            validate_name(body.folder, "folder"),
            filename,
            base64.b64decode(body.public_key, validate=True),
            bytes.fromhex(body.signature),
        )
        return model_response(UploadResponse(status="ok", **result.model_dump()))


def _query_key_id(request: web.Request) -> bytes:
    value = request.query.get("key_id", "")
    if not re.fullmatch(f"[0-9a-f]{{{2 * KEY_ID_SIZE}}}", value):
        raise errors.RequestError(
            f"?key_id= must be the signing key's id: {2 * KEY_ID_SIZE} lowercase hex digits"
        )
    return bytes.fromhex(value)


def _query_release(request: web.Request) -> int:
    value = request.query.get("release", "")
    if not re.fullmatch("[0-9]{1,19}", value) or int(value) > MAX_RELEASE:
        raise errors.RequestError(f"?release= must be a release number from 0 to {MAX_RELEASE}")
    return int(value)


async def _upload(request: web.Request, store: Store) -> web.Response:
    filename = validate_name(request.match_info["filename"], "filename")
    settings = request.app[SERVICES].settings
    limit = settings.loader_max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
    if not request.content_type.startswith("multipart/"):
        raise errors.UnsupportedMediaType(
            "upload must be multipart/form-data with fields folder and file"
        )
    folder = request.query.get("folder")
    stall = settings.loader_body_timeout
    with _malformed_multipart():
        reader = await request.multipart()
    # Exactly: an optional 'folder' field, then 'file'. Anything else is refused, so that no
    # form (or multipart bomb) makes the agent read more than it needs.
    for expected in ("folder", "file"):
        with _malformed_multipart():
            async with _body_deadline(request):
                part = await reader.next()
        if part is None:
            raise errors.RequestError("upload has no 'file' field")
        if not isinstance(part, BodyPartReader):
            raise errors.RequestError("nested multipart is not accepted in an upload")
        if part.name == "folder" and expected == "folder":
            async with _body_deadline(request):
                folder = await _read_field(part)
        elif part.name == "file":
            if folder is None:
                raise errors.RequestError(
                    "send the 'folder' field before 'file' (or give it as ?folder=)"
                )
            folder = validate_name(folder, "folder")
            return model_response(await store(folder, filename, _limited(part, limit, stall)))
        else:
            raise errors.RequestError("an upload has two fields: 'folder', then 'file'")
    raise errors.RequestError("an upload has two fields: 'folder', then 'file'")


@contextlib.contextmanager
def _malformed_multipart() -> Iterator[None]:
    """aiohttp's multipart parser reports bad input as ValueError or an HTTP parser error."""
    try:
        yield
    except (ValueError, HttpProcessingError) as exc:
        raise errors.RequestError("the upload is not well-formed multipart/form-data") from exc


async def _read_field(part: BodyPartReader) -> str:
    """A small form field, as sent (no transfer decoding), at most ``MAX_FIELD_BYTES``."""
    data = bytearray()
    with _malformed_multipart():
        while chunk := await part.read_chunk(CHUNK):
            data += chunk
            if len(data) > MAX_FIELD_BYTES:
                raise errors.RequestError(
                    f"the 'folder' field is longer than {MAX_FIELD_BYTES} bytes"
                )
    return data.decode("utf-8", "replace")


async def _limited(part: BodyPartReader, limit: int, stall: float) -> AsyncIterator[bytes]:
    """The file's bytes, at most ``limit`` of them, none more than ``stall`` s after the last."""
    total = 0
    while True:
        with _malformed_multipart():
            try:
                async with asyncio.timeout(stall):
                    chunk = await part.read_chunk(CHUNK)
            except TimeoutError as exc:
                raise errors.RequestTimeout(
                    f"the upload stalled for {stall:.0f} s (LOADER_BODY_TIMEOUT)"
                ) from exc
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise errors.PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
        yield chunk


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the registry is the app's own (``agent.metrics``)."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})


async def openapi_document(request: web.Request) -> web.Response:
    from agent.openapi import build_document  # only on request: nothing before READY=1 needs it

    return web.json_response(build_document(ENDPOINTS))


# Every endpoint may also answer agent.routes.COMMON_ERRORS.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/health", health, "Liveness probe", response=HealthResponse,
             open_to_all=True),
    Endpoint("GET", "/ready", ready, "Readiness: 200 when the images are unlocked, else 503",
             response=ReadyResponse, ok_status=(200, 503), open_to_all=True),
    Endpoint("GET", "/status", status, "Agent, credentials and unlock status",
             response=StatusResponse, open_to_all=True),
    Endpoint("POST", "/login", login, "Set credentials (checked against the Resource API)",
             request=LoginRequest, response=LoginResponse, errors=(401, 413, 415, 502, 504)),
    Endpoint("POST", "/load/{filename}", load, "Fetch and decrypt a resource",
             request=LoadRequest, binary_response=True,
             errors=(401, 403, 404, 413, 415, 502, 503, 504, 507)),
    Endpoint("POST", "/upload/{filename}", upload, "Encrypt, split and upload a resource",
             response=UploadResponse, multipart_request=True,
             errors=(401, 403, 404, 409, 413, 415, 502, 503, 504, 507)),
    Endpoint("POST", "/upload/{filename}/statement", upload_statement,
             "Signed upload, step 1: encrypt and spool; answers the statement to sign",
             response=UploadStatement, multipart_request=True,
             query=(("key_id", "the signing key's id, 16 hex digits",
                     {"type": "string", "pattern": "^[0-9a-f]{16}$"}),
                    ("release", "the release number to sign",
                     {"type": "integer", "minimum": 0, "maximum": MAX_RELEASE})),
             errors=(409, 413, 415, 507)),
    Endpoint("POST", "/upload/{filename}/signature", upload_signature,
             "Signed upload, step 2: the signature over the statement; stores the resource",
             request=UploadSignatureRequest, response=UploadResponse,
             errors=(401, 403, 404, 413, 415, 502, 503, 504, 507)),
    Endpoint("POST", "/unlock", unlock, "Start the unlock of the Docker images",
             request=UnlockRequest, response=UnlockStatus, ok_status=(200, 202),
             errors=(404, 413, 415)),
    Endpoint("GET", "/unlock/status", unlock_status, "Progress of the unlock",
             response=UnlockStatus, open_to_all=True),
    Endpoint("GET", "/metrics", metrics, "Prometheus metrics (text exposition format)",
             text_response="text/plain", open_to_all=True),
    Endpoint("GET", "/openapi.json", openapi_document, "This document (OpenAPI 3.1)",
             open_to_all=True),
)  # fmt: skip


def create_app(services: Services) -> web.Application:
    open_handlers = frozenset(e.handler for e in ENDPOINTS if e.open_to_all)
    peer_check = PeerCheck(services.access, open_handlers)
    metrics = Metrics(services)
    app = web.Application(
        middlewares=[
            metrics.middleware,  # outermost: counts the status the caller gets
            error_middleware,
            local_only_middleware,
            peer_check.middleware,
        ],
        client_max_size=services.settings.loader_max_json_bytes,
    )
    app[SERVICES] = services
    app[METRICS] = metrics
    app.on_response_prepare.append(hardening_headers)

    async def close_peer_check(app: web.Application) -> None:
        peer_check.close()

    app.on_cleanup.append(close_peer_check)
    for endpoint in ENDPOINTS:
        app.router.add_route(endpoint.method, endpoint.path, endpoint.handler)
    return app
