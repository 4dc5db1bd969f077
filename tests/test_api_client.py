"""ResourceApiClient against the real dev-api over loopback (faults injected through /_dev/)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from loguru import logger
from yarl import URL

from agent.api_client import ResourceApiClient
from agent.errors import (
    BadCredentials,
    BodyInterrupted,
    ConfigError,
    LoaderError,
    NotAuthenticated,
    RangeNotSatisfiable,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from agent.retry import RetryPolicy
from agent.transport import CDN, RESOURCE_API, Call, Token, parse_retry_after, translate_error
from tests.fixtures.devapi import DevApi

ATTEMPTS = 5
FAST = RetryPolicy(base_delay=0.0, max_delay=0.0, max_attempts=ATTEMPTS, max_total=60.0)


class Sleeps:
    """Records the waits the client asks for instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def client(shared_dev_api: DevApi, sleeps: Sleeps) -> AsyncIterator[ResourceApiClient]:
    async with ResourceApiClient(shared_dev_api.url, policy=FAST, sleep=sleeps) as api:
        api.set_credentials(shared_dev_api.email, shared_dev_api.password)
        yield api


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    yield lines
    logger.remove(sink)


# -- login ---------------------------------------------------------------------------------------


async def test_login_with_good_credentials_authenticates(shared_dev_api: DevApi) -> None:
    async with ResourceApiClient(shared_dev_api.url, policy=FAST) as api:
        assert not api.authenticated and not api.has_credentials
        await api.login(shared_dev_api.email, shared_dev_api.password)
        assert api.authenticated and api.has_credentials


async def test_bad_credentials_give_bad_credentials_and_are_not_kept(
    shared_dev_api: DevApi,
) -> None:
    async with ResourceApiClient(shared_dev_api.url, policy=FAST) as api:
        with pytest.raises(BadCredentials, match="Resource API"):
            await api.login(shared_dev_api.email, "wrong-password")
        assert not api.has_credentials and not api.authenticated
    assert shared_dev_api.count("POST", "/login") == 1  # not retried


async def test_requests_without_credentials_raise_not_authenticated(
    shared_dev_api: DevApi,
) -> None:
    async with ResourceApiClient(shared_dev_api.url, policy=FAST) as api:
        with pytest.raises(NotAuthenticated):
            await api.login()
        with pytest.raises(NotAuthenticated):
            await api.get_small_part("f", "n")
    assert shared_dev_api.count("POST", "/login") == 0


async def test_first_request_logs_in_with_stored_credentials(
    client: ResourceApiClient, shared_dev_api: DevApi
) -> None:
    assert await client.get_key_fragment() == shared_dev_api.key_fragment
    assert client.authenticated
    assert shared_dev_api.count("POST", "/login") == 1


async def test_expired_token_is_renewed_transparently(
    client: ResourceApiClient, shared_dev_api: DevApi
) -> None:
    await client.get_key_fragment()
    shared_dev_api.faults(expire_tokens=True)
    assert await client.get_key_fragment() == shared_dev_api.key_fragment
    assert shared_dev_api.count("POST", "/login") == 2
    assert [e["status"] for e in shared_dev_api.log("/binary-split/")] == [200, 401, 200]


async def test_token_near_its_expiry_is_renewed_before_use(shared_dev_api: DevApi) -> None:
    now = [0.0]
    async with ResourceApiClient(shared_dev_api.url, policy=FAST, clock=lambda: now[0]) as api:
        await api.login(shared_dev_api.email, shared_dev_api.password)
        now[0] = 3600.0 - 1  # dev-api tokens live 3600 s; renewed up to 30 s early
        assert not api.authenticated
        await api.get_key_fragment()
        assert api.authenticated
    assert shared_dev_api.count("POST", "/login") == 2
    assert [e["status"] for e in shared_dev_api.log("/binary-split/")] == [200]


async def test_a_changed_password_stops_with_bad_credentials_after_one_relogin(
    dev_api: DevApi,
) -> None:
    async with ResourceApiClient(dev_api.url, policy=FAST) as api:
        await api.login(dev_api.email, dev_api.password)
        dev_api.password = "changed-" + dev_api.password
        dev_api.restart()  # forgets tokens, knows only the new password
        with pytest.raises(BadCredentials):
            await api.get_key_fragment()
    assert dev_api.count("POST", "/login") == 1
    assert dev_api.count("GET", "/binary-split/") == 1


async def test_garbage_login_answer_is_an_upstream_error_not_retried(
    shared_dev_api: DevApi,
) -> None:
    shared_dev_api.faults(garbage=True, path="/login")
    async with ResourceApiClient(shared_dev_api.url, policy=FAST) as api:
        with pytest.raises(UpstreamError, match="Resource API") as caught:
            await api.login(shared_dev_api.email, shared_dev_api.password)
    assert type(caught.value) is UpstreamError
    assert shared_dev_api.count("POST", "/login") == 1


# -- retries -------------------------------------------------------------------------------------


async def test_503_three_times_then_success_is_retried(
    client: ResourceApiClient, shared_dev_api: DevApi, sleeps: Sleeps
) -> None:
    await client.login()
    shared_dev_api.faults(status=503, count=3, path="/binary-split/")
    assert await client.get_key_fragment() == shared_dev_api.key_fragment
    assert shared_dev_api.count("GET", "/binary-split/") == 4
    assert len(sleeps.calls) == 3


async def test_persistent_503_gives_up_with_upstream_unavailable(
    client: ResourceApiClient, shared_dev_api: DevApi
) -> None:
    await client.login()
    shared_dev_api.faults(status=503, count=None, path="/binary-split/")
    with pytest.raises(UpstreamUnavailable, match=r"Resource API is unavailable \(HTTP 503\)"):
        await client.get_key_fragment()
    assert shared_dev_api.count("GET", "/binary-split/") == ATTEMPTS


async def test_429_retry_after_is_honoured(
    client: ResourceApiClient, shared_dev_api: DevApi, sleeps: Sleeps
) -> None:
    await client.login()
    shared_dev_api.faults(status=429, retry_after=7, path="/binary-split/")
    await client.get_key_fragment()
    assert sleeps.calls == [7.0]


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, UpstreamNotFound), (403, UpstreamForbidden), (400, UpstreamError)],
)
async def test_4xx_is_not_retried(
    client: ResourceApiClient,
    shared_dev_api: DevApi,
    resource_folder: str,
    status: int,
    error: type[LoaderError],
) -> None:
    await client.login()
    shared_dev_api.faults(status=status, path="/resources/")
    with pytest.raises(error, match="Resource API"):
        await client.get_small_part(resource_folder, "model")
    assert shared_dev_api.count("GET", "/resources/") == 1


async def test_missing_small_part_is_not_found_once(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str
) -> None:
    with pytest.raises(UpstreamNotFound, match=f"small part {resource_folder}/absent"):
        await client.get_small_part(resource_folder, "absent")
    assert shared_dev_api.count("GET", "/resources/") == 1


async def test_504_from_upstream_becomes_upstream_timeout(
    client: ResourceApiClient, shared_dev_api: DevApi
) -> None:
    await client.login()
    shared_dev_api.faults(status=504, count=None, path="/binary-split/")
    with pytest.raises(UpstreamTimeout):
        await client.get_key_fragment()


async def test_slow_answer_times_out_per_attempt_then_succeeds(shared_dev_api: DevApi) -> None:
    shared_dev_api.faults(delay=5.0, count=1, path="/binary-split/")
    async with ResourceApiClient(shared_dev_api.url, policy=FAST, request_timeout=0.5) as api:
        await api.login(shared_dev_api.email, shared_dev_api.password)
        assert await api.get_key_fragment() == shared_dev_api.key_fragment
    assert shared_dev_api.count("GET", "/binary-split/") == 2


async def test_slow_answers_end_in_upstream_timeout(shared_dev_api: DevApi) -> None:
    shared_dev_api.faults(delay=5.0, count=2, path="/binary-split/")
    policy = RetryPolicy(base_delay=0, max_delay=0, max_attempts=2)
    async with ResourceApiClient(shared_dev_api.url, policy=policy, request_timeout=0.3) as api:
        await api.login(shared_dev_api.email, shared_dev_api.password)
        with pytest.raises(UpstreamTimeout, match="Resource API did not answer in time"):
            await api.get_key_fragment()


async def test_body_dropped_mid_way_is_retried(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str
) -> None:
    data = bytes(range(256)) * 2000
    await client.put_small_part(resource_folder, "model", data)
    shared_dev_api.faults(drop_mid_body=True, path="/resources/")
    assert await client.get_small_part(resource_folder, "model") == data
    assert shared_dev_api.count("GET", "/resources/") == 2


async def test_unreachable_api_names_it(sleeps: Sleeps, unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with ResourceApiClient(url, policy=FAST, sleep=sleeps) as api:
        api.set_credentials("a@example.test", "pw")
        with pytest.raises(
            UpstreamUnavailable,
            match=f"cannot reach the Resource API at 127.0.0.1:{unused_tcp_port}",
        ):
            await api.get_small_part("f", "n")
    assert len(sleeps.calls) == ATTEMPTS - 1


async def test_api_down_then_up_is_waited_for(dev_api: DevApi) -> None:
    dev_api.stop()
    restarted: list[float] = []

    async def sleep_then_restart(seconds: float) -> None:
        restarted.append(seconds)
        if len(restarted) == 2:
            await asyncio.to_thread(dev_api.start)  # comes back on the same port

    async with ResourceApiClient(dev_api.url, policy=FAST, sleep=sleep_then_restart) as api:
        api.set_credentials(dev_api.email, dev_api.password)
        assert await api.get_key_fragment() == dev_api.key_fragment
    assert len(restarted) == 2


# -- parts -----------------------------------------------------------------------------------------


async def test_small_part_round_trip(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str
) -> None:
    stored = await client.put_small_part(resource_folder, "model", b"small part")
    assert stored.size == 10 and stored.sha256 == hashlib.sha256(b"small part").hexdigest()
    assert await client.get_small_part(resource_folder, "model") == b"small part"


async def test_big_part_from_a_file_is_sent_again_on_a_retry(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str, tmp_path: Path
) -> None:
    source = tmp_path / "big"
    source.write_bytes(b"file body" * 1000)
    await client.login()
    shared_dev_api.faults(status=503, path="/cdn/", method="PUT", count=2)
    stored = await client.put_big_part(resource_folder, "big", source, source.stat().st_size)
    assert stored.size == source.stat().st_size
    assert shared_dev_api.count("PUT", "/cdn/") == 3
    assert big_bytes(shared_dev_api, resource_folder) == source.read_bytes()


def big_bytes(api: DevApi, folder: str) -> bytes:
    return (api.data_dir / "cdn" / folder / "big").read_bytes()


async def test_big_part_from_a_file_and_ranges(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 5000
    source = tmp_path / "big"
    source.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    stored = await client.put_big_part(resource_folder, "big", source, len(data), sha256=digest)
    assert stored.sha256 == digest
    assert b"".join([c async for c in client.iter_big_part(resource_folder, "big")]) == data
    tail = b"".join([c async for c in client.iter_big_part(resource_folder, "big", offset=1000)])
    assert tail == data[1000:]
    assert shared_dev_api.log("/cdn/")[-1]["range"] == "bytes=1000-"


async def test_big_part_download_carries_no_token(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str
) -> None:
    await client.put_big_part(resource_folder, "big", _chunks([b"abc"]), 3)
    assert b"".join([c async for c in client.iter_big_part(resource_folder, "big")]) == b"abc"
    sent = [(e["method"], e["authorization"]) for e in shared_dev_api.log("/cdn/")]
    assert sent == [("PUT", True), ("GET", False)]


async def test_big_part_from_an_async_iterable_gets_one_attempt(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str
) -> None:
    await client.login()
    shared_dev_api.faults(status=503, path="/cdn/")
    with pytest.raises(UpstreamUnavailable, match="CDN"):
        await client.put_big_part(resource_folder, "big", _chunks([b"a", b"b"]), 2)
    assert shared_dev_api.count("PUT", "/cdn/") == 1
    assert await client.put_big_part(resource_folder, "big", _chunks([b"a", b"b"]), 2)


async def test_missing_big_part_is_not_found(
    client: ResourceApiClient, resource_folder: str
) -> None:
    with pytest.raises(UpstreamNotFound, match="CDN has no big part"):
        async for _ in client.iter_big_part(resource_folder, "absent"):
            pass


async def test_big_part_break_mid_body_surfaces_as_unavailable(
    client: ResourceApiClient, shared_dev_api: DevApi, resource_folder: str
) -> None:
    data = b"z" * 2_000_000
    await client.put_big_part(resource_folder, "big", _chunks([data]), len(data))
    shared_dev_api.faults(drop_mid_body=True, path="/cdn/")
    received = bytearray()
    with pytest.raises(BodyInterrupted, match="CDN cut the answer short"):
        async for chunk in client.iter_big_part(resource_folder, "big"):
            received += chunk
    assert len(received) < len(data)


async def test_range_past_the_end_is_range_not_satisfiable(
    client: ResourceApiClient, resource_folder: str
) -> None:
    await client.put_big_part(resource_folder, "big", _chunks([b"abc"]), 3)
    with pytest.raises(RangeNotSatisfiable):
        async for _ in client.iter_big_part(resource_folder, "big", offset=3):
            pass


# -- secrets and error translation ---------------------------------------------------------------


def sent_tokens(tokens: list[str]) -> aiohttp.TraceConfig:
    """A trace that records the bearer token of every request a session sends."""

    async def record(
        session: aiohttp.ClientSession,
        context: object,
        params: aiohttp.TraceRequestHeadersSentParams,
    ) -> None:
        scheme, _, token = params.headers.get("Authorization", "").partition(" ")
        if scheme == "Bearer":
            tokens.append(token)

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(record)
    return trace


async def test_token_and_password_never_reach_logs_or_errors(
    shared_dev_api: DevApi, sleeps: Sleeps, log_lines: list[str]
) -> None:
    tokens: list[str] = []
    async with (
        aiohttp.ClientSession(trace_configs=[sent_tokens(tokens)]) as session,
        ResourceApiClient(shared_dev_api.url, policy=FAST, session=session, sleep=sleeps) as api,
    ):
        api.set_credentials(shared_dev_api.email, shared_dev_api.password)
        shared_dev_api.faults(status=503, count=None, path="/binary-split/")
        with pytest.raises(UpstreamUnavailable) as caught:
            await api.get_key_fragment()
    assert tokens, "the requests should have carried the token"
    assert log_lines, "the retries should have been logged"
    text = "\n".join(log_lines) + str(caught.value) + repr(caught.value)
    assert tokens[0] not in text
    assert shared_dev_api.password not in text


def test_a_token_is_never_in_its_repr() -> None:
    token = Token("a-bearer-token", expires_at=100.0)
    assert "a-bearer-token" not in repr(token) and "a-bearer-token" not in str(token)


def test_bad_base_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        ResourceApiClient("ftp://example.test")
    with pytest.raises(ConfigError):
        ResourceApiClient("not a url")


class _FakeConnectionKey:
    host = "api.example.test"
    port = 443
    ssl = True


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(), UpstreamTimeout),
        (aiohttp.ServerTimeoutError(), UpstreamTimeout),
        (aiohttp.ClientPayloadError("cut"), UpstreamUnavailable),
        (aiohttp.ServerDisconnectedError(), UpstreamUnavailable),
        (aiohttp.ClientOSError(104, "reset"), UpstreamUnavailable),
        (ConnectionResetError(), UpstreamUnavailable),
        (
            aiohttp.ClientConnectorError(_FakeConnectionKey(), OSError(111, "refused")),  # type: ignore[arg-type]
            UpstreamUnavailable,
        ),
        (aiohttp.InvalidURL("x"), ConfigError),
        (aiohttp.ClientError("odd"), UpstreamError),
    ],
)
def test_foreign_errors_are_translated_and_name_the_upstream(
    exc: BaseException, expected: type[LoaderError]
) -> None:
    call = Call(CDN, "big part f/n", "GET", URL("http://cdn.example.test/f/n"))
    translated = translate_error(exc, call)
    assert type(translated) is expected
    if expected is not ConfigError:
        assert CDN in str(translated)
    assert RESOURCE_API not in str(translated)


async def _chunks(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(
    header: str | None, seconds: float | None
) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(header, now) == seconds
