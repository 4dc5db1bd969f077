"""The agent's client of the Resource API and the CDN (contract: docs/resource-api.md).

One ``aiohttp.ClientSession`` per agent. The client logs in with credentials it keeps in memory
only, re-logs in once when a token is refused, and retries what waiting can fix (connection
errors, timeouts, 5xx, 429 with ``Retry-After``) through ``agent.retry``; every attempt has its
own timeout. Foreign errors (aiohttp, OS) are translated here, in ``translate_error``, into the
``agent.errors`` classes, with messages that name the upstream ("Resource API", "CDN") and never
the token or the password.

Nothing upstream is trusted (docs/security.md, "Hostile upstream"):

- no redirect is followed, on any endpoint: a 3xx is a 502 naming the upstream, so a request
  that carries the password or the token never goes to another origin or a weaker scheme; no
  cookie is kept; bodies are never decompressed;
- error messages name the upstream, the operation and the status, never upstream-supplied text
  (a bounded, escaped excerpt of an error body may go to the debug log, never of a login);
- every answer is read with a size bound and parsed with bounds (``parse_json``) and checked
  against the contract before use; anything else is ``UpstreamError`` (502);
- every transfer has a deadline; big parts also a minimum throughput (``TransferGuard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import math
import random
import re
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from loguru import logger
from yarl import URL

from agent import keys
from agent.errors import (
    BadCredentials,
    BodyInterrupted,
    ConfigError,
    ConflictError,
    LoaderError,
    NotAuthenticated,
    PayloadTooLarge,
    RangeNotSatisfiable,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from agent.logs import quote, register_secret
from agent.retry import RetryCounts, RetryPolicy, Sleep, retry_call
from agent.settings import is_loopback

T = TypeVar("T")

RESOURCE_API = "Resource API"
CDN = "CDN"
RETRY_OPERATIONS = {RESOURCE_API: "resource_api", CDN: "cdn"}  # /metrics label values
CHUNK = 256 * 1024
MAX_SMALL_PART_BYTES = 4 * 1024 * 1024  # the API stores at most 1 MiB; anything far above is junk
MAX_JSON_BYTES = 64 * 1024
TOKEN_EARLY_RENEWAL = 30.0  # seconds before expiry a token is treated as expired (at most)
MAX_JSON_DEPTH = 16  # the contract's answers are flat objects
MAX_TOKEN_LENGTH = 4096
MAX_TOKEN_LIFETIME = 366 * 24 * 3600.0
MAX_URL_LENGTH = 2048
# RFC 6750 b64token: what may follow "Bearer " in a header, and nothing else (no CR/LF).
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
_EXCERPT_LENGTH = 200


@dataclass(frozen=True)
class TransferLimits:
    """Bounds on one upstream transfer of a big part, over all its attempts and resumptions:
    at least ``min_rate`` bytes/s in every ``window`` seconds (0: no minimum), and done within
    ``deadline`` seconds (settings ``LOADER_UPSTREAM_*``)."""

    min_rate: int = 16 * 1024
    window: float = 30.0
    deadline: float = 3600.0


class TransferGuard:
    """Ends a transfer that is too slow or takes too long with ``UpstreamTimeout`` (504)."""

    def __init__(
        self,
        limits: TransferLimits,
        upstream: str,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._where = f"the {upstream}"
        self._what = what
        self._clock = clock
        now = clock()
        self._deadline_at = now + limits.deadline
        self._window_start = now
        self._window_bytes = 0

    def count(self, received: int) -> None:
        """Account for ``received`` bytes (0 when a wait ran out); raise if the transfer is
        past its deadline or below its minimum rate over a full window."""
        now = self._clock()
        limits = self._limits
        if now >= self._deadline_at:
            raise UpstreamTimeout(
                f"{self._where} did not deliver the {self._what} within "
                f"{limits.deadline:.0f} s (LOADER_UPSTREAM_DEADLINE)"
            )
        self._window_bytes += received
        if limits.min_rate and now - self._window_start >= limits.window:
            if self._window_bytes < limits.min_rate * limits.window:
                raise UpstreamTimeout(
                    f"{self._where} sent the {self._what} slower than {limits.min_rate} bytes/s "
                    f"over {limits.window:.0f} s (LOADER_UPSTREAM_MIN_RATE)"
                )
            self._window_start, self._window_bytes = now, 0

    async def watch(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """``chunks``, each counted as it arrives. The rate window of each pass (attempt or
        resumption) starts at its first byte, so waiting to connect or a pause a server asked
        for (Retry-After) is not counted as slowness; the deadline counts everything. A read
        that brings nothing for a whole window (the client's read timeout, at most one window)
        is below any minimum: ``UpstreamTimeout``, not a break to resume."""
        self.count(0)  # past the deadline, a pass does not start
        first = True
        try:
            async for chunk in chunks:
                if first:
                    self._window_start, self._window_bytes, first = self._clock(), 0, False
                self.count(len(chunk))
                yield chunk
        except BodyInterrupted as exc:
            if self._limits.min_rate and isinstance(exc.__cause__, TimeoutError):
                self.count(0)  # the deadline, if that is what ran out
                raise UpstreamTimeout(
                    f"{self._where} sent nothing of the {self._what} for "
                    f"{self._limits.window:.0f} s (LOADER_UPSTREAM_MIN_RATE)"
                ) from exc
            raise


@dataclass(frozen=True)
class StoredPart:
    """What the server says it stored."""

    size: int
    sha256: str | None


@dataclass
class _Token:
    value: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True)
class _Call:
    """One logical request: what it is (for messages) and how to send it again on a retry."""

    upstream: str
    what: str
    method: str
    url: URL
    authed: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    body: Callable[[], Any] | None = None
    streaming: bool = False
    login: bool = False


class ResourceApiClient:
    """Async client of the Resource API and its CDN; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        *,
        policy: RetryPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        limits: TransferLimits | None = None,
    ) -> None:
        try:
            self._base = URL(base_url.rstrip("/"))
        except (TypeError, ValueError) as exc:
            raise ConfigError("the Resource API URL is not a valid URL") from exc
        if self._base.scheme not in ("http", "https") or not self._base.host:
            raise ConfigError("the Resource API URL must be an http:// or https:// URL")
        self._policy = policy or RetryPolicy()
        self._session = session
        self._owns_session = session is None
        self._small_timeout = aiohttp.ClientTimeout(
            total=request_timeout, sock_connect=connect_timeout
        )
        self.limits = limits or TransferLimits()
        # A big part's read that brings nothing for a whole rate window is below any minimum.
        stall = min(read_timeout, self.limits.window) if self.limits.min_rate else read_timeout
        self._big_timeout = aiohttp.ClientTimeout(
            total=self.limits.deadline, sock_connect=connect_timeout, sock_read=stall
        )
        # An upload's answer may take a while (the CDN hashes what it stored): the full read
        # timeout, not the rate window.
        self._upload_timeout = aiohttp.ClientTimeout(
            total=self.limits.deadline, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._clock = clock
        self._credentials: tuple[str, str] | None = None
        self._token: _Token | None = None
        self._cdn_url: URL | None = None
        self._login_lock = asyncio.Lock()
        self.retries = RetryCounts()  # by upstream ("resource_api", "cdn") and cause

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> ResourceApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # no upstream state rides along
                auto_decompress=False,  # no decompression bombs; the contract has no encoding
                headers={"Accept-Encoding": "identity"},
            )
            self._owns_session = True
        return self._session

    # -- credentials and login ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return str(self._base)

    @property
    def policy(self) -> RetryPolicy:
        return self._policy

    @property
    def has_credentials(self) -> bool:
        return self._credentials is not None

    @property
    def authenticated(self) -> bool:
        """Whether the client holds a token that has not expired (by its own clock)."""
        return self._token is not None and self._clock() < self._token.expires_at

    def set_credentials(self, email: str, password: str) -> None:
        """Keep credentials (in memory only) for the next login; drops the current token."""
        register_secret(password)
        self._credentials = (email, password)
        self._token = None

    async def login(
        self,
        email: str | None = None,
        password: str | None = None,
        *,
        policy: RetryPolicy | None = None,
    ) -> None:
        """Log in, retrying transient failures (by ``policy``, else the client's). With
        arguments, they are kept only if accepted (``BadCredentials`` otherwise); without, the
        stored ones are used."""
        if email is None and password is None:
            credentials = self._stored_credentials()
        elif email is not None and password is not None:
            credentials = (email, password)
        else:
            raise NotAuthenticated("give both email and password to log in")
        token = await self._retrying(lambda: self._login_once(credentials), RESOURCE_API, policy)
        register_secret(credentials[1])  # accepted: from now on scrubbed from every line
        self._credentials = credentials
        self._token = token

    def _stored_credentials(self) -> tuple[str, str]:
        if self._credentials is None:
            raise NotAuthenticated("no credentials for the Resource API: log in first")
        return self._credentials

    async def _login_once(self, credentials: tuple[str, str]) -> _Token:
        email, password = credentials
        call = _Call(
            RESOURCE_API,
            "login",
            "POST",
            self._base / "login",
            body=lambda: json.dumps({"email": email, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
            login=True,
        )
        answer = await self._attempt(call, _read_json)
        return self._accept_login(answer)

    def _accept_login(self, answer: Any) -> _Token:
        """Check a login answer against the contract before using any of it."""
        if not isinstance(answer, dict):
            raise UpstreamError("the Resource API sent a login answer that is not a JSON object")
        token, lifetime, cdn_url = (answer.get(k) for k in ("token", "expires_in", "cdn_url"))
        if not (
            isinstance(token, str)
            and len(token) <= MAX_TOKEN_LENGTH
            and TOKEN_PATTERN.fullmatch(token)
        ):
            raise UpstreamError("the Resource API sent a login answer without a usable token")
        if (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, int | float)
            or not 0 < lifetime <= MAX_TOKEN_LIFETIME
        ):
            raise UpstreamError("the Resource API sent a login answer with an unusable expires_in")
        register_secret(token)
        cdn = _contract_url(cdn_url, self._base)
        if cdn.scheme != "https" and not (cdn.scheme == "http" and is_loopback(cdn.host or "")):
            # The CDN sees the token on uploads: never send it in the clear off this machine.
            raise UpstreamError("the Resource API named a CDN that is not https://; refused")
        self._cdn_url = cdn
        lifetime = float(lifetime)
        early = min(TOKEN_EARLY_RENEWAL, lifetime / 10)
        return _Token(token, self._clock() + lifetime - early)

    async def _valid_token(self) -> _Token:
        """The current token, logging in once (no retry: the caller's attempt is retried)."""
        async with self._login_lock:
            if self._token is None or self._clock() >= self._token.expires_at:
                self._token = await self._login_once(self._stored_credentials())
            return self._token

    async def _cdn_base(self) -> URL:
        if self._cdn_url is None:
            await self._retrying(self._valid_token, RESOURCE_API)
        assert self._cdn_url is not None
        return self._cdn_url

    # -- the Resource API --------------------------------------------------------------------

    async def get_key_fragment(self, *, policy: RetryPolicy | None = None) -> bytes:
        """The images key fragment from ``/binary-split/key-fragment``, retrying transient
        failures (by ``policy``, else the client's)."""
        call = _Call(
            RESOURCE_API,
            "images key fragment",
            "GET",
            self._base / "binary-split" / "key-fragment",
            authed=True,
        )
        raw = await self._exchange(
            call, lambda c, r: _read_limited(c, r, keys.MAX_FRAGMENT_FILE_SIZE), policy=policy
        )
        try:
            text = raw.decode("ascii")
            register_secret(text.strip())
            return keys.decode_fragment(text)
        except (UnicodeDecodeError, ConfigError) as exc:
            raise UpstreamError("the Resource API sent a key fragment that is not valid") from exc

    async def get_small_part(self, folder: str, name: str) -> bytes:
        call = _Call(
            RESOURCE_API,
            f"small part {folder}/{name}",
            "GET",
            self._base / "resources" / folder / name,
            authed=True,
        )
        return await self._exchange(call, lambda c, r: _read_limited(c, r, MAX_SMALL_PART_BYTES))

    async def put_small_part(self, folder: str, name: str, data: bytes) -> StoredPart:
        call = _Call(
            RESOURCE_API,
            f"small part {folder}/{name}",
            "PUT",
            self._base / "resources" / folder / name,
            authed=True,
            headers={"Content-Type": "application/octet-stream"},
            body=lambda: data,
        )
        ambiguous = False  # an attempt whose fate is unknown (it may have been stored)

        async def attempt() -> StoredPart:
            nonlocal ambiguous
            try:
                return await self._attempt(call, _read_stored_part)
            except LoaderError as exc:
                status = exc.upstream_status
                ambiguous = ambiguous or status is None or status == 429 or status >= 500
                raise

        try:
            stored = await self._retrying(attempt, call.upstream)
        except LoaderError as exc:
            if ambiguous:
                exc.upstream_status = None  # not a clean refusal: an earlier try may have landed
            raise
        _check_stored(call, stored, len(data), hashlib.sha256(data).hexdigest())
        return stored

    # -- the CDN -----------------------------------------------------------------------------

    async def iter_big_part(
        self, folder: str, name: str, *, offset: int = 0
    ) -> AsyncIterator[bytes]:
        """The big part's bytes from ``offset`` on (HTTP Range). Opening is retried; a break
        mid-body raises ``BodyInterrupted`` so the caller resumes from what it has."""
        if offset < 0:
            raise ValueError("offset cannot be negative")
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        call = _Call(
            CDN,
            f"big part {folder}/{name}",
            "GET",
            await self._cdn_base() / folder / name,
            headers=headers,
            streaming=True,
        )
        response = await self._retrying(lambda: self._attempt(call, _keep_open), CDN)
        try:
            skip = _bytes_to_skip(call, response, offset)
            async for chunk in self._guarded_chunks(call, response):
                if skip:
                    dropped = min(skip, len(chunk))
                    skip -= dropped
                    chunk = chunk[dropped:]
                if chunk:
                    yield chunk
        finally:
            response.close()

    async def _guarded_chunks(
        self, call: _Call, response: aiohttp.ClientResponse
    ) -> AsyncIterator[bytes]:
        iterator = response.content.iter_chunked(CHUNK).__aiter__()
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = translate_error(exc, call)
                if isinstance(error, UpstreamUnavailable | UpstreamTimeout):
                    raise BodyInterrupted(f"{error} (the download can resume)") from exc
                raise error from exc
            yield chunk

    async def put_big_part(
        self,
        folder: str,
        name: str,
        body: AsyncIterable[bytes] | Path,
        size: int,
        *,
        sha256: str | None = None,
    ) -> StoredPart:
        """Store a big part of ``size`` bytes. A file is re-read on a retry; an async iterable
        can be sent only once, so it gets a single attempt."""
        url = await self._cdn_base() / folder / name
        sent: list[bool] = []

        # The CDN must take the body at the least rate too, over all attempts: a reader that
        # drips holds the upload's caller (the deadline also bounds each request).
        guard = TransferGuard(self.limits, CDN, f"upload of big part {folder}/{name}")

        def make_body() -> AsyncIterable[bytes]:
            if isinstance(body, Path):
                return guard.watch(_file_chunks(body))
            if sent:
                raise UpstreamUnavailable("the CDN upload failed and its body cannot be sent again")
            sent.append(True)
            return guard.watch(body)

        call = _Call(
            CDN,
            f"big part {folder}/{name}",
            "PUT",
            url,
            authed=True,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=make_body,
            streaming=True,
        )
        once = None if isinstance(body, Path) else replace(self._policy, max_attempts=1)
        stored = await self._exchange(call, _read_stored_part, policy=once)
        _check_stored(call, stored, size, sha256)
        return stored

    async def delete_big_part(self, folder: str, name: str) -> None:
        """Remove a big part from the CDN (an upload's orphan); one already gone is fine."""
        call = _Call(
            CDN,
            f"big part {folder}/{name}",
            "DELETE",
            await self._cdn_base() / folder / name,
            authed=True,
        )
        with contextlib.suppress(UpstreamNotFound):
            await self._exchange(call, _read_nothing)

    # -- the request machinery ---------------------------------------------------------------

    async def _exchange(
        self,
        call: _Call,
        read: Callable[[_Call, aiohttp.ClientResponse], Awaitable[T]],
        *,
        policy: RetryPolicy | None = None,
    ) -> T:
        """Send ``call`` and ``read`` its answer, retrying both as one unit."""
        return await self._retrying(lambda: self._attempt(call, read), call.upstream, policy)

    async def _retrying(
        self,
        attempt: Callable[[], Awaitable[T]],
        upstream: str,
        policy: RetryPolicy | None = None,
    ) -> T:
        def log_retry(number: int, delay: float, exc: BaseException) -> None:
            self.retries.record(RETRY_OPERATIONS.get(upstream, "other"), exc)
            logger.warning(
                "{} attempt {} failed: {}; retrying in {:.1f} s", upstream, number, exc, delay
            )

        return await retry_call(
            attempt,
            policy or self._policy,
            on_retry=log_retry,
            rng=self._rng,
            sleep=self._sleep,
            clock=self._clock,
        )

    def _timeout_for(self, call: _Call) -> aiohttp.ClientTimeout:
        if not call.streaming:
            return self._small_timeout
        return self._big_timeout if call.method == "GET" else self._upload_timeout

    async def _attempt(
        self, call: _Call, read: Callable[[_Call, aiohttp.ClientResponse], Awaitable[T]]
    ) -> T:
        """One attempt: send, log in again once on 401, check the status, read the answer."""
        relogged = False
        while True:
            headers = dict(call.headers)
            token = await self._valid_token() if call.authed else None
            if token is not None:
                headers["Authorization"] = f"Bearer {token.value}"
            try:
                response = await self._http().request(
                    call.method,
                    call.url,
                    headers=headers,
                    data=call.body() if call.body is not None else None,
                    timeout=self._timeout_for(call),
                    # No endpoint follows a redirect: the login carries the password, the
                    # others the token, and a big part's GET has no need (docs/security.md).
                    allow_redirects=False,
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise translate_error(exc, call) from exc
            keep_open = False
            try:
                if response.status == 401 and token is not None and not relogged:
                    relogged = True
                    if self._token is token:  # unless a concurrent request renewed it already
                        self._token = None
                    continue
                await _raise_for_status(call, response, relogged=relogged)
                result = await read(call, response)
                keep_open = result is response
                return result
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise translate_error(exc, call) from exc
            finally:
                if not keep_open:
                    response.release()


# -- reading answers ---------------------------------------------------------------------------


async def _keep_open(call: _Call, response: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    return response


async def _read_nothing(call: _Call, response: aiohttp.ClientResponse) -> None:
    await _read_limited(call, response, MAX_JSON_BYTES)  # drained, so the connection is reused


async def _read_limited(call: _Call, response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise UpstreamError(f"the {call.upstream} sent more than the {limit} bytes expected")
    data = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        data += chunk
        if len(data) > limit:
            raise UpstreamError(f"the {call.upstream} sent more than the {limit} bytes expected")
    return bytes(data)


async def _read_json(call: _Call, response: aiohttp.ClientResponse) -> Any:
    raw = await _read_limited(call, response, MAX_JSON_BYTES)
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise UpstreamError(
            f"the {call.upstream} sent an answer that is not JSON within bounds ({call.what})"
        ) from exc


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse upstream JSON with bounds: UTF-8, nesting at most ``max_depth`` (checked before
    the parser recurses), no NaN or Infinity. ``ValueError`` for anything else."""
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    depth = 0
    in_string = escaped = False
    for char in text:  # a scan of at most MAX_JSON_BYTES characters
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth}")
        elif char in "]}":
            depth -= 1
    return json.loads(text, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _contract_url(value: object, base: URL) -> URL:
    """The login answer's ``cdn_url``, resolved against the API's base URL."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_URL_LENGTH
        or not value.isprintable()
        or not value.isascii()
    ):
        raise UpstreamError("the Resource API's login answer does not name the CDN usably")
    try:
        cdn = base.join(URL(value.rstrip("/")))
    except (TypeError, ValueError) as exc:
        raise UpstreamError(
            "the Resource API's login answer names a CDN URL that is not valid"
        ) from exc
    if cdn.scheme not in ("http", "https") or not cdn.host or cdn.user or cdn.password:
        raise UpstreamError("the Resource API's login answer names a CDN URL that is not valid")
    return cdn


async def _read_stored_part(call: _Call, response: aiohttp.ClientResponse) -> StoredPart:
    """The server's receipt: ``size`` and ``sha256`` are optional, but checked when there."""
    answer = await _read_json(call, response)
    if not isinstance(answer, dict):
        raise UpstreamError(
            f"the {call.upstream} sent a receipt that is not an object ({call.what})"
        )
    size, digest = answer.get("size"), answer.get("sha256")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise UpstreamError(
            f"the {call.upstream} sent a receipt with an unusable size ({call.what})"
        )
    if digest is not None and not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
        raise UpstreamError(
            f"the {call.upstream} sent a receipt with an unusable sha256 ({call.what})"
        )
    return StoredPart(size=-1 if size is None else size, sha256=digest)


def _check_stored(call: _Call, stored: StoredPart, size: int, sha256: str | None) -> None:
    """The server's receipt, when it gives one, must match what was sent."""
    if stored.size not in (-1, size) or (sha256 and stored.sha256 and stored.sha256 != sha256):
        raise UpstreamError(
            f"the {call.upstream} stored something other than what was sent ({call.what})"
        )


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            yield chunk


def _bytes_to_skip(call: _Call, response: aiohttp.ClientResponse, offset: int) -> int:
    """How much of the body precedes ``offset``: all of it if the server ignored Range."""
    if response.status == 200:
        return offset
    match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if response.status != 206 or match is None or int(match[1]) != offset:
        raise UpstreamError(f"the {call.upstream} answered a ranged request wrongly ({call.what})")
    return 0


# -- statuses and foreign errors ---------------------------------------------------------------


async def _raise_for_status(
    call: _Call, response: aiohttp.ClientResponse, *, relogged: bool
) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    if not call.login:  # a login's answer may echo the password: never logged
        await _log_excerpt(call, response)
    error = status_error(call, status, response.headers.get("Retry-After"), relogged)
    error.upstream_status = status
    raise error


def status_error(call: _Call, status: int, retry_after: str | None, relogged: bool) -> LoaderError:
    """The agent's error for an upstream's HTTP error status (docs/resource-api.md). It names
    the upstream, the operation and the status; never anything the upstream wrote."""
    where = f"the {call.upstream}"
    suffix = f" ({call.what})"
    if 300 <= status < 400:
        return UpstreamError(
            f"{where} answered with a redirect (HTTP {status}){suffix}; this agent follows no "
            f"redirects"
        )
    if call.login and status in (401, 403):
        return BadCredentials(f"{where} refused the email or password (HTTP {status})")
    if status == 401:
        if relogged:
            return UpstreamError(f"{where} refused a token it had just issued{suffix}")
        return UpstreamError(f"{where} asks for a login where the contract has none{suffix}")
    if status == 403:
        return UpstreamForbidden(f"{where} does not allow this account access{suffix}")
    if status == 404:
        return UpstreamNotFound(f"{where} has no {call.what}")
    if status == 409:
        return ConflictError(f"{where} reports a conflicting upload in progress{suffix}")
    if status == 413:
        return PayloadTooLarge(f"{where} refused the upload as too large{suffix}")
    if status == 416:
        return RangeNotSatisfiable(f"{where} cannot resume: the part is shorter{suffix}")
    if status == 504:
        return UpstreamTimeout(f"{where} timed out upstream (HTTP 504){suffix}")
    if status == 429 or status >= 500:
        return UpstreamThrottled(
            f"{where} is unavailable (HTTP {status}){suffix}", parse_retry_after(retry_after)
        )
    return UpstreamError(f"{where} answered HTTP {status}{suffix}")


async def _log_excerpt(call: _Call, response: aiohttp.ClientResponse) -> None:
    """A bounded, escaped excerpt of an error body in the debug log (for diagnosis only; it
    never reaches a caller)."""
    try:
        raw = await response.content.read(_EXCERPT_LENGTH)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return
    if raw:
        logger.debug(
            "{} answered HTTP {} ({}); body starts {}",
            call.upstream,
            response.status,
            call.what,
            quote(raw.decode("utf-8", "replace"), _EXCERPT_LENGTH),
        )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def translate_error(exc: BaseException, call: _Call) -> LoaderError:
    """The one place where aiohttp and OS errors become the agent's errors."""
    if isinstance(exc, LoaderError):
        return exc
    if isinstance(exc.__cause__, LoaderError):
        return exc.__cause__  # ours, raised inside aiohttp (a request body's TransferGuard)
    where = f"the {call.upstream}"
    if isinstance(exc, aiohttp.InvalidURL):
        return ConfigError(f"the URL of {where} is not valid")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ServerFingerprintMismatch):
        return UpstreamError(f"{where}'s TLS certificate was refused ({call.what})")
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return UpstreamError(f"TLS with {where} failed ({call.what})")
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"{where} did not answer in time ({call.what})")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        # The Resource API's address is the operator's setting; the CDN's came from upstream.
        at = f" at {exc.host}:{exc.port}" if call.upstream == RESOURCE_API else ""
        return UpstreamUnavailable(f"cannot reach {where}{at} ({call.what}): {reason}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamUnavailable(f"{where} cut the answer short ({call.what})")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionError | OSError):
        return UpstreamUnavailable(f"{where} closed the connection ({call.what})")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamError(f"{where} sent an answer the agent cannot read ({call.what})")
    return UpstreamError(f"talking to {where} failed ({call.what}): {type(exc).__name__}")
