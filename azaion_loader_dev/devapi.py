"""dev-api: the reference Resource API and CDN. NOT FOR PRODUCTION.

An aiohttp implementation of ``docs/resource-api.md`` that keeps its data in a directory, for
development, tests and the demo. It is real HTTP (the agent's tests talk to it over loopback),
and it can be told through ``/_dev/`` to fail the way real servers fail: error statuses, slow
answers, bodies cut short, dropped connections, garbage, expired tokens.

Not for production: users and passwords come from the command line, tokens live in memory,
there is no TLS, and anyone who reaches the port can arm faults. Every response says so in its
``Server`` header.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from loguru import logger

from agent.defaults import DEFAULT_MAX_BIG_BYTES, DEFAULT_MAX_SMALL_BYTES, NAME_MAX_LENGTH
from agent.errors import ConfigError

SERVER_BANNER = "azaion-dev-api (NOT FOR PRODUCTION)"
SAFE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{NAME_MAX_LENGTH - 1}}}")
CHUNK = 256 * 1024

STATS_LOG_LENGTH = 1000
STATS_RATE_SECONDS = 3600  # per-second API counts are kept for the first hour after a clear
RATE_LIMIT_GRACE = 1.0  # seconds a slot promised to a refused request is kept for it
RATE_LIMIT_BURST = 0.1  # a second's worth: how far ahead of its rate the limiter admits at once
BODY_FAULT_KINDS = ("stall", "drop_mid_body", "truncate", "garbage")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class DevApiConfig:
    data_dir: Path
    users: Mapping[str, str]
    key_fragment_text: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    token_ttl: float = 3600.0
    max_small_bytes: int = DEFAULT_MAX_SMALL_BYTES
    max_big_bytes: int = DEFAULT_MAX_BIG_BYTES
    rate_limit: float | None = None  # API requests a second; None: no limit
    cdn_rate: float | None = None  # bytes a second per big-part answer; None: as fast as it can


class Refusal(Exception):
    """An error answer: turned into JSON ``{"error", "message"}`` by the middleware."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(refusal: Refusal) -> web.Response:
    return web.json_response(
        {"error": refusal.code, "message": refusal.message},
        status=refusal.status,
        headers=refusal.headers,
    )


# ---------------------------------------------------------------------------------------------
# Faults, statistics, tokens: the server's in-memory state


@dataclass
class Fault:
    """One armed fault; see docs/resource-api.md for what each field does."""

    count: int | None = 1
    path: str | None = None
    method: str | None = None
    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    stall: float = 0.0
    drop_mid_body: bool = False
    truncate: bool = False
    garbage: bool = False
    probability: float = 1.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Fault:
        known = set(cls.__dataclass_fields__)
        unknown = set(spec) - known
        if unknown:
            raise Refusal(400, "bad_fault", f"unknown fault fields: {sorted(unknown)}")
        try:
            fault = cls(**spec)
        except TypeError as exc:
            raise Refusal(400, "bad_fault", f"bad fault: {exc}") from exc
        if fault.status is not None and not 100 <= fault.status <= 599:
            raise Refusal(400, "bad_fault", "status must be an HTTP status code")
        if fault.count is not None and fault.count < 1:
            raise Refusal(400, "bad_fault", "count must be at least 1, or null for always")
        if not 0.0 < fault.probability <= 1.0:
            raise Refusal(400, "bad_fault", "probability must be in (0, 1]")
        return fault

    @property
    def is_body_fault(self) -> bool:
        return any(getattr(self, kind) for kind in BODY_FAULT_KINDS)

    def matches(self, request: web.Request) -> bool:
        if self.path is not None and not request.path.startswith(self.path):
            return False
        if self.method is not None and request.method != self.method.upper():
            return False
        if self.is_body_fault:
            return request.method == "GET" or request.path == "/login"
        return True


class FaultBook:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def arm(self, fault: Fault) -> None:
        self._faults.append(fault)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, request: web.Request) -> Fault | None:
        """The first armed fault matching ``request``, with one use counted off."""
        for fault in self._faults:
            if fault.matches(request) and random.random() < fault.probability:
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                return fault
        return None


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=STATS_LOG_LENGTH))
    bytes_sent: Counter[str] = field(default_factory=Counter)  # body bytes, by request
    # API requests (not /cdn/, /health, /_dev/) by second since the last clear: all that came
    # (attempted) and those the rate limiter refused.
    attempted: Counter[int] = field(default_factory=Counter)
    limited: Counter[int] = field(default_factory=Counter)
    clock: Callable[[], float] = time.monotonic
    started: float = field(default_factory=time.monotonic)

    def count_api_request(self) -> None:
        self._count(self.attempted)

    def count_refusal(self) -> None:
        """One of the API requests counted was refused by the rate limiter."""
        self._count(self.limited)

    def _count(self, counter: Counter[int]) -> None:
        second = math.floor(self.clock() - self.started)
        if second < STATS_RATE_SECONDS:
            counter[second] += 1

    def as_json(self) -> dict[str, Any]:
        seconds = range(max([*self.attempted, -1]) + 1)
        return {
            "requests": dict(self.requests),
            "log": list(self.log),
            "bytes_sent": dict(self.bytes_sent),
            "api_per_second": {
                "attempted": [self.attempted[s] for s in seconds],
                "answered": [self.attempted[s] - self.limited[s] for s in seconds],
            },
        }

    def clear(self) -> None:
        self.requests.clear()
        self.log.clear()
        self.bytes_sent.clear()
        self.attempted.clear()
        self.limited.clear()
        self.started = self.clock()


class RateLimiter:
    """At most ``rate`` API requests in any second; beyond, a 429 whose ``Retry-After`` names
    a slot of the limiter's own schedule.

    Slots are ``1/rate`` s apart. ``_next_slot`` is the first one nobody has (GCRA's
    theoretical arrival time); a request is admitted at once when it is at most a tenth of a
    second ahead. A refused request is promised the next free slot and told when it comes, so
    refused requests get one slot each, one after the other: a fleet turned away at once comes
    back spread at the limiter's rate, not all together after the same pause (the queue is the
    limiter's to know, not the clients'). A request that comes when a promised slot is due takes
    it, whoever it is (requests are not identified); a slot that nobody takes within
    ``RATE_LIMIT_GRACE`` s is lost. On top, a sliding window: never more than ``rate`` admitted
    within one second, however late promised slots are taken.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("the rate limit must be positive")
        self._interval = 1.0 / rate
        self._ahead = max(self._interval, RATE_LIMIT_BURST)
        self._window = max(1, math.floor(rate))
        self._clock = clock
        self._next_slot = clock()
        self._promised: deque[float] = deque()
        self._admitted: deque[float] = deque()  # admission times within the last second

    def admit(self) -> float | None:
        """None if a request may go ahead now, else the seconds it is to wait."""
        now = self._clock()
        while self._admitted and self._admitted[0] <= now - 1.0:
            self._admitted.popleft()
        while self._promised and self._promised[0] < now - RATE_LIMIT_GRACE:
            self._promised.popleft()
        window_full = len(self._admitted) >= self._window
        if not window_full and self._promised and self._promised[0] <= now:
            self._promised.popleft()
        elif not window_full and self._next_slot - now <= self._ahead:
            self._next_slot = max(self._next_slot, now) + self._interval
        else:
            # Every refusal gets a slot of its own: a short "try again in a moment" for all
            # would bring them back together.
            slot = max(self._next_slot, now + self._interval)
            self._next_slot = slot + self._interval
            self._promised.append(slot)
            return slot - now
        self._admitted.append(now)
        return None


class TokenBook:
    """Issued bearer tokens and when each expires (monotonic clock)."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._expiry: dict[str, float] = {}

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        self._expiry[token] = self._clock() + self._ttl
        return token

    def expire_all(self) -> None:
        for token in self._expiry:
            self._expiry[token] = float("-inf")

    def check(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Refusal(401, "unauthorized", "this endpoint needs a bearer token")
        expiry = self._expiry.get(token.strip())
        if expiry is None:
            raise Refusal(401, "unauthorized", "unknown token")
        if expiry <= self._clock():
            raise Refusal(401, "token_expired", "the token has expired; log in again")


class Pace:
    """Holds one answer to ``rate`` bytes a second (``--cdn-rate``): after each chunk, sleeps
    until the time the bytes sent so far are due, so the answer's average rate is ``rate``."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._start = time.monotonic()
        self._sent = 0

    async def sent(self, count: int) -> None:
        self._sent += count
        ahead = self._start + self._sent / self._rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


CONFIG = web.AppKey("config", DevApiConfig)
FAULTS = web.AppKey("faults", FaultBook)
STATS = web.AppKey("stats", Stats)
TOKENS = web.AppKey("tokens", TokenBook)
LIMITER = web.AppKey("limiter", RateLimiter)
UPLOADS_IN_PROGRESS = web.AppKey("uploads_in_progress", set[Path])
FAULT_KEY = web.RequestKey("fault", Fault)
PACE_KEY = web.RequestKey("pace", Pace)


# ---------------------------------------------------------------------------------------------
# Bodies: every answer with a body goes through send_body, where body faults apply


class Body:
    """A byte range of a file or of a bytes object, read in chunks."""

    def __init__(
        self, *, data: bytes = b"", path: Path | None = None, start: int = 0, end: int = 0
    ) -> None:
        self._data = data
        self._path = path
        self.start = start
        self.end = end if path is not None else len(data)

    @property
    def length(self) -> int:
        return self.end - self.start

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start``..``end`` of this body (offsets relative to the body)."""
        if self._path is None:
            for offset in range(start, end, CHUNK):
                yield self._data[offset : min(end, offset + CHUNK)]
            return
        with self._path.open("rb") as file:
            file.seek(self.start + start)
            remaining = end - start
            while remaining > 0:
                chunk = file.read(min(CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk


async def send_body(
    request: web.Request,
    body: Body,
    *,
    content_type: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    fault = request.get(FAULT_KEY)
    half = body.length // 2
    announced = half if fault and fault.truncate else body.length
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = content_type
    response.content_length = announced
    await response.prepare(request)
    sent = request.app[STATS].bytes_sent
    key = f"{request.method} {request.path}"
    garbage = bool(fault and fault.garbage)
    pace = request.get(PACE_KEY)
    sent[key] += await _write(response, body.chunks(0, half), garbage=garbage, pace=pace)
    if fault and fault.drop_mid_body:
        _drop_connection(request)
        return response
    if fault and fault.stall:
        await asyncio.sleep(fault.stall)
    if not (fault and fault.truncate):
        sent[key] += await _write(
            response, body.chunks(half, body.length), garbage=garbage, pace=pace
        )
    await response.write_eof()
    return response


async def _write(
    response: web.StreamResponse,
    chunks: Iterator[bytes],
    *,
    garbage: bool,
    pace: Pace | None = None,
) -> int:
    sent = 0
    for chunk in chunks:
        await response.write(os.urandom(len(chunk)) if garbage else chunk)
        sent += len(chunk)
        if pace is not None:
            await pace.sent(len(chunk))
    return sent


def _drop_connection(request: web.Request) -> None:
    """Close the socket under a response that announced more than was sent."""
    transport = request.transport
    if transport is not None:
        transport.close()
    # Without this aiohttp would keep the half-sent response's connection for the next request.
    request.protocol.force_close()


def json_body(payload: Mapping[str, Any]) -> Body:
    return Body(data=json.dumps(payload).encode())


# ---------------------------------------------------------------------------------------------
# Middlewares


def is_api_path(path: str) -> bool:
    """Whether a request is for the Resource API (what the rate limit covers), not the CDN,
    the health check or ``/_dev/``."""
    return not path.startswith(("/_dev/", "/cdn/")) and path != "/health"


@web.middleware
async def stats_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/_dev/"):
        return await handler(request)
    stats = request.app[STATS]
    stats.requests[f"{request.method} {request.path}"] += 1
    if is_api_path(request.path):
        stats.count_api_request()
    entry: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "range": request.headers.get("Range"),
        "authorization": "Authorization" in request.headers,  # whether, never what
        "status": None,
    }
    stats.log.append(entry)
    response = await handler(request)
    entry["status"] = response.status
    logger.info("dev-api: {} {} -> {}", request.method, request.path, response.status)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refusal as refusal:
        return error_response(refusal)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(Refusal(exc.status, "http_error", exc.reason))


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app.get(LIMITER)
    if limiter is None or not is_api_path(request.path):
        return await handler(request)
    wait = limiter.admit()
    if wait is None:
        return await handler(request)
    request.app[STATS].count_refusal()
    # Seconds with a decimal fraction (the agent takes them; RFC 9110's integer would round
    # every client to the same second): the slot the limiter keeps for this request.
    raise Refusal(
        429,
        "rate_limited",
        "too many requests: come back after Retry-After",
        {"Retry-After": f"{max(wait, 0.001):.3f}"},
    )


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/_dev/"):
        return await handler(request)
    fault = request.app[FAULTS].take(request)
    if fault is None:
        return await handler(request)
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.status is not None:
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        raise Refusal(fault.status, "injected_fault", "fault injected by /_dev/faults", headers)
    request[FAULT_KEY] = fault
    return await handler(request)


async def add_banner(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_BANNER
    response.headers["X-Not-For-Production"] = "1"


# ---------------------------------------------------------------------------------------------
# Handlers


def checked_name(request: web.Request, key: str) -> str:
    value = request.match_info[key]
    if not SAFE_NAME.fullmatch(value) or ".." in value:
        raise Refusal(400, "invalid_name", f"{key} is not a safe name")
    return value


def part_path(request: web.Request, area: str) -> Path:
    folder = checked_name(request, "folder")
    name = checked_name(request, "name")
    return request.app[CONFIG].data_dir / area / folder / name


async def login(request: web.Request) -> web.StreamResponse:
    try:
        payload = await request.json()
        email, password = payload["email"], payload["password"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Refusal(400, "bad_request", "send JSON with 'email' and 'password'") from exc
    if not (isinstance(email, str) and isinstance(password, str)):
        raise Refusal(400, "bad_request", "'email' and 'password' must be strings")
    expected = request.app[CONFIG].users.get(email)
    if expected is None or not secrets.compare_digest(expected.encode(), password.encode()):
        raise Refusal(401, "bad_credentials", "wrong email or password")
    config = request.app[CONFIG]
    answer = {
        "token": request.app[TOKENS].issue(),
        "token_type": "Bearer",
        "expires_in": config.token_ttl,
        "cdn_url": str(request.url.origin() / "cdn"),
    }
    return await send_body(request, json_body(answer), content_type="application/json")


async def get_small_part(request: web.Request) -> web.StreamResponse:
    request.app[TOKENS].check(request.headers.get("Authorization"))
    return await serve_file(request, part_path(request, "small"), ranged=False)


async def put_small_part(request: web.Request) -> web.StreamResponse:
    request.app[TOKENS].check(request.headers.get("Authorization"))
    path = part_path(request, "small")
    return await store_body(request, path, request.app[CONFIG].max_small_bytes)


async def get_key_fragment(request: web.Request) -> web.StreamResponse:
    request.app[TOKENS].check(request.headers.get("Authorization"))
    text = request.app[CONFIG].key_fragment_text
    if text is None:
        raise Refusal(404, "not_found", "this server has no key fragment configured")
    return await send_body(request, Body(data=text.encode() + b"\n"), content_type="text/plain")


async def get_big_part(request: web.Request) -> web.StreamResponse:
    rate = request.app[CONFIG].cdn_rate
    if rate is not None:
        request[PACE_KEY] = Pace(rate)
    return await serve_file(request, part_path(request, "cdn"), ranged=True)


async def put_big_part(request: web.Request) -> web.StreamResponse:
    request.app[TOKENS].check(request.headers.get("Authorization"))
    path = part_path(request, "cdn")
    return await store_body(request, path, request.app[CONFIG].max_big_bytes)


async def delete_big_part(request: web.Request) -> web.StreamResponse:
    request.app[TOKENS].check(request.headers.get("Authorization"))
    path = part_path(request, "cdn")
    try:
        path.unlink()
    except FileNotFoundError as exc:
        raise Refusal(404, "not_found", "no such part") from exc
    return web.Response(status=204)


async def serve_file(request: web.Request, path: Path, *, ranged: bool) -> web.StreamResponse:
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise Refusal(404, "not_found", "no such part") from exc
    byte_range = parse_range(request.headers.get("Range"), size) if ranged else None
    if byte_range is None:
        return await send_body(
            request, Body(path=path, end=size), content_type="application/octet-stream"
        )
    start, end = byte_range
    return await send_body(
        request,
        Body(path=path, start=start, end=end),
        content_type="application/octet-stream",
        status=206,
        headers={"Content-Range": f"bytes {start}-{end - 1}/{size}"},
    )


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end exclusive)`` for a single ``bytes=a-`` or ``bytes=a-b``; None to send all.

    Raises the 416 refusal for a start at or past the end. Forms this server does not support
    (several ranges, suffix ranges) are ignored, which RFC 9110 allows.
    """
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    if match is None:
        return None
    start = int(match.group(1))
    end = int(match.group(2)) + 1 if match.group(2) else size
    if start >= size:
        raise Refusal(
            416,
            "range_not_satisfiable",
            "range starts past the end",
            {"Content-Range": f"bytes */{size}"},
        )
    if end <= start:
        return None
    return start, min(end, size)


async def store_body(request: web.Request, path: Path, limit: int) -> web.StreamResponse:
    """Write the request body to ``path`` atomically: hidden temp file, fsync, rename."""
    declared = request.content_length
    if declared is None:
        raise Refusal(411, "length_required", "send Content-Length")
    if declared > limit:
        raise Refusal(413, "too_large", f"parts here are limited to {limit} bytes")
    uploads = request.app[UPLOADS_IN_PROGRESS]
    if path in uploads:
        raise Refusal(409, "upload_in_progress", "another upload of this part is in progress")
    uploads.add(path)
    try:
        size, digest = await _write_atomically(request, path)
    finally:
        uploads.discard(path)
    return web.json_response({"status": "ok", "size": size, "sha256": digest}, status=201)


async def _write_atomically(request: web.Request, path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    digest = hashlib.sha256()
    size = 0
    try:
        with temp.open("wb") as file:
            async for chunk in request.content.iter_chunked(CHUNK):
                digest.update(chunk)
                file.write(chunk)
                size += len(chunk)
            await asyncio.to_thread(os.fsync, file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "healthy", "production": False})


async def arm_fault(request: web.Request) -> web.Response:
    try:
        spec = await request.json()
    except ValueError as exc:
        raise Refusal(400, "bad_fault", "send a JSON object") from exc
    if not isinstance(spec, dict):
        raise Refusal(400, "bad_fault", "send a JSON object")
    if spec.pop("expire_tokens", False):
        request.app[TOKENS].expire_all()
    if spec:
        request.app[FAULTS].arm(Fault.from_spec(spec))
    return web.json_response({"status": "ok"})


async def clear_faults(request: web.Request) -> web.Response:
    request.app[FAULTS].clear()
    return web.json_response({"status": "ok"})


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].as_json())


async def clear_stats(request: web.Request) -> web.Response:
    request.app[STATS].clear()
    return web.json_response({"status": "ok"})


# ---------------------------------------------------------------------------------------------
# Application and server


def create_app(config: DevApiConfig) -> web.Application:
    app = web.Application(
        middlewares=[stats_middleware, error_middleware, rate_limit_middleware, fault_middleware]
    )
    app[CONFIG] = config
    if config.rate_limit is not None:
        app[LIMITER] = RateLimiter(config.rate_limit)
    app[FAULTS] = FaultBook()
    app[STATS] = Stats()
    app[TOKENS] = TokenBook(config.token_ttl)
    app[UPLOADS_IN_PROGRESS] = set()
    app.on_response_prepare.append(add_banner)
    app.router.add_get("/health", health, allow_head=False)
    app.router.add_post("/login", login)
    app.router.add_get("/resources/{folder}/{name}", get_small_part, allow_head=False)
    app.router.add_put("/resources/{folder}/{name}", put_small_part)
    app.router.add_get("/binary-split/key-fragment", get_key_fragment, allow_head=False)
    app.router.add_get("/cdn/{folder}/{name}", get_big_part, allow_head=False)
    app.router.add_put("/cdn/{folder}/{name}", put_big_part)
    app.router.add_delete("/cdn/{folder}/{name}", delete_big_part)
    app.router.add_post("/_dev/faults", arm_fault)
    app.router.add_delete("/_dev/faults", clear_faults)
    app.router.add_get("/_dev/stats", get_stats, allow_head=False)
    app.router.add_delete("/_dev/stats", clear_stats)
    return app


def announce_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(config: DevApiConfig, *, ready: Callable[[str], None] | None = None) -> None:
    """Serve until cancelled; ``ready`` gets the base URL once connections are accepted."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"dev-api cannot listen on {config.host}:{config.port}: {exc.strerror}"
            ) from exc
        port = runner.addresses[0][1]
        url = announce_url(config.host, port)
        logger.warning(
            "dev-api: reference Resource API and CDN for development and tests only, "
            "NOT FOR PRODUCTION; data in {}",
            config.data_dir,
        )
        if ready is not None:
            ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
