"""The agent against a hostile Resource API and CDN (docs/security.md, "Hostile upstream").

A small server of our own (``tests/fixtures/hostile.py``) speaks the contract honestly and then,
per test, answers one endpoint the way an attacker who controls it would: redirects towards a
catcher, error bodies that echo the token and the password, JSON bombs, tokens with CR/LF,
impossible sizes, endless or dripping bodies. The real agent process sits in between; every
answer it gives and every line it logs goes through the suite's secret watch, which knows this
server's password, token and key fragment.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from agent import stream
from agent.resources import SmallPart
from tests.fixtures.agent import AgentProcess, Reply, wait_for
from tests.fixtures.hostile import Catcher, Handler, HostileUpstream, answer

MakeAgent = Callable[..., AgentProcess]
FOLDER = "models"
MARKER = "UPSTREAM-SUPPLIED-TEXT"  # any sign of upstream text in an answer
DATA = os.urandom(300_000)


def logged_in(make_agent: MakeAgent, hostile: HostileUpstream, **env: str) -> AgentProcess:
    """An agent in front of ``hostile``, logged in (quick upstream limits unless ``env``)."""
    settings = {
        "LOADER_UPSTREAM_MIN_RATE": "2000",
        "LOADER_UPSTREAM_RATE_WINDOW": "1",
        "LOADER_UPSTREAM_DEADLINE": "20",
        **env,
    }
    agent = make_agent(RESOURCE_API_URL=hostile.url, **settings)
    login = agent.request("POST", "/login", {"email": hostile.email, "password": hostile.password})
    assert login.status == 200, login.body
    return agent


@pytest.fixture
def agent(make_agent: MakeAgent, hostile: HostileUpstream) -> AgentProcess:
    return logged_in(make_agent, hostile)


def upload(agent: AgentProcess, name: str, data: bytes = DATA) -> Reply:
    boundary = "hostileboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n{FOLDER}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return agent.request(
        "POST",
        f"/upload/{name}",
        body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


def load(agent: AgentProcess, name: str) -> Reply:
    return agent.request("POST", f"/load/{name}", {"folder": FOLDER})


def assert_error(reply: Reply, status: int, *words: str) -> str:
    """A JSON error of ``status`` whose message has ``words`` and nothing of the upstream's."""
    assert reply.status == status, (reply.status, reply.body[:500])
    document = reply.json()
    assert set(document) == {"error", "message"}
    message = document["message"]
    for word in words:
        assert word in message, (word, message)
    assert MARKER not in reply.body.decode(errors="replace")
    return str(message)


def redirect_to(target: str, status: int) -> Handler:
    return answer(status, {"message": MARKER}, Location=target)


def unlock_error(agent: AgentProcess) -> dict[str, object]:
    def failed() -> dict[str, object] | None:
        state = agent.request("GET", "/unlock/status").json()
        return state if state["state"] == "error" else None

    return wait_for(failed, 30, "the unlock to fail")


@pytest.fixture
def archive(agent: AgentProcess, hostile: HostileUpstream) -> Path:
    """An images archive the hostile server's key fragment opens (its content never loads:
    these tests end before the Docker engine is contacted)."""
    path = Path(agent.env["IMAGES_PATH"])
    encryptor = stream.Encryptor([hostile.key_fragment])
    path.write_bytes(encryptor.update(b"not a tar") + encryptor.finalize())
    return path


# -- 1. no request carrying a secret follows a redirect -------------------------------------

REDIRECTS = (301, 302, 303, 307, 308)


@pytest.mark.parametrize("status", REDIRECTS)
def test_login_redirect_is_not_followed(
    make_agent: MakeAgent, hostile: HostileUpstream, catcher: Catcher, status: int
) -> None:
    agent = make_agent(RESOURCE_API_URL=hostile.url)
    # To another origin, and from the API's scheme to plain http on another port.
    hostile.behave("login", redirect_to(f"{catcher.url}/login", status))
    reply = agent.request("POST", "/login", {"email": hostile.email, "password": hostile.password})
    assert_error(reply, 502, "Resource API", "redirect", f"HTTP {status}", "login")
    assert catcher.seen == []
    assert len(hostile.requests("login")) == 1  # refused, not retried


@pytest.mark.parametrize("status", (302, 307, 308))
@pytest.mark.parametrize("route", ("small_get", "cdn_get"))
def test_load_redirects_are_not_followed(
    agent: AgentProcess, hostile: HostileUpstream, catcher: Catcher, route: str, status: int
) -> None:
    assert upload(agent, "r.bin").status == 200
    clear_cache(agent)  # so the load asks the CDN too
    hostile.behave(route, redirect_to(f"{catcher.url}/{route}", status))
    upstream = "Resource API" if route == "small_get" else "CDN"
    assert_error(load(agent, "r.bin"), 502, upstream, "redirect", f"HTTP {status}")
    assert catcher.seen == []


@pytest.mark.parametrize("status", (307, 308))
@pytest.mark.parametrize("route", ("small_put", "cdn_put"))
def test_upload_redirects_are_not_followed(
    agent: AgentProcess, hostile: HostileUpstream, catcher: Catcher, route: str, status: int
) -> None:
    hostile.behave(route, redirect_to(f"{catcher.url}/{route}", status))
    upstream = "Resource API" if route == "small_put" else "CDN"
    assert_error(upload(agent, "u.bin"), 502, upstream, "redirect", f"HTTP {status}")
    assert catcher.seen == []
    # Nothing is left behind: not in the cache, not on the CDN (the orphan was removed).
    assert hostile.big == {}
    assert not [p for p in Path(agent.env["MODEL_CACHE_DIR"]).rglob("*") if p.is_file()]


def test_key_fragment_redirect_is_not_followed(
    agent: AgentProcess, hostile: HostileUpstream, catcher: Catcher, archive: Path
) -> None:
    hostile.behave("key_fragment", redirect_to(f"{catcher.url}/key", 307))
    assert agent.request("POST", "/unlock").status == 202
    state = unlock_error(agent)
    assert "redirect" in str(state["error"]) and "Resource API" in str(state["error"])
    assert MARKER not in json.dumps(state)
    assert catcher.seen == []


# -- 2. upstream text never reaches a local caller ------------------------------------------


def echoing(hostile: HostileUpstream, status: int) -> Handler:
    """An error whose body echoes what a careless or malicious server might."""
    return answer(
        status,
        {
            "error": MARKER,
            "message": f"{MARKER} Bearer {hostile.token} password={hostile.password}",
        },
    )


@pytest.mark.parametrize("status", (400, 403, 409, 418, 500))
def test_error_bodies_of_loads_and_uploads_are_not_quoted(
    agent: AgentProcess, hostile: HostileUpstream, status: int
) -> None:
    assert upload(agent, "e.bin").status == 200
    hostile.behave("small_get", echoing(hostile, status))
    reply = load(agent, "e.bin")
    assert reply.status >= 400
    assert_error(reply, reply.status, "Resource API", f"HTTP {status}" if status >= 500 else "")
    hostile.behave("cdn_put", echoing(hostile, status))
    reply = upload(agent, "e2.bin")
    assert reply.status >= 400
    assert_error(reply, reply.status, "CDN")


def test_login_error_echoing_the_password_is_not_quoted(
    make_agent: MakeAgent, hostile: HostileUpstream
) -> None:
    agent = make_agent(RESOURCE_API_URL=hostile.url)
    hostile.behave("login", echoing(hostile, 401))
    reply = agent.request("POST", "/login", {"email": hostile.email, "password": hostile.password})
    assert_error(reply, 401, "Resource API")
    hostile.behave("login", echoing(hostile, 400))
    reply = agent.request("POST", "/login", {"email": hostile.email, "password": hostile.password})
    assert_error(reply, 502, "Resource API", "HTTP 400")


def test_unlock_status_quotes_nothing_of_the_upstream(
    agent: AgentProcess, hostile: HostileUpstream, archive: Path
) -> None:
    hostile.behave("key_fragment", echoing(hostile, 403))
    assert agent.request("POST", "/unlock").status == 202
    state = unlock_error(agent)
    assert "Resource API" in str(state["error"])
    assert MARKER not in json.dumps(state)
    status = agent.request("GET", "/status")
    assert MARKER not in status.body.decode()


# -- 3. upstream JSON and headers are parsed with bounds --------------------------------------

NESTED = b"[" * 20_000 + b"]" * 20_000
NESTED_OBJECT = b'{"a":' * 5_000 + b"1" + b"}" * 5_000


@pytest.mark.parametrize(
    "body",
    [
        NESTED,
        NESTED_OBJECT,
        b'{"token": "abc\\r\\nX-Injected: 1", "expires_in": 60, "cdn_url": "/cdn"}',
        b'{"token": "abc def", "expires_in": 60, "cdn_url": "/cdn"}',
        b'{"token": "abc", "expires_in": NaN, "cdn_url": "/cdn"}',
        b'{"token": "abc", "expires_in": 1e999, "cdn_url": "/cdn"}',
        b'{"token": "abc", "expires_in": true, "cdn_url": "/cdn"}',
        b'{"token": "abc", "expires_in": 60, "cdn_url": "ftp://127.0.0.1/x"}',
        b'{"token": "abc", "expires_in": 60, "cdn_url": "http://u:p@127.0.0.1/x"}',
        b'{"token": "abc", "expires_in": 60, "cdn_url": "/cdn\\n"}',
        # Plain http off loopback would carry the token in the clear to the CDN's upload side.
        b'{"token": "abc", "expires_in": 60, "cdn_url": "http://cdn.example.com/x"}',
        b'{"token": "abc", "expires_in": 60, "cdn_url": {"nested": [1]}}',
        b'"just a string"',
        b"\xff\xfe not utf-8",
    ],
    ids=lambda b: b[:24].decode(errors="replace"),
)
def test_hostile_login_answers_are_a_502_naming_the_api(
    make_agent: MakeAgent, hostile: HostileUpstream, body: bytes
) -> None:
    agent = make_agent(RESOURCE_API_URL=hostile.url)
    hostile.behave("login", answer(200, body, **{"Content-Type": "application/json"}))
    reply = agent.request("POST", "/login", {"email": hostile.email, "password": hostile.password})
    assert_error(reply, 502, "Resource API")
    assert agent.request("GET", "/health").status == 200  # and the agent is fine


@pytest.mark.parametrize("route", ("small_put", "cdn_put"))
@pytest.mark.parametrize(
    "body",
    [
        NESTED,
        b'{"size": "12", "sha256": "x"}',
        b'{"size": -1}',
        b'{"sha256": "' + b"g" * 64 + b'"}',
    ],
    ids=("nested", "string-size", "negative", "bad-digest"),
)
def test_hostile_receipts_are_a_502(
    agent: AgentProcess, hostile: HostileUpstream, route: str, body: bytes
) -> None:
    hostile.behave(route, answer(201, body, **{"Content-Type": "application/json"}))
    upstream = "Resource API" if route == "small_put" else "CDN"
    assert_error(upload(agent, "receipt.bin"), 502, upstream)


def test_error_bodies_are_never_parsed(agent: AgentProcess, hostile: HostileUpstream) -> None:
    assert upload(agent, "n.bin").status == 200
    hostile.behave("small_get", answer(500, NESTED, **{"Content-Type": "application/json"}))
    assert_error(load(agent, "n.bin"), 503, "Resource API", "HTTP 500")


@pytest.mark.parametrize(
    "content_range", ["bytes ²-9/10", "bytes 0-9/10, 5", "bytes -5-9/10", "bits 0-9/10", ""]
)
def test_hostile_content_range_is_a_502(
    agent: AgentProcess, hostile: HostileUpstream, content_range: str
) -> None:
    assert upload(agent, "cr.bin").status == 200
    cache = Path(agent.env["MODEL_CACHE_DIR"])
    big = next(p for p in cache.glob("*/*") if p.is_file())  # (not the cache's index)
    # A partial download on disk, so the agent asks for a range.
    big.with_name(f".{big.name}.part").write_bytes(big.read_bytes()[:1000])
    big.unlink()

    async def partial(request: web.Request) -> web.Response:
        return web.Response(status=206, body=b"x" * 10, headers={"Content-Range": content_range})

    hostile.behave("cdn_get", partial)
    reply = load(agent, "cr.bin")
    assert_error(reply, 502, "CDN")


# -- 4. no disk filling, no endless waits -----------------------------------------------------


def tamper_small_part(hostile: HostileUpstream, name: str, big_size: int) -> None:
    key = (FOLDER, name)
    small = SmallPart.unpack(hostile.small[key])
    hostile.small[key] = SmallPart(
        small.fragment, small.big_name, big_size, small.big_sha256, small.head
    ).pack()


def clear_cache(agent: AgentProcess) -> None:
    """Drop the big parts the agent holds (behind its back: the files decide what it has;
    its index, which it may be rewriting right now, is left to it)."""
    for path in cache_files(agent):
        path.unlink(missing_ok=True)


def cache_files(agent: AgentProcess) -> list[Path]:
    """The big parts' files, whole or partial (not the cache's index, of which parts it has)."""
    return [p for p in Path(agent.env["MODEL_CACHE_DIR"]).glob("*/*") if p.is_file()]


def test_a_small_part_claiming_a_terabyte_is_refused_before_downloading(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    assert upload(agent, "tb.bin").status == 200
    clear_cache(agent)
    tamper_small_part(hostile, "tb.bin", 1 << 40)
    assert_error(load(agent, "tb.bin"), 502, "Resource API", "LOADER_MAX_RESOURCE_BYTES")
    assert hostile.requests("cdn_get") == []


def test_a_claim_beyond_free_space_is_a_507_with_the_numbers(
    make_agent: MakeAgent, hostile: HostileUpstream
) -> None:
    agent = logged_in(make_agent, hostile, LOADER_MAX_RESOURCE_BYTES=str(1 << 50))
    assert upload(agent, "big.bin").status == 200
    clear_cache(agent)
    tamper_small_part(hostile, "big.bin", (1 << 44) + 17)
    message = assert_error(load(agent, "big.bin"), 507, "bytes free", str((1 << 44) + 17))
    assert "needs" in message
    assert hostile.requests("cdn_get") == []


@pytest.mark.parametrize("big_size", (0, 1, 16))
def test_an_impossible_big_part_size_is_a_502_naming_the_api(
    agent: AgentProcess, hostile: HostileUpstream, big_size: int
) -> None:
    assert upload(agent, "zero.bin").status == 200
    clear_cache(agent)
    tamper_small_part(hostile, "zero.bin", big_size)
    assert_error(load(agent, "zero.bin"), 502, "Resource API", "impossible size")
    assert hostile.requests("cdn_get") == []


def test_a_dripping_cdn_ends_in_a_504_and_leaves_no_partial_file(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    assert upload(agent, "drip.bin").status == 200
    clear_cache(agent)

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 10_000_000
        await response.prepare(request)
        for _ in range(600):
            await response.write(b"x")
            await asyncio.sleep(0.1)
        return response

    hostile.behave("cdn_get", drip)
    started = time.monotonic()
    message = assert_error(load(agent, "drip.bin"), 504, "CDN", "LOADER_UPSTREAM_MIN_RATE")
    assert time.monotonic() - started < 15, message
    assert cache_files(agent) == []


def test_a_cdn_that_sends_a_little_and_breaks_off_again_and_again_ends_in_a_504(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    """Each answer brings a few bytes (honestly resumed with a range), then the connection
    breaks: every pass makes progress, so no retry budget runs out. The passes together are
    below the minimum rate, and that ends it long before the deadline (20 s here)."""
    assert upload(agent, "cut.bin").status == 200
    clear_cache(agent)
    big = next(iter(hostile.big.values()))
    passes: list[int] = []

    async def trickle_then_cut(request: web.Request) -> web.StreamResponse:
        offset = int(request.headers.get("Range", "bytes=0-")[len("bytes=") :].rstrip("-"))
        passes.append(offset)
        response = web.StreamResponse(
            status=206 if offset else 200,
            headers={"Content-Type": "application/octet-stream"},
        )
        if offset:
            response.headers["Content-Range"] = f"bytes {offset}-{len(big) - 1}/{len(big)}"
        response.content_length = len(big) - offset
        await response.prepare(request)
        await response.write(big[offset : offset + 100])
        await asyncio.sleep(0.3)  # the pace of this CDN: 100 bytes a pass, 0.3 s a pass
        assert request.transport is not None
        request.transport.close()  # cut mid-body
        return response

    hostile.behave("cdn_get", trickle_then_cut)
    started = time.monotonic()
    message = assert_error(load(agent, "cut.bin"), 504, "CDN", "LOADER_UPSTREAM_MIN_RATE")
    assert time.monotonic() - started < 10, message
    assert len(passes) >= 2 and passes == sorted(passes)  # resumed, each from where it was
    assert cache_files(agent) == []


def test_a_cdn_too_slow_to_take_an_upload_is_not_asked_again(
    make_agent: MakeAgent, hostile: HostileUpstream
) -> None:
    """A CDN that takes the upload's body too slowly to finish within the deadline: the upload
    ends in a 504 after that one request (too slow is final), not after the retry policy's
    every attempt. (Socket buffers take megabytes at once, so with a body this size it is the
    deadline, not a rate window, that sees it.)"""
    agent = logged_in(make_agent, hostile, LOADER_UPSTREAM_DEADLINE="4")
    requests: list[int] = []

    async def slow_reader(request: web.Request) -> web.StreamResponse:
        requests.append(1)
        while await request.content.read(64 * 1024):
            await asyncio.sleep(0.25)  # the pace of this CDN
        return web.json_response({"size": 0})

    hostile.behave("cdn_put", slow_reader, reads_body=True)
    reply = upload(agent, "slowput.bin", os.urandom(32 * 1024 * 1024))
    assert_error(reply, 504, "CDN", "LOADER_UPSTREAM_DEADLINE")
    assert len(requests) == 1
    metrics = agent.request("GET", "/metrics").body.decode()
    retried = [line for line in metrics.splitlines() if line.startswith("azaion_loader_retries")]
    assert not [line for line in retried if 'operation="cdn"' in line], retried


def test_a_cdn_that_stalls_after_its_headers_ends_in_a_504(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    assert upload(agent, "stall.bin").status == 200
    clear_cache(agent)
    release = threading.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 10_000_000
        await response.prepare(request)
        while not release.is_set():  # headers, then nothing (until the test ends)
            await asyncio.sleep(0.05)
        return response

    hostile.behave("cdn_get", stall)
    started = time.monotonic()
    try:
        assert_error(load(agent, "stall.bin"), 504, "CDN")
    finally:
        release.set()
    assert time.monotonic() - started < 10
    assert cache_files(agent) == []


def test_an_endless_cdn_body_fills_nothing_beyond_the_claimed_size(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    assert upload(agent, "endless.bin").status == 200
    clear_cache(agent)
    claimed = sum(len(v) for v in hostile.big.values())
    sizes: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)  # chunked, never ends by itself
        for _ in range(10_000):
            sizes.append(sum(p.stat().st_size for p in cache_files(agent)))
            await response.write(os.urandom(64 * 1024))
        return response

    hostile.behave("cdn_get", endless)
    # The load follows the download: it stops at the first chunk that does not authenticate,
    # and the download it leaves behind ends (its partial file dropped) right after.
    assert_error(load(agent, "endless.bin"), 502, "CDN", "does not match")
    assert max(sizes) <= claimed
    wait_for(lambda: cache_files(agent) == [], 10, "the partial file to be dropped")


def test_the_overall_deadline_ends_a_slow_steady_download(
    make_agent: MakeAgent, hostile: HostileUpstream
) -> None:
    agent = logged_in(make_agent, hostile, LOADER_UPSTREAM_MIN_RATE="100",
                      LOADER_UPSTREAM_DEADLINE="3")  # fmt: skip
    assert upload(agent, "slow.bin").status == 200
    clear_cache(agent)

    big = next(iter(hostile.big.values()))

    async def steady(request: web.Request) -> web.StreamResponse:
        """The genuine bytes, 2 KB/s: what arrives authenticates, only the time is wrong."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(big)
        await response.prepare(request)
        for offset in range(0, 200_000, 200):
            await response.write(big[offset : offset + 200])
            await asyncio.sleep(0.1)
        return response

    hostile.behave("cdn_get", steady)
    started = time.monotonic()
    assert_error(load(agent, "slow.bin"), 504, "CDN", "LOADER_UPSTREAM_DEADLINE")
    assert time.monotonic() - started < 10


def test_a_download_nobody_waits_for_stops(agent: AgentProcess, hostile: HostileUpstream) -> None:
    """3 MB at 20 KB/s would take 150 s (above the minimum rate, within no deadline soon): the
    download must end because its only caller left, not because it finished or timed out."""
    assert upload(agent, "gone.bin", os.urandom(3_000_000)).status == 200
    clear_cache(agent)
    stopped = threading.Event()
    sent: list[int] = []
    [big] = hostile.big.values()

    async def slow(request: web.Request) -> web.StreamResponse:
        """The genuine bytes (what arrives authenticates), 20 KB/s."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(big)
        await response.prepare(request)
        try:
            for offset in range(0, len(big), 2048):
                await response.write(big[offset : offset + 2048])
                sent.append(2048)
                await asyncio.sleep(0.1)
        except (ConnectionError, asyncio.CancelledError):
            stopped.set()
            raise
        return response

    hostile.behave("cdn_get", slow)
    with pytest.raises(TimeoutError):
        agent.request("POST", "/load/gone.bin", {"folder": FOLDER}, timeout=2)
    left = time.monotonic()
    # The caller has gone: the agent ends the download (the CDN sees its connection close).
    wait_for(stopped.is_set, 10, "the CDN download to stop")
    assert time.monotonic() - left < 8
    assert sum(sent) < 1_000_000  # far from done: stopped, not finished
    # Its partial file stays, to be resumed by the next load that asks.
    assert any(p.name.endswith(".part") for p in cache_files(agent))


def test_an_ambiguous_small_part_failure_keeps_the_big_part(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    """After a 5xx (the API may have stored the small part), the big part is not removed."""
    hostile.behave("small_put", answer(503, {"message": MARKER}))
    assert_error(upload(agent, "maybe.bin"), 503, "Resource API", "HTTP 503")
    assert hostile.requests("cdn_delete") == []
    assert len(hostile.big) == 1


# -- 7. names: one maximum everywhere, no orphans ---------------------------------------------


def test_a_name_over_the_maximum_is_refused_before_anything_is_sent(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    before = len(hostile.seen)
    reply = upload(agent, "n" * 201)
    assert_error(reply, 400, "at most 200 characters")
    reply = load(agent, "n" * 201)
    assert_error(reply, 400, "at most 200 characters")
    assert len(hostile.seen) == before


def test_a_failed_small_part_leaves_no_big_part_on_the_cdn(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    hostile.behave("small_put", answer(400, {"message": MARKER}))
    assert_error(upload(agent, "orphan.bin"), 502, "Resource API", "HTTP 400")
    assert len(hostile.requests("cdn_put")) == 1
    assert len(hostile.requests("cdn_delete")) == 1
    assert hostile.big == {}


def test_a_caller_that_half_closed_before_asking_gets_its_load(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    """`printf 'POST /load ...' | nc -N -U sock`: the request is complete, then the caller's
    EOF; only an EOF during the wait for the CDN means "gone"."""
    assert upload(agent, "half.bin").status == 200
    body = json.dumps({"folder": FOLDER}).encode()
    request = (
        b"POST /load/half.bin HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(agent.socket_path))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert payload == DATA


def test_a_pause_the_cdn_asks_for_is_not_slowness(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    """503 with Retry-After longer than the rate window, then the body: the load succeeds
    (the window starts at the first byte), it is not a 504."""
    assert upload(agent, "pause.bin").status == 200
    clear_cache(agent)
    honest_get = hostile.app_handler("cdn_get")
    calls: list[int] = []

    async def busy_once(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        if len(calls) == 1:
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "2"})
        return await honest_get(request)

    hostile.behave("cdn_get", busy_once)
    reply = load(agent, "pause.bin")
    assert reply.status == 200 and reply.body == DATA
    assert len(calls) == 2


def test_a_refusal_after_an_ambiguous_attempt_keeps_the_big_part(
    agent: AgentProcess, hostile: HostileUpstream
) -> None:
    """A 503 (the part may have been stored), then a 409 (that very write still in progress):
    the last answer is a 4xx, but the big part must stay."""
    answers = iter([(503, "busy"), (409, "in progress")])

    async def unsure(request: web.Request) -> web.StreamResponse:
        status, code = next(answers, (409, "in progress"))
        return web.json_response({"error": code}, status=status)

    hostile.behave("small_put", unsure)
    reply = upload(agent, "unsure.bin")
    assert reply.status == 409, reply.body
    assert hostile.requests("cdn_delete") == []
    assert len(hostile.big) == 1
