"""The agent's client of the Resource API and the CDN: its endpoints (contract:
docs/resource-api.md).

One client per agent. It logs in with credentials it keeps in memory only and holds the token;
each endpoint builds its ``Call`` and reads the answer against the contract before using any of
it (the login answer field by field, receipts typed, ``Content-Range`` by an ASCII pattern);
anything else is ``UpstreamError`` (502). Sending, re-logging in once when a token is refused,
statuses, foreign errors, bounded reads and retries are ``agent.transport``'s.

A big part's download (``iter_big_part``) is one attempt: ``agent.download`` retries, resumes
and verifies it. Uploads of big parts keep a minimum throughput too (``TransferGuard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from agent import keys
from agent.errors import (
    ConfigError,
    LoaderError,
    NotAuthenticated,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from agent.logs import register_secret
from agent.retry import OnRetry, RetryCounts, RetryPolicy, Sleep
from agent.settings import is_loopback
from agent.transport import (
    CDN,
    CHUNK,
    RESOURCE_API,
    Call,
    Token,
    TransferGuard,
    TransferLimits,
    Transport,
    body_chunks,
    keep_open,
    read_json,
    read_limited,
    read_nothing,
)

T = TypeVar("T")

MAX_SMALL_PART_BYTES = 4 * 1024 * 1024  # the API stores at most 1 MiB; anything far above is junk
TOKEN_EARLY_RENEWAL = 30.0  # seconds before expiry a token is treated as expired (at most)
MAX_TOKEN_LENGTH = 4096
MAX_TOKEN_LIFETIME = 366 * 24 * 3600.0
MAX_URL_LENGTH = 2048
# RFC 6750 b64token: what may follow "Bearer " in a header, and nothing else (no CR/LF).
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


@dataclass(frozen=True)
class StoredPart:
    """What the server says it stored."""

    size: int
    sha256: str | None


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
        self._transport = Transport(
            token=self._valid_token,
            drop_token=self._drop_token,
            policy=policy or RetryPolicy(),
            session=session,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            limits=limits or TransferLimits(),
            sleep=sleep,
            rng=rng or random.Random(),
            clock=clock,
        )
        self._clock = clock
        self._credentials: tuple[str, str] | None = None
        self._token: Token | None = None
        self._cdn_url: URL | None = None
        self._login_lock = asyncio.Lock()

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
        await self._transport.close()

    # -- credentials and login ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return str(self._base)

    @property
    def policy(self) -> RetryPolicy:
        return self._transport.policy

    @property
    def limits(self) -> TransferLimits:
        return self._transport.limits

    @property
    def retries(self) -> RetryCounts:
        """Retries by upstream ("resource_api", "cdn") and cause, for ``/metrics``."""
        return self._transport.retries

    def guard(self, what: str) -> TransferGuard:
        """A guard for one transfer of a big part with the CDN, on the client's clock."""
        return TransferGuard(self.limits, CDN, what, clock=self._transport.clock)

    async def retrying_cdn(
        self, attempt: Callable[[], Awaitable[T]], on_retry: OnRetry | None = None
    ) -> T:
        """``attempt`` until it succeeds, by the client's policy, sleep, jitter and clock (the
        big-part download's one loop; ``on_retry`` counts its retries)."""
        return await self._transport.retrying(attempt, CDN, on_retry=on_retry)

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
        token = await self._transport.retrying(
            lambda: self._login_once(credentials), RESOURCE_API, policy
        )
        register_secret(credentials[1])  # accepted: from now on scrubbed from every line
        self._credentials = credentials
        self._token = token

    def _stored_credentials(self) -> tuple[str, str]:
        if self._credentials is None:
            raise NotAuthenticated("no credentials for the Resource API: log in first")
        return self._credentials

    async def _login_once(self, credentials: tuple[str, str]) -> Token:
        email, password = credentials
        call = Call(
            RESOURCE_API,
            "login",
            "POST",
            self._base / "login",
            body=lambda: json.dumps({"email": email, "password": password}).encode(),
            headers={"Content-Type": "application/json"},
            login=True,
        )
        answer = await self._transport.attempt(call, read_json)
        return self._accept_login(answer)

    def _accept_login(self, answer: Any) -> Token:
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
        return Token(token, self._clock() + lifetime - early)

    async def _valid_token(self) -> Token:
        """The current token, logging in once (no retry: the caller's attempt is retried)."""
        async with self._login_lock:
            if self._token is None or self._clock() >= self._token.expires_at:
                self._token = await self._login_once(self._stored_credentials())
            return self._token

    def _drop_token(self, token: Token) -> None:
        """Forget a token the upstream refused, unless a concurrent request renewed it."""
        if self._token is token:
            self._token = None

    async def _cdn_base(self) -> URL:
        if self._cdn_url is None:
            await self._transport.retrying(self._valid_token, RESOURCE_API)
        assert self._cdn_url is not None
        return self._cdn_url

    # -- the Resource API --------------------------------------------------------------------

    async def get_key_fragment(self, *, policy: RetryPolicy | None = None) -> bytes:
        """The images key fragment from ``/binary-split/key-fragment``, retrying transient
        failures (by ``policy``, else the client's)."""
        call = Call(
            RESOURCE_API,
            "images key fragment",
            "GET",
            self._base / "binary-split" / "key-fragment",
            authed=True,
        )
        raw = await self._transport.exchange(
            call, lambda c, r: read_limited(c, r, keys.MAX_FRAGMENT_FILE_SIZE), policy=policy
        )
        try:
            text = raw.decode("ascii")
            register_secret(text.strip())
            return keys.decode_fragment(text)
        except (UnicodeDecodeError, ConfigError) as exc:
            raise UpstreamError("the Resource API sent a key fragment that is not valid") from exc

    async def get_small_part(self, folder: str, name: str) -> bytes:
        call = Call(
            RESOURCE_API,
            f"small part {folder}/{name}",
            "GET",
            self._base / "resources" / folder / name,
            authed=True,
        )
        return await self._transport.exchange(
            call, lambda c, r: read_limited(c, r, MAX_SMALL_PART_BYTES)
        )

    async def put_small_part(self, folder: str, name: str, data: bytes) -> StoredPart:
        call = Call(
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
                return await self._transport.attempt(call, _read_stored_part)
            except LoaderError as exc:
                status = exc.upstream_status
                ambiguous = ambiguous or status is None or status == 429 or status >= 500
                raise

        try:
            stored = await self._transport.retrying(attempt, call.upstream)
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
        """The big part's bytes from ``offset`` on (HTTP Range), in one attempt: whoever
        downloads retries (``agent.download``). A break mid-body raises ``BodyInterrupted``,
        so that the caller resumes from what it has."""
        if offset < 0:
            raise ValueError("offset cannot be negative")
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        call = Call(
            CDN,
            f"big part {folder}/{name}",
            "GET",
            await self._cdn_base() / folder / name,
            headers=headers,
            streaming=True,
        )
        response = await self._transport.attempt(call, keep_open)
        try:
            skip = _bytes_to_skip(call, response, offset)
            async for chunk in body_chunks(call, response):
                if skip:
                    dropped = min(skip, len(chunk))
                    skip -= dropped
                    chunk = chunk[dropped:]
                if chunk:
                    yield chunk
        finally:
            response.close()

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
        guard = self.guard(f"upload of big part {folder}/{name}")

        def make_body() -> AsyncIterable[bytes]:
            if isinstance(body, Path):
                return guard.watch(_file_chunks(body))
            if sent:
                raise UpstreamUnavailable("the CDN upload failed and its body cannot be sent again")
            sent.append(True)
            return guard.watch(body)

        call = Call(
            CDN,
            f"big part {folder}/{name}",
            "PUT",
            url,
            authed=True,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=make_body,
            streaming=True,
            guard=guard,
        )
        once = None if isinstance(body, Path) else replace(self.policy, max_attempts=1)
        stored = await self._transport.exchange(call, _read_stored_part, policy=once)
        _check_stored(call, stored, size, sha256)
        return stored

    async def delete_big_part(self, folder: str, name: str) -> None:
        """Remove a big part from the CDN (an upload's orphan); one already gone is fine."""
        call = Call(
            CDN,
            f"big part {folder}/{name}",
            "DELETE",
            await self._cdn_base() / folder / name,
            authed=True,
        )
        with contextlib.suppress(UpstreamNotFound):
            await self._transport.exchange(call, read_nothing)


# -- reading answers against the contract -----------------------------------------------------


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


async def _read_stored_part(call: Call, response: aiohttp.ClientResponse) -> StoredPart:
    """The server's receipt: ``size`` and ``sha256`` are optional, but checked when there."""
    answer = await read_json(call, response)
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


def _check_stored(call: Call, stored: StoredPart, size: int, sha256: str | None) -> None:
    """The server's receipt, when it gives one, must match what was sent."""
    if stored.size not in (-1, size) or (sha256 and stored.sha256 and stored.sha256 != sha256):
        raise UpstreamError(
            f"the {call.upstream} stored something other than what was sent ({call.what})"
        )


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            yield chunk


def _bytes_to_skip(call: Call, response: aiohttp.ClientResponse, offset: int) -> int:
    """How much of the body precedes ``offset``: all of it if the server ignored Range."""
    if response.status == 200:
        return offset
    match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if response.status != 206 or match is None or int(match[1]) != offset:
        raise UpstreamError(f"the {call.upstream} answered a ranged request wrongly ({call.what})")
    return 0
