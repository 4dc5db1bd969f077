"""dev-api, the reference Resource API + CDN, over real HTTP on loopback; and its commands:
``azaion-loader-dev dev-api``, and ``azaion-loader dev-api`` (the same where the development
package is installed, one clear line where it is not, as on a device)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from agent import keys
from azaion_loader_dev.devapi import RateLimiter
from tests.fixtures.agent import REPO
from tests.fixtures.devapi import DevApi, new_dev_api


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def login(http: aiohttp.ClientSession, api: DevApi) -> dict[str, Any]:
    async with http.post(
        f"{api.url}/login", json={"email": api.email, "password": api.password}
    ) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


async def bearer(http: aiohttp.ClientSession, api: DevApi) -> dict[str, str]:
    return {"Authorization": f"Bearer {(await login(http, api))['token']}"}


async def test_login_gives_a_token_with_expiry_and_names_the_cdn(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    answer = await login(http, shared_dev_api)
    assert answer["token"] and answer["token_type"] == "Bearer"
    assert answer["expires_in"] > 0
    assert answer["cdn_url"] == f"{shared_dev_api.url}/cdn"


@pytest.mark.parametrize(
    "body",
    [{"email": "nobody@example.test", "password": "x"}, {"email": "", "password": ""}],
)
async def test_wrong_credentials_are_refused_with_401(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, body: dict[str, str]
) -> None:
    async with http.post(f"{shared_dev_api.url}/login", json=body) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "bad_credentials"


async def test_wrong_password_of_a_known_user_is_refused(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    body = {"email": shared_dev_api.email, "password": shared_dev_api.password + "x"}
    async with http.post(f"{shared_dev_api.url}/login", json=body) as response:
        assert response.status == 401


async def test_malformed_login_is_400(http: aiohttp.ClientSession, shared_dev_api: DevApi) -> None:
    async with http.post(f"{shared_dev_api.url}/login", data=b"{not json") as response:
        assert response.status == 400


async def test_every_answer_says_not_for_production(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    for path in ("/health", "/resources/a/b", "/no/such/route"):
        async with http.get(shared_dev_api.url + path) as response:
            assert "NOT FOR PRODUCTION" in response.headers["Server"]
            assert response.headers["X-Not-For-Production"] == "1"
    assert "NOT FOR PRODUCTION" in shared_dev_api.log_path.read_text()


async def test_small_part_round_trip_needs_a_token(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    url = f"{shared_dev_api.url}/resources/{resource_folder}/model.bin"
    async with http.put(url, data=b"small") as response:
        assert response.status == 401
    auth = await bearer(http, shared_dev_api)
    async with http.put(url, data=b"small", headers=auth) as response:
        assert response.status == 201
        receipt = await response.json()
    assert receipt == {"status": "ok", "size": 5, "sha256": hashlib.sha256(b"small").hexdigest()}
    async with http.get(url) as response:
        assert response.status == 401
    async with http.get(url, headers=auth) as response:
        assert response.status == 200
        assert await response.read() == b"small"
    stored = shared_dev_api.data_dir / "small" / resource_folder / "model.bin"
    assert stored.read_bytes() == b"small"


async def test_missing_small_part_is_404(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    auth = await bearer(http, shared_dev_api)
    url = f"{shared_dev_api.url}/resources/{resource_folder}/absent"
    async with http.get(url, headers=auth) as response:
        assert response.status == 404


async def test_key_fragment_is_served_in_text_form_to_a_logged_in_client(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    url = f"{shared_dev_api.url}/binary-split/key-fragment"
    async with http.get(url) as response:
        assert response.status == 401
    async with http.get(url, headers=await bearer(http, shared_dev_api)) as response:
        assert response.status == 200
        assert keys.decode_fragment(await response.text()) == shared_dev_api.key_fragment


async def test_cdn_upload_needs_a_token_and_download_is_public_with_ranges(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    url = f"{shared_dev_api.url}/cdn/{resource_folder}/big"
    body = bytes(range(256)) * 1000
    async with http.put(url, data=body) as response:
        assert response.status == 401
    async with http.put(url, data=body, headers=await bearer(http, shared_dev_api)) as response:
        assert response.status == 201
    async with http.get(url) as response:
        assert response.status == 200
        assert await response.read() == body
    async with http.get(url, headers={"Range": "bytes=1000-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-{len(body) - 1}/{len(body)}"
        assert await response.read() == body[1000:]
    async with http.get(url, headers={"Range": "bytes=10-19"}) as response:
        assert response.status == 206
        assert await response.read() == body[10:20]
    async with http.get(url, headers={"Range": f"bytes={len(body)}-"}) as response:
        assert response.status == 416


@pytest.mark.parametrize(
    "path",
    [
        "/cdn/%2e%2e/escape",
        "/cdn/folder/%2e%2e",
        "/cdn/folder/.hidden",
        "/cdn/folder/a..b",
        "/cdn/folder/sp%20ace",
        "/cdn/fol%5cder/name",
        "/resources/folder/%00",
        "/resources/%2e%2e/x",
    ],
)
async def test_unsafe_names_are_refused_with_400_and_nothing_is_written(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, path: str
) -> None:
    before = sorted(shared_dev_api.data_dir.rglob("*"))
    auth = await bearer(http, shared_dev_api)
    async with http.put(
        URL(shared_dev_api.url + path, encoded=True), data=b"x", headers=auth
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_name"
    assert sorted(shared_dev_api.data_dir.rglob("*")) == before


async def test_size_limits_give_413(
    http: aiohttp.ClientSession, start_dev_api: Callable[..., DevApi]
) -> None:
    api = start_dev_api("--max-small-bytes", "10", "--max-big-bytes", "20")
    auth = await bearer(http, api)
    async with http.put(f"{api.url}/resources/f/n", data=b"x" * 11, headers=auth) as response:
        assert response.status == 413
    async with http.put(f"{api.url}/cdn/f/n", data=b"x" * 21, headers=auth) as response:
        assert response.status == 413
    async with http.put(f"{api.url}/cdn/f/n", data=b"x" * 20, headers=auth) as response:
        assert response.status == 201
    assert not (api.data_dir / "small" / "f" / "n").exists()


async def send_partial_put(
    api: DevApi, path: str, token: str, *, declared: int, sent: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a PUT that announces ``declared`` bytes and sends only ``sent``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    writer.write(head.encode() + sent)
    await writer.drain()
    return reader, writer


async def poll(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_concurrent_upload_of_one_part_is_409_and_an_aborted_one_leaves_nothing(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    token = (await login(http, shared_dev_api))["token"]
    path = f"/cdn/{resource_folder}/big"
    part_dir = shared_dev_api.data_dir / "cdn" / resource_folder
    _, writer = await send_partial_put(shared_dev_api, path, token, declared=1000, sent=b"a" * 10)
    await poll(lambda: part_dir.is_dir() and any(part_dir.iterdir()))  # the temp file exists
    async with http.put(
        shared_dev_api.url + path, data=b"b" * 5, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 409
    writer.close()
    await writer.wait_closed()
    await poll(lambda: not any(part_dir.iterdir()))  # the temp file is gone, nothing in place
    async with http.get(shared_dev_api.url + path) as response:
        assert response.status == 404


async def test_restart_on_the_same_port_keeps_the_data(
    http: aiohttp.ClientSession, dev_api: DevApi
) -> None:
    async with http.put(
        f"{dev_api.url}/cdn/f/n", data=b"kept", headers=await bearer(http, dev_api)
    ) as response:
        assert response.status == 201
    port = dev_api.port
    dev_api.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{dev_api.url}/cdn/f/n"):
            pass
    dev_api.start()
    assert dev_api.port == port
    async with http.get(f"{dev_api.url}/cdn/f/n") as response:
        assert await response.read() == b"kept"


# -- fault injection -----------------------------------------------------------------------------


async def put_big(http: aiohttp.ClientSession, api: DevApi, folder: str, body: bytes) -> str:
    url = f"{api.url}/cdn/{folder}/big"
    async with http.put(url, data=body, headers=await bearer(http, api)) as response:
        assert response.status == 201
    return url


async def test_status_fault_answers_n_times_then_recovers(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    shared_dev_api.faults(status=503, count=2, path="/health", retry_after=3)
    statuses = []
    for _ in range(3):
        async with http.get(f"{shared_dev_api.url}/health") as response:
            statuses.append(response.status)
            if response.status == 503:
                assert response.headers["Retry-After"] == "3"
    assert statuses == [503, 503, 200]
    assert shared_dev_api.count("GET", "/health") == 3


async def test_truncate_fault_sends_a_short_body_that_looks_complete(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    body = b"0123456789" * 1000
    url = await put_big(http, shared_dev_api, resource_folder, body)
    shared_dev_api.faults(truncate=True, path="/cdn/")
    async with http.get(url) as response:
        assert response.status == 200
        assert await response.read() == body[: len(body) // 2]


async def test_drop_fault_breaks_the_connection_mid_body(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    body = b"x" * 1_000_000
    url = await put_big(http, shared_dev_api, resource_folder, body)
    shared_dev_api.faults(drop_mid_body=True, path="/cdn/")
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as response:
            assert response.content_length == len(body)
            await response.read()
    async with http.get(url) as response:  # the next one is fine again
        assert await response.read() == body


async def test_garbage_fault_keeps_the_length_and_changes_the_bytes(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    body = b"\x00" * 100_000
    url = await put_big(http, shared_dev_api, resource_folder, body)
    shared_dev_api.faults(garbage=True, path="/cdn/")
    async with http.get(url) as response:
        received = await response.read()
    assert len(received) == len(body) and received != body


async def test_delay_fault_makes_a_short_timeout_expire(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    shared_dev_api.faults(delay=5.0, path="/health")
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(
            f"{shared_dev_api.url}/health", timeout=aiohttp.ClientTimeout(total=0.3)
        ):
            pass


async def test_expire_tokens_makes_issued_tokens_401_token_expired(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    auth = await bearer(http, shared_dev_api)
    url = f"{shared_dev_api.url}/binary-split/key-fragment"
    async with http.get(url, headers=auth) as response:
        assert response.status == 200
    shared_dev_api.faults(expire_tokens=True)
    async with http.get(url, headers=auth) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "token_expired"
    async with http.get(url, headers=await bearer(http, shared_dev_api)) as response:
        assert response.status == 200


async def test_stats_log_records_ranges_and_statuses(
    http: aiohttp.ClientSession, shared_dev_api: DevApi, resource_folder: str
) -> None:
    url = await put_big(http, shared_dev_api, resource_folder, b"abcdef")
    async with http.get(url, headers={"Range": "bytes=2-"}) as response:
        assert await response.read() == b"cdef"
    entries = shared_dev_api.log(f"/cdn/{resource_folder}/")
    assert [(e["method"], e["range"], e["status"]) for e in entries] == [
        ("PUT", None, 201),
        ("GET", "bytes=2-", 206),
    ]


async def test_unknown_fault_fields_are_refused(shared_dev_api: DevApi) -> None:
    with pytest.raises(Exception, match="400"):
        shared_dev_api.faults(explode=True)


# -- the rate limit (--rate-limit N: N Resource API requests a second) ------------------------


async def burst_of_logins(
    http: aiohttp.ClientSession, api: DevApi, n: int
) -> tuple[list[tuple[int, float | None]], float]:
    """``n`` logins at once: (status, Retry-After) of each, and how long the burst took."""

    async def one() -> tuple[int, float | None]:
        body = {"email": api.email, "password": api.password}
        async with http.post(f"{api.url}/login", json=body) as response:
            await response.read()
            if response.status == 429:
                assert (await response.json())["error"] == "rate_limited"
            retry_after = response.headers.get("Retry-After")
            return response.status, None if retry_after is None else float(retry_after)

    started = time.monotonic()
    answers = await asyncio.gather(*(one() for _ in range(n)))
    return answers, time.monotonic() - started


async def test_rate_limit_refuses_beyond_the_rate_with_a_slot_each(
    http: aiohttp.ClientSession, start_dev_api: Callable[..., DevApi]
) -> None:
    rate = 2
    api = start_dev_api("--rate-limit", str(rate))
    answers, took = await burst_of_logins(http, api, 20)
    admitted = [a for a in answers if a[0] == 200]
    waits = sorted(ra for status, ra in answers if status == 429 and ra is not None)
    assert {status for status, _ in answers} <= {200, 429}
    # Never more than the rate in any second (the burst took ``took`` seconds).
    assert 1 <= len(admitted) <= rate * (math.floor(took) + 1)
    assert len(waits) == len(answers) - len(admitted) >= 20 - rate * (math.floor(took) + 1)
    # Each refusal was promised a slot of its own, 1/rate apart: not one pause for all, which
    # would bring them back together. (The burst's own spread blurs them by at most ``took``.)
    assert all(wait > 0 for wait in waits)
    assert waits[-1] - waits[0] >= (len(waits) - 1) / rate - took
    rates = api.stats()["api_per_second"]
    assert sum(rates["attempted"]) == 20
    assert sum(rates["answered"]) == len(admitted)
    assert max(rates["answered"]) <= rate


async def test_rate_limited_request_that_comes_back_at_its_retry_after_gets_in(
    http: aiohttp.ClientSession, start_dev_api: Callable[..., DevApi]
) -> None:
    api = start_dev_api("--rate-limit", "4")
    answers, _ = await burst_of_logins(http, api, 6)
    refused = [ra for status, ra in answers if status == 429]
    assert refused and all(ra is not None for ra in refused)

    async def come_back(retry_after: float) -> int:
        await asyncio.sleep(retry_after)  # the protocol under test, not a synchronisation
        body = {"email": api.email, "password": api.password}
        async with http.post(f"{api.url}/login", json=body) as response:
            return response.status

    assert await asyncio.gather(*(come_back(ra) for ra in refused if ra)) == [200] * len(refused)


async def test_rate_limit_covers_the_api_not_the_cdn_or_health(
    http: aiohttp.ClientSession, start_dev_api: Callable[..., DevApi], resource_folder: str
) -> None:
    api = start_dev_api("--rate-limit", "1")
    auth = await bearer(http, api)  # the one API request of this second
    url = f"{api.url}/cdn/{resource_folder}/big"
    async with http.put(url, data=b"x" * 100, headers=auth) as response:
        assert response.status == 201

    async def status(path: str) -> int:
        async with http.get(path) as response:
            await response.read()
            return response.status

    paths = [url, f"{api.url}/health"] * 10
    assert await asyncio.gather(*(status(path) for path in paths)) == [200] * 20
    fragment = f"{api.url}/binary-split/key-fragment"
    assert 429 in await asyncio.gather(*(status(fragment) for _ in range(5)))


def test_rate_limiter_admits_at_most_the_rate_in_any_second() -> None:
    now = [0.0]
    limiter = RateLimiter(10, clock=lambda: now[0])
    admitted: list[float] = []
    refused: list[float] = []
    for step in range(3000):  # 100 requests a second for 30 s
        now[0] = step / 100
        wait = limiter.admit()
        (admitted if wait is None else refused).append(now[0] if wait is None else wait)
    assert refused and all(wait > 0 for wait in refused)
    for start in admitted:
        assert sum(start <= t < start + 1.0 for t in admitted) <= 10
    assert len(admitted) >= 10 * 30 - 10  # and it does admit the rate


def test_rate_limit_must_be_positive(tmp_path: Path) -> None:
    result = run_dev_api("--data-dir", str(tmp_path), "--user", "a@b:c", "--rate-limit", "0")
    assert result.returncode == 2
    assert "--rate-limit must be positive" in result.stderr


async def test_fault_with_a_probability_hits_some_requests(
    http: aiohttp.ClientSession, shared_dev_api: DevApi
) -> None:
    shared_dev_api.faults(status=503, path="/health", count=None, probability=0.5)
    statuses = []
    for _ in range(60):
        async with http.get(f"{shared_dev_api.url}/health") as response:
            statuses.append(response.status)
    assert 0 < statuses.count(503) < 60  # by chance all or none: 2 in 2**60
    with pytest.raises(Exception, match="400"):
        shared_dev_api.faults(status=503, probability=0)


DEV_COMMAND = [sys.executable, "-m", "azaion_loader_dev", "dev-api"]
AGENT_COMMAND = [sys.executable, "-m", "agent", "dev-api"]
# ``python -m agent`` on a machine without the development package (a device).
WITHOUT_DEV_PACKAGE = [
    sys.executable,
    "-c",
    "import sys; sys.modules['azaion_loader_dev'] = None; from agent.cli import main; "
    "raise SystemExit(main(sys.argv[1:]))",
    "dev-api",
]


def run_dev_api(*args: str, command: list[str] = DEV_COMMAND) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("command", "prog"),
    [(DEV_COMMAND, "azaion-loader-dev"), (AGENT_COMMAND, "azaion-loader")],
    ids=["azaion-loader-dev", "azaion-loader"],
)
def test_malformed_user_is_a_usage_error(tmp_path: Path, command: list[str], prog: str) -> None:
    result = run_dev_api("--data-dir", str(tmp_path), "--user", "no-colon-here", command=command)
    assert result.returncode == 2
    assert (
        result.stderr == f"{prog}: error: --user must be EMAIL:PASSWORD with both parts non-empty\n"
    )


def test_azaion_loader_dev_api_delegates_to_the_development_package(tmp_path: Path) -> None:
    api = new_dev_api(tmp_path)
    api.stop()
    api.argv = AGENT_COMMAND
    api.start()  # the same flags, the same announcement, on the same port
    try:
        with urllib.request.urlopen(f"{api.url}/health", timeout=10) as response:
            assert response.headers["Server"] == "azaion-dev-api (NOT FOR PRODUCTION)"
    finally:
        api.stop()
    usage = run_dev_api("--help", command=AGENT_COMMAND).stdout
    for flag in ("--host", "--port", "--data-dir", "--user", "--key-fragment", "--token-ttl"):
        assert flag in usage


def test_the_console_script_is_installed() -> None:
    script = shutil.which("azaion-loader-dev", path=Path(sys.executable).parent)
    if script is None:
        pytest.skip("the project is not pip-installed in this interpreter's environment")
    result = run_dev_api("--help", command=[script, "dev-api"])
    assert result.returncode == 0
    assert result.stdout.startswith("usage: azaion-loader-dev dev-api")


@pytest.mark.parametrize(
    "args", [["--port", "0", "--data-dir", "data", "--user", "a@b:c"], ["--help"], []]
)
def test_without_the_development_package_dev_api_says_so_in_one_line(args: list[str]) -> None:
    result = run_dev_api(*args, command=WITHOUT_DEV_PACKAGE)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("azaion-loader: error: dev-api is a development tool")
    assert "not installed on this device" in line and "azaion-loader-dev" in line


def test_port_in_use_is_a_clear_error(tmp_path: Path, shared_dev_api: DevApi) -> None:
    result = run_dev_api(
        "--data-dir", str(tmp_path), "--user", "a@b:c", "--port", str(shared_dev_api.port)
    )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{shared_dev_api.port}" in result.stderr
