"""One exchange with the Resource API or its CDN, for the agent's client (``agent.api_client``).

A ``Call`` says what a request is (for messages) and how to send it again. ``Transport`` sends
it on the agent's one ``aiohttp.ClientSession``: one attempt (``attempt``) logs in again once
when a token is refused (through the client's token hooks), turns an error status into the
agent's error and reads the answer with bounds; ``exchange`` retries attempts through
``agent.retry`` (connection errors, timeouts, 5xx, 429 with ``Retry-After``) and counts the
retries for ``/metrics``. Every attempt has its own timeout. Foreign errors (aiohttp, OS) are
translated here, in ``translate_error``, into the ``agent.errors`` classes, with messages that
name the upstream ("Resource API", "CDN") and never the token or the password.

Nothing upstream is trusted (docs/security.md, "Hostile upstream"):

- no redirect is followed, on any endpoint: a 3xx is a 502 naming the upstream, so a request
  that carries the password or the token never goes to another origin or a weaker scheme; no
  cookie is kept; bodies are never decompressed;
- error messages name the upstream, the operation and the status, never upstream-supplied text
  (a bounded, escaped excerpt of an error body may go to the debug log, never of a login);
- every answer is read with a size bound and parsed with bounds (``parse_json``); the client
  checks it against the contract before use;
- every transfer has a deadline; big parts also a minimum throughput (``TransferGuard``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from loguru import logger
from yarl import URL

from agent.errors import (
    BadCredentials,
    BodyInterrupted,
    ConfigError,
    ConflictError,
    LoaderError,
    PayloadTooLarge,
    RangeNotSatisfiable,
    TransferTooSlow,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from agent.logs import quote
from agent.retry import OnRetry, RetryCounts, RetryPolicy, Sleep, retry_call

T = TypeVar("T")

RESOURCE_API = "Resource API"
CDN = "CDN"
RETRY_OPERATIONS = {RESOURCE_API: "resource_api", CDN: "cdn"}  # /metrics label values
CHUNK = 256 * 1024
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16  # the contract's answers are flat objects
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
    """Ends a transfer that is too slow or takes too long with ``TransferTooSlow`` (504), a
    final error: no retry or resumption undoes it.

    The transfer is all its passes (attempts and resumptions) together: one deadline from the
    start, and one rate window that runs only while a pass runs. The pauses between passes (a
    backoff, a ``Retry-After``) are not slowness; a CDN that sends a little and breaks off,
    again and again, is (its passes add up to full windows).
    """

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
        self._paused_since: float | None = now  # no pass runs yet

    def count(self, received: int) -> None:
        """Account for ``received`` bytes (0 when a wait ran out); raise if the transfer is
        past its deadline or below its minimum rate over a full window."""
        now = self._clock()
        limits = self._limits
        self._check_deadline(now)
        self._window_bytes += received
        if limits.min_rate and now - self._window_start >= limits.window:
            if self._window_bytes < limits.min_rate * limits.window:
                raise TransferTooSlow(
                    f"{self._where} sent the {self._what} slower than {limits.min_rate} bytes/s "
                    f"over {limits.window:.0f} s (LOADER_UPSTREAM_MIN_RATE)"
                )
            self._window_start, self._window_bytes = now, 0

    def _check_deadline(self, now: float) -> None:
        verdict = self.past_deadline(now)
        if verdict is not None:
            raise verdict

    def past_deadline(self, now: float | None = None) -> TransferTooSlow | None:
        """The verdict once the transfer is past its deadline, else None."""
        if (self._clock() if now is None else now) < self._deadline_at:
            return None
        return TransferTooSlow(
            f"{self._where} did not deliver the {self._what} within "
            f"{self._limits.deadline:.0f} s (LOADER_UPSTREAM_DEADLINE)"
        )

    def _resume(self) -> None:
        """A pass starts: the window goes on from where the last pass left it."""
        now = self._clock()
        self._check_deadline(now)  # past the deadline, a pass does not start
        if self._paused_since is not None:
            self._window_start += now - self._paused_since
            self._paused_since = None

    async def watch(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """``chunks`` (one pass), each counted as it arrives. A read that brings nothing for a
        whole window (the client's read timeout, at most one window) is below any minimum:
        ``TransferTooSlow``, not a break to resume."""
        self._resume()
        try:
            async for chunk in chunks:
                self.count(len(chunk))
                yield chunk
        except BodyInterrupted as exc:
            if self._limits.min_rate and isinstance(exc.__cause__, TimeoutError):
                self.count(0)  # the deadline, if that is what ran out
                raise TransferTooSlow(
                    f"{self._where} sent nothing of the {self._what} for "
                    f"{self._limits.window:.0f} s (LOADER_UPSTREAM_MIN_RATE)"
                ) from exc
            raise
        finally:
            self._paused_since = self._clock()
            close = getattr(chunks, "aclose", None)
            if close is not None:  # closed early: the response under it goes at once
                await close()


@dataclass
class Token:
    """A bearer token and when it is to be renewed (by the client's clock); never in a repr."""

    value: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True)
class Call:
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
    # The transfer's guard, when it spans the request (an upload): a timeout past its deadline
    # is its verdict, final, rather than a timeout to retry.
    guard: TransferGuard | None = None


Reader = Callable[[Call, aiohttp.ClientResponse], Awaitable[T]]
"""Reads an answer whose status was a success (``read_json``, ``read_limited``, ...)."""


class Transport:
    """Sends ``Call``s; see the module docstring. ``token`` gives the current token (logging in
    if need be) and ``drop_token`` forgets one the upstream refused, unless renewed already."""

    def __init__(
        self,
        *,
        token: Callable[[], Awaitable[Token]],
        drop_token: Callable[[Token], None],
        policy: RetryPolicy,
        session: aiohttp.ClientSession | None,
        request_timeout: float,
        connect_timeout: float,
        read_timeout: float,
        limits: TransferLimits,
        sleep: Sleep,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self._token = token
        self._drop_token = drop_token
        self.policy = policy
        self._session = session
        self._owns_session = session is None
        self._small_timeout = aiohttp.ClientTimeout(
            total=request_timeout, sock_connect=connect_timeout
        )
        self.limits = limits
        # A big part's read that brings nothing for a whole rate window is below any minimum.
        stall = min(read_timeout, limits.window) if limits.min_rate else read_timeout
        self._big_timeout = aiohttp.ClientTimeout(
            total=limits.deadline, sock_connect=connect_timeout, sock_read=stall
        )
        # An upload's answer may take a while (the CDN hashes what it stored): the full read
        # timeout, not the rate window.
        self._upload_timeout = aiohttp.ClientTimeout(
            total=limits.deadline, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._sleep = sleep
        self._rng = rng
        self.clock = clock
        self.retries = RetryCounts()  # by upstream ("resource_api", "cdn") and cause

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            # The connections' sockets close on the loop's next turn (aiohttp, "Graceful
            # Shutdown"): give it that turn, so none outlives a loop that ends right after.
            await asyncio.sleep(0)
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

    async def exchange(
        self, call: Call, read: Reader[T], *, policy: RetryPolicy | None = None
    ) -> T:
        """Send ``call`` and ``read`` its answer, retrying both as one unit."""
        return await self.retrying(lambda: self.attempt(call, read), call.upstream, policy)

    async def retrying(
        self,
        attempt: Callable[[], Awaitable[T]],
        upstream: str,
        policy: RetryPolicy | None = None,
        *,
        on_retry: OnRetry | None = None,
    ) -> T:
        """``attempt`` until it succeeds, by ``policy`` (else the client's), with the client's
        sleep, jitter and clock; each retry counted under ``upstream`` and logged, unless the
        caller counts them itself (``on_retry``)."""

        def log_retry(number: int, delay: float, exc: BaseException) -> None:
            self.retries.record(RETRY_OPERATIONS.get(upstream, "other"), exc)
            logger.warning(
                "{} attempt {} failed: {}; retrying in {:.1f} s", upstream, number, exc, delay
            )

        return await retry_call(
            attempt,
            policy or self.policy,
            on_retry=on_retry or log_retry,
            rng=self._rng,
            sleep=self._sleep,
            clock=self.clock,
        )

    def _timeout_for(self, call: Call) -> aiohttp.ClientTimeout:
        if not call.streaming:
            return self._small_timeout
        return self._big_timeout if call.method == "GET" else self._upload_timeout

    async def attempt(self, call: Call, read: Reader[T]) -> T:
        """One attempt: send, log in again once on 401, check the status, read the answer."""
        relogged = False
        while True:
            headers = dict(call.headers)
            token = await self._token() if call.authed else None
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
            leave_open = False
            try:
                if response.status == 401 and token is not None and not relogged:
                    relogged = True
                    self._drop_token(token)  # unless a concurrent request renewed it already
                    continue
                await _raise_for_status(call, response, relogged=relogged)
                result = await read(call, response)
                leave_open = result is response
                return result
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise translate_error(exc, call) from exc
            finally:
                if not leave_open:
                    response.release()


# -- reading answers ---------------------------------------------------------------------------


async def keep_open(call: Call, response: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    """The answer itself, left open for its body to be read (``body_chunks``)."""
    return response


async def read_nothing(call: Call, response: aiohttp.ClientResponse) -> None:
    await read_limited(call, response, MAX_JSON_BYTES)  # drained, so the connection is reused


async def read_limited(call: Call, response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise UpstreamError(f"the {call.upstream} sent more than the {limit} bytes expected")
    data = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        data += chunk
        if len(data) > limit:
            raise UpstreamError(f"the {call.upstream} sent more than the {limit} bytes expected")
    return bytes(data)


async def read_json(call: Call, response: aiohttp.ClientResponse) -> Any:
    raw = await read_limited(call, response, MAX_JSON_BYTES)
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise UpstreamError(
            f"the {call.upstream} sent an answer that is not JSON within bounds ({call.what})"
        ) from exc


async def body_chunks(call: Call, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """A streamed answer's body. A break mid-body that waiting may fix raises
    ``BodyInterrupted``, so that the caller resumes from what it has."""
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


# -- statuses and foreign errors ---------------------------------------------------------------


async def _raise_for_status(
    call: Call, response: aiohttp.ClientResponse, *, relogged: bool
) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    if not call.login:  # a login's answer may echo the password: never logged
        await _log_excerpt(call, response)
    error = status_error(call, status, response.headers.get("Retry-After"), relogged)
    error.upstream_status = status
    raise error


# Statuses with an error of their own: the class and the sentence (then the operation).
_STATUS_ERRORS: dict[int, tuple[type[LoaderError], str]] = {
    403: (UpstreamForbidden, "{where} does not allow this account access"),
    409: (ConflictError, "{where} reports a conflicting upload in progress"),
    413: (PayloadTooLarge, "{where} refused the upload as too large"),
    416: (RangeNotSatisfiable, "{where} cannot resume: the part is shorter"),
    504: (UpstreamTimeout, "{where} timed out upstream (HTTP 504)"),
}


def status_error(call: Call, status: int, retry_after: str | None, relogged: bool) -> LoaderError:
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
    if status == 404:
        return UpstreamNotFound(f"{where} has no {call.what}")
    if status in _STATUS_ERRORS:
        error, sentence = _STATUS_ERRORS[status]
        return error(sentence.format(where=where) + suffix)
    if status == 429 or status >= 500:
        return UpstreamThrottled(
            f"{where} is unavailable (HTTP {status}){suffix}", parse_retry_after(retry_after)
        )
    return UpstreamError(f"{where} answered HTTP {status}{suffix}")


async def _log_excerpt(call: Call, response: aiohttp.ClientResponse) -> None:
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


def translate_error(exc: BaseException, call: Call) -> LoaderError:
    """The one place where aiohttp and OS errors become the agent's errors."""
    if isinstance(exc, LoaderError):
        return exc
    if isinstance(exc.__cause__, LoaderError):
        return exc.__cause__  # ours, raised inside aiohttp (a request body's TransferGuard)
    if isinstance(exc, asyncio.TimeoutError) and call.guard is not None:
        verdict = call.guard.past_deadline()
        if verdict is not None:
            return verdict
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
