"""Hostile local requests against the real agent (issue 7, "Security checks").

One agent for the module, logged in to a dev-api through a ``TokenTap`` (so the secret watch
knows its bearer tokens too) and logging at TRACE, takes every hostile request. Each check
asserts the refusal (status, JSON error, nothing of the input echoed), that nothing reached the
Resource API and nothing appeared on disk, and that the agent still serves. The secret watch
(``tests/fixtures/secretwatch.py``) greps every answer and log line of the module for the
password, the tokens and the key fragments.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.fixtures import agent as agent_fixtures
from tests.fixtures.agent import (
    AgentProcess,
    Reply,
    agent_env,
    short_tmpdir,
    tcp_request,
    wait_for,
)
from tests.fixtures.devapi import DevApi, new_dev_api
from tests.fixtures.secretwatch import (  # noqa: F401 (fixtures, until conftest.py loads them)
    WATCH,
    SecretWatch,
    TokenTap,
    _secret_watch_installed,
    no_secret_leaks,
)

MakeAgent = Callable[..., AgentProcess]
MiB = 1024 * 1024
FOLDER = "models"
KNOWN = "known.bin"
KNOWN_DATA = os.urandom(200_000)
RSS_GROWTH_LIMIT = 64 * MiB  # what one hostile request may add to the agent's peak RSS
NOBODY = 65534
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable


# ---------------------------------------------------------------------------------------------
# The module's agent and its helpers


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevApi]:
    dev_api = new_dev_api(tmp_path_factory.mktemp("security-dev-api"), [])
    yield dev_api
    dev_api.stop()


@pytest.fixture(scope="module")
def tap(api: DevApi) -> Iterator[TokenTap]:
    token_tap = TokenTap(api.url, lambda token: WATCH.add_text("bearer token", token)).start()
    yield token_tap
    token_tap.stop()


@pytest.fixture(scope="module")
def agent(api: DevApi, tap: TokenTap) -> Iterator[AgentProcess]:
    root = short_tmpdir("sec-")
    env = agent_env(root, RESOURCE_API_URL=tap.url, LOADER_LOG_LEVEL="TRACE")
    process = AgentProcess(root, env).start()
    login = process.request("POST", "/login", {"email": api.email, "password": api.password})
    assert login.json() == {"status": "ok", "verified": True}, login.body
    source = root / KNOWN
    source.write_bytes(KNOWN_DATA)
    upload = process.cli("upload", str(source), "--folder", FOLDER)
    assert upload.returncode == 0, upload.stderr
    source.unlink()
    assert tap.tokens, "the tap saw no bearer token"
    yield process
    process.stop()
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def quiet(api: DevApi, agent: AgentProcess) -> Iterator[AgentProcess]:
    """The module's agent; after the test: no request reached the Resource API or the CDN, no
    file appeared or changed under the agent's directories, and the agent still serves."""
    api.clear_stats()
    before = _tree(agent)
    authenticated = agent.request("GET", "/status").json()["authenticated"]
    yield agent
    assert api.stats()["requests"] == {}, "a refused request reached the Resource API"
    assert _tree(agent) == before, "a refused request changed the agent's files"
    assert agent.request("GET", "/health").status == 200
    assert agent.request("GET", "/status").json()["authenticated"] is authenticated


def _tree(agent: AgentProcess) -> dict[str, tuple[int, int]]:
    found = {}
    for name in ("LOADER_STATE_DIR", "MODEL_CACHE_DIR"):
        root = Path(agent.env[name])
        for path in root.rglob("*") if root.exists() else ():
            st = path.lstat()
            found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found


def gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzip-compressed a MiB at a time (about size/1000 on the wire)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MiB)
    out = [compressor.compress(zeros) for _ in range(size // MiB)]
    return b"".join(out) + compressor.flush()


def _peak_rss(agent: AgentProcess) -> int:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def raw_exchange(agent: AgentProcess, request: bytes, *, over_unix: bool = False) -> Reply:
    """Send ``request`` byte for byte (no client library fixing it up) and read the answer.

    The body is sent from a thread, so the agent may answer (and close) before it has read
    everything, as it does when it refuses a request early.
    """
    if over_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(agent.socket_path))
    else:
        sock = socket.create_connection(("127.0.0.1", agent.port))
    sock.settimeout(30)

    def send() -> None:
        with contextlib.suppress(OSError):  # the agent answered and closed before taking it all
            sock.sendall(request)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock, method=request.split(b" ", 1)[0].decode())
        response.begin()
        body = response.read()
        reply: Reply = agent_fixtures.Reply(response.status, dict(response.getheaders()), body)
    finally:
        sender.join(30)
        sock.close()
    return reply


def http_request(
    method: str, target: str, headers: dict[str, str], body: bytes = b"", host: str = "localhost"
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def assert_refused(reply: Reply, status: int, code: str, *sent: str | bytes) -> None:
    """A JSON error with this status and code, echoing nothing of what was ``sent``."""
    assert reply.status == status, (reply.status, reply.body[:300])
    body = reply.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    for value in sent:
        marker = value.encode() if isinstance(value, str) else value
        if len(marker) >= 6:
            assert marker not in reply.body, f"the answer echoes {marker[:40]!r}"


def multipart(*parts: tuple[bytes, bytes], boundary: bytes = b"b", close: bool = True) -> bytes:
    """``parts``: (headers, data) pairs."""
    body = b"".join(
        b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts
    )
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def field(name: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"'.encode()


MULTIPART = {"Content-Type": "multipart/form-data; boundary=b"}


# ---------------------------------------------------------------------------------------------
# Host and Origin: the DNS-rebinding and CSRF guard


FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8765",
    "localhost.evil.example",
    "127.0.0.1.nip.io",
    "127.0.0.1:80@evil.example",
    "127.0.0.1:8765:1",
    "[::1]evil.example",
    "[::1].evil.example",
    "localhost:port",
    "localhost.",
    "127.0.0.2",
    "127.1",
    "0x7f000001",
    "2130706433",
    "0.0.0.0",
    "[::ffff:127.0.0.1]",
    "[::]",
    "",
    "loc\u0430lhost",  # Cyrillic a
    "unix",  # socket-only names are refused over TCP: any name may be rebound
    "azaion-loader",
]


def test_foreign_host_is_refused_over_tcp(quiet: AgentProcess) -> None:
    for host in FOREIGN_HOSTS:
        for method, path in (("GET", "/status"), ("POST", "/unlock")):
            reply = raw_exchange(quiet, http_request(method, path, {}, host=host))
            assert_refused(reply, 403, "forbidden", host)


def test_foreign_host_is_refused_over_the_socket(quiet: AgentProcess) -> None:
    for host in [h for h in FOREIGN_HOSTS if h not in ("unix", "azaion-loader")]:
        reply = raw_exchange(quiet, http_request("GET", "/status", {}, host=host), over_unix=True)
        assert_refused(reply, 403, "forbidden", host)


def test_loopback_hosts_are_accepted(quiet: AgentProcess) -> None:
    port = quiet.port
    for host in ("localhost", "LOCALHOST:1", f"127.0.0.1:{port}", f"[::1]:{port}", "[::1]"):
        reply = raw_exchange(quiet, http_request("GET", "/health", {}, host=host))
        assert reply.status == 200, host
    for host in ("unix", "azaion-loader", "localhost"):
        reply = raw_exchange(quiet, http_request("GET", "/health", {}, host=host), over_unix=True)
        assert reply.status == 200, host


def test_missing_duplicate_and_absolute_form_hosts(quiet: AgentProcess) -> None:
    no_host = b"GET /status HTTP/1.0\r\n\r\n"
    assert_refused(raw_exchange(quiet, no_host), 403, "forbidden")
    assert raw_exchange(quiet, no_host, over_unix=True).status == 200  # no browser there
    twice = b"GET /status HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n"
    reply = raw_exchange(quiet, twice)
    assert reply.status == 400 and b"evil.example" not in reply.body
    # A full URL as the target names the host the client means, whatever Host says.
    for target in ("http://evil.example/status", "http://localhost/status"):
        request = http_request("GET", target, {}, host="localhost")
        assert_refused(raw_exchange(quiet, request), 403, "forbidden", "evil.example")


FOREIGN_ORIGINS = [
    "http://evil.example",
    "https://evil.example:443",
    "null",
    "file://",
    "http://localhost.evil.example",
    "http://127.0.0.1@evil.example",
    "http://evil.example#@localhost",
    "http://127.0.0.1.nip.io",
    "http://[::1].evil.example",
    "chrome-extension://abcdefgh",
    "http://localhost:8765/path",
    "ftp://localhost",
    "",
]


def test_foreign_origin_is_refused_and_changes_nothing(quiet: AgentProcess, api: DevApi) -> None:
    login = json.dumps({"email": "attacker@evil.example", "password": "attacker-pass"})
    for origin in FOREIGN_ORIGINS:
        headers = {"Origin": origin, "Content-Type": "application/json"}
        for method, path, body in (
            ("GET", "/status", b""),
            ("POST", "/login", login.encode()),
            ("POST", "/unlock", login.encode()),
            ("POST", f"/load/{KNOWN}", json.dumps({"folder": FOLDER}).encode()),
        ):
            reply = raw_exchange(quiet, http_request(method, path, headers, body))
            assert_refused(reply, 403, "forbidden", origin, "attacker")
    # Modern browsers say where a request comes from even without Origin.
    cross_site = {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}
    reply = raw_exchange(quiet, http_request("POST", "/login", cross_site, login.encode()))
    assert_refused(reply, 403, "forbidden", "attacker")
    # The `quiet` fixture checks that the agent is still logged in and the API saw nothing.


def test_loopback_origins_are_accepted(quiet: AgentProcess) -> None:
    for origin in (
        "http://localhost:3000",
        "http://127.0.0.1",
        "https://127.0.0.1",
        "http://[::1]:8080",
    ):
        reply = raw_exchange(quiet, http_request("GET", "/health", {"Origin": origin}))
        assert reply.status == 200, origin


def test_no_answer_grants_cross_origin_access(agent: AgentProcess) -> None:
    preflight = {
        "Origin": "http://evil.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
        "Access-Control-Request-Private-Network": "true",
    }
    replies = [
        raw_exchange(agent, http_request("OPTIONS", "/login", preflight)),
        raw_exchange(agent, http_request("OPTIONS", "/login", {"Origin": "http://localhost"})),
        raw_exchange(agent, http_request("GET", "/status", {"Origin": "http://localhost"})),
        agent.request("POST", f"/load/{KNOWN}", {"folder": FOLDER}),
    ]
    assert replies[0].status in (403, 405)  # no OPTIONS route: never a CORS grant
    assert replies[1].status == 405
    for reply in replies:
        granted = [name for name in reply.headers if name.lower().startswith("access-control-")]
        assert granted == [], granted


# ---------------------------------------------------------------------------------------------
# Bodies a web page can send without a preflight, and compressed bodies


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"],
)
def test_simple_cross_origin_bodies_are_refused(quiet: AgentProcess, content_type: str) -> None:
    """What an old browser (no Origin) could post cross-site without a CORS preflight."""
    body = json.dumps({"email": "attacker@evil.example", "password": "attacker-pass"}).encode()
    for path in ("/login", "/unlock", f"/load/{KNOWN}"):
        reply = raw_exchange(
            quiet, http_request("POST", path, {"Content-Type": content_type}, body)
        )
        assert_refused(reply, 415, "unsupported_media_type", "attacker")


def test_compressed_bodies_are_refused_before_decompression(quiet: AgentProcess) -> None:
    bomb = gzip_bomb(128 * MiB)  # ~130 KiB on the wire
    peak = _peak_rss(quiet)
    for path, content_type in (
        ("/login", "application/json"),
        (f"/upload/{KNOWN}?folder={FOLDER}", "multipart/form-data; boundary=b"),
    ):
        for encoding in ("gzip", "deflate", "GZIP", "identity, gzip"):
            headers = {"Content-Type": content_type, "Content-Encoding": encoding}
            reply = raw_exchange(quiet, http_request("POST", path, headers, bomb))
            assert_refused(reply, 415, "unsupported_media_type")
    assert _peak_rss(quiet) - peak < RSS_GROWTH_LIMIT


# ---------------------------------------------------------------------------------------------
# Oversize bodies and headers


def test_oversize_json_body_is_413_with_or_without_length(quiet: AgentProcess) -> None:
    big = b'{"email": "' + b"a" * (100 * 1024) + b'", "password": "p"}'
    reply = quiet.request("POST", "/login", big, headers={"Content-Type": "application/json"})
    assert_refused(reply, 413, "payload_too_large")
    chunked = (
        b"POST /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(piece), piece)
            for piece in [big[i : i + 8192] for i in range(0, len(big), 8192)]
        )
        + b"0\r\n\r\n"
    )
    assert_refused(raw_exchange(quiet, chunked), 413, "payload_too_large")


def test_oversize_fields_are_refused_without_echo(quiet: AgentProcess) -> None:
    long_email = "e" * 2000 + "@example.test"
    reply = quiet.request("POST", "/login", {"email": long_email, "password": "x"})
    assert_refused(reply, 400, "bad_request", long_email)
    assert "email" in reply.json()["message"]
    long_name = "n" * 256
    reply = quiet.request("POST", f"/load/{KNOWN}", {"folder": long_name})
    assert_refused(reply, 400, "invalid_name", long_name)
    reply = quiet.request("POST", f"/load/{long_name}", {"folder": FOLDER})
    assert_refused(reply, 400, "invalid_name", long_name)


def test_oversize_headers_and_request_line_are_refused(quiet: AgentProcess) -> None:
    cases = [
        http_request("GET", "/health", {"X-Pad": "p" * 20_000}),
        http_request("GET", "/health", {f"X-H{i}": "v" for i in range(5000)}),
        http_request("GET", "/health?" + "q" * 20_000, {}),
        http_request("GET", "/" + "p" * 20_000, {}),
    ]
    peak = _peak_rss(quiet)
    for request in cases:
        for over_unix in (False, True):
            reply = raw_exchange(quiet, request, over_unix=over_unix)
            assert reply.status in (400, 431), reply.body[:200]
    assert _peak_rss(quiet) - peak < RSS_GROWTH_LIMIT


def test_upload_over_the_limit_is_413_even_chunked_and_leaves_nothing(
    make_agent: MakeAgent, dev_api: DevApi
) -> None:
    small = make_agent(RESOURCE_API_URL=dev_api.url, LOADER_MAX_UPLOAD_BYTES="4096")
    login = small.request("POST", "/login", {"email": dev_api.email, "password": dev_api.password})
    assert login.status == 200
    body = multipart((field("folder"), FOLDER.encode()), (field("file"), os.urandom(64 * 1024)))
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    chunked = (
        b"POST /upload/big.bin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
        + b"0\r\n\r\n"
    )
    assert_refused(raw_exchange(small, chunked, over_unix=True), 413, "payload_too_large")
    declared = http_request("POST", "/upload/big.bin", MULTIPART, body)
    assert_refused(raw_exchange(small, declared), 413, "payload_too_large")
    cache = Path(small.env["MODEL_CACHE_DIR"])
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no spool left behind
    assert dev_api.count("PUT", "/") == 0


# ---------------------------------------------------------------------------------------------
# Traversal in every path and body field


TRAVERSAL = [
    "..",
    ".",
    "../etc/passwd",
    "../../../../../../etc/shadow",
    "..\\..\\windows\\win.ini",
    "/etc/passwd",
    "/",
    "a/../../b",
    "models/../../x",
    "C:\\Windows",
    "a\x00b",
    "known.bin\x00.txt",
    ".hidden",
    "..hidden",
    "a..b",
    "\uff0e\uff0e\uff0fetc",  # fullwidth ../
    "\u2024\u2024\u2215etc",  # one-dot leaders and a division slash
    "\u2025\u2044x",  # two-dot leader, fraction slash
    "..\u2215x",
    "\u00e9t\u00e9",
    "name\u202egpj.exe",  # right-to-left override
    "a b",
    "a\nb",
    "a\tb",
    "~root",
    "$(id)",
    "a;b",
    "%2e%2e",
    "%2e%2e%2f",
    "..%c0%af",
    "n" * 256,
    "-",  # not a letter or digit first
]


def _encodings(name: str) -> list[str]:
    """``name`` as it may appear in a URL path: percent-encoded once and twice."""
    once = quote(name, safe="")
    return [once, quote(once, safe="")]


def _load(agent: AgentProcess, path_name: str, body: dict[str, Any]) -> Reply:
    return agent.request("POST", f"/load/{path_name}", body)


def _upload(agent: AgentProcess, target: str, folder: bytes | None) -> Reply:
    parts = [(field("folder"), folder)] if folder is not None else []
    body = multipart(*parts, (field("file") + b'; filename="x"', b"plain data"))
    return agent.request("POST", target, body, headers=MULTIPART)


def _refusals(send: Callable[[str], Reply], names: list[str]) -> list[str]:
    """The names whose answer was not a clean invalid_name refusal (empty when all were)."""
    wrong = []
    for name in names:
        reply = send(name)
        body = (
            reply.json()
            if reply.headers.get("Content-Type", "").startswith("application/json")
            else {}
        )
        echoed = len(name) >= 6 and name.encode() in reply.body
        if reply.status != 400 or body.get("error") != "invalid_name" or echoed:
            wrong.append(f"{name!r}: {reply.status} {reply.body[:120]!r}")
    return wrong


PATH_CASES: dict[str, Callable[[AgentProcess, str], Reply]] = {
    "load path": lambda a, enc: _load(a, enc, {"folder": FOLDER}),
    "upload path": lambda a, enc: _upload(a, f"/upload/{enc}", FOLDER.encode()),
    "upload ?folder=": lambda a, enc: _upload(a, f"/upload/x.bin?folder={enc}", None),
}
BODY_CASES: dict[str, Callable[[AgentProcess, str], Reply]] = {
    "load body folder": lambda a, name: _load(a, KNOWN, {"folder": name}),
    "load body filename": lambda a, name: _load(a, KNOWN, {"folder": FOLDER, "filename": name}),
    "upload folder field": lambda a, name: _upload(a, "/upload/x.bin", name.encode()),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_traversal_in_path_fields(quiet: AgentProcess, case: str) -> None:
    send = PATH_CASES[case]
    for times in (1, 2):  # percent-encoded once, then twice

        def send_encoded(name: str, times: int = times) -> Reply:
            return send(quiet, _encodings(name)[times - 1])

        wrong = _refusals(send_encoded, TRAVERSAL)
        assert wrong == [], f"{case}, encoded {times}x:\n" + "\n".join(wrong)


@pytest.mark.parametrize("case", list(BODY_CASES))
def test_traversal_in_body_fields(quiet: AgentProcess, case: str) -> None:
    send = BODY_CASES[case]
    wrong = _refusals(lambda name: send(quiet, name), [*TRAVERSAL, ""])
    assert wrong == [], f"{case}:\n" + "\n".join(wrong)


def test_raw_traversal_paths_never_reach_a_handler(quiet: AgentProcess) -> None:
    """Unencoded and malformed paths, byte for byte (no client normalising them)."""
    targets = [
        "/load/../etc/passwd",
        "/load/./known.bin",
        "/load/%2e%2e/%2e%2e/etc/passwd",
        "/load/..%2f..%2fetc%2fpasswd",
        "/load/%2E%2E",
        "/upload/../../x",
        "/load/%c0%ae%c0%ae",
        "/load/%ff",
        "/load/known.bin%00",
        "/../load/known.bin",
        "/load//etc/passwd",
        "//load/known.bin",
        "/load/%5c..%5c..%5cx",
    ]
    body = json.dumps({"folder": FOLDER}).encode()
    for target in targets:
        reply = raw_exchange(
            quiet, http_request("POST", target, {"Content-Type": "application/json"}, body)
        )
        assert reply.status in (400, 404), (target, reply.status, reply.body[:200])
        assert reply.json()["error"] in ("invalid_name", "not_found", "bad_request"), target
        assert b"passwd" not in reply.body


# ---------------------------------------------------------------------------------------------
# Non-JSON and wrong-type bodies


NOT_JSON: list[bytes] = [
    b"{not json",
    b"\xff\xfe{\x00}\x00",
    "\ufeff{}".encode(),
    b"[" * 60_000,  # deeper than the parser's recursion limit
    b'{"a":' * 10_000,
    b"1" * 5000,  # more digits than Python converts
    b"NaN",
    b"null",
    b"[]",
    b'"string"',
    b"1e999",
    b"true",
    b"\x00",
    b"<xml/>",
]
WRONG_TYPES: list[Any] = [1, -1, 1.5, True, None, [], ["models"], {}, {"$ne": None}]


def test_non_json_bodies_get_400_never_500(quiet: AgentProcess) -> None:
    json_type = {"Content-Type": "application/json"}
    for path in ("/login", "/unlock", f"/load/{KNOWN}"):
        for body in NOT_JSON:
            reply = quiet.request("POST", path, body, headers=json_type)
            assert reply.status in (400, 401), (path, body[:40], reply.status, reply.body)
            assert reply.json()["error"] in ("bad_request", "bad_credentials", "invalid_name")
    surrogate = quiet.request("POST", f"/load/{KNOWN}", b'{"folder": "\\ud800"}')
    assert surrogate.status == 400 and surrogate.json()["error"] in ("bad_request", "invalid_name")
    # Duplicate keys: the last one wins, as in any JSON parser; nothing crashes.
    reply = quiet.request("POST", f"/load/{KNOWN}", b'{"folder": "a/b", "folder": "x/y"}')
    assert_refused(reply, 400, "invalid_name")


def test_wrong_types_name_the_field_not_the_value(quiet: AgentProcess) -> None:
    fields = {
        "/login": ("email", {"email": "e@example.test", "password": "p"}),
        "/unlock": ("email", {}),
        f"/load/{KNOWN}": ("folder", {"folder": FOLDER}),
    }
    for path, (name, valid) in fields.items():
        for value in WRONG_TYPES:
            reply = quiet.request("POST", path, {**valid, name: value})
            if path == "/unlock" and value is None:
                assert reply.status == 404  # email=null is "no credentials": nothing to unlock
                continue
            assert reply.status == 400, (path, value, reply.body)
            assert name in reply.json()["message"]
    marker = "UNKNOWN-FIELD-\u202e-MARKER"
    reply = quiet.request("POST", "/login", {"email": "a", "password": "b", marker: 1})
    assert_refused(reply, 400, "bad_request", marker)
    assert "email, password" in reply.json()["message"]


def test_json_to_upload_and_multipart_to_json_endpoints_get_415(quiet: AgentProcess) -> None:
    reply = quiet.request("POST", f"/upload/{KNOWN}", {"folder": FOLDER})
    assert_refused(reply, 415, "unsupported_media_type")
    body = multipart((field("folder"), FOLDER.encode()))
    reply = quiet.request("POST", "/login", body, headers=MULTIPART)
    assert_refused(reply, 415, "unsupported_media_type")


# ---------------------------------------------------------------------------------------------
# Multipart bombs


def _nested(depth: int) -> bytes:
    body = b"x"
    for level in range(depth):
        boundary = b"n%d" % level
        body = (
            b"--"
            + boundary
            + b"\r\nContent-Type: multipart/mixed; boundary=n%d\r\n" % (level - 1)
            + field("file")
            + b"\r\n\r\n"
            + body
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
    return body


def test_multipart_bombs_are_refused_with_bounded_memory(quiet: AgentProcess) -> None:
    junk = [(field(f"junk{i}"), b"j") for i in range(50_000)]
    nested_depth = 500
    cases: dict[str, tuple[bytes, dict[str, str]]] = {
        "many parts": (multipart(*junk), MULTIPART),
        "huge part header": (
            multipart((field("folder") + b"\r\nX-Pad: " + b"p" * (4 * MiB), b"models")),
            MULTIPART,
        ),
        "many part headers": (
            multipart(
                (field("folder") + b"".join(b"\r\nX-%d: v" % i for i in range(100_000)), b"m")
            ),
            MULTIPART,
        ),
        "deep nesting": (
            _nested(nested_depth),
            {"Content-Type": f"multipart/form-data; boundary=n{nested_depth - 1}"},
        ),
        "huge folder field": (multipart((field("folder"), b"f" * (8 * MiB))), MULTIPART),
        "big junk fields": (
            multipart(*[(field(f"j{i}"), b"j" * MiB) for i in range(6)]),
            MULTIPART,
        ),
        "no boundary": (b"--b\r\n", {"Content-Type": "multipart/form-data"}),
        "boundary too long": (b"x", {"Content-Type": "multipart/form-data; boundary=" + "b" * 80}),
        "garbage": (os.urandom(64 * 1024), MULTIPART),
        "unterminated": (multipart((field("folder"), b"models"), close=False), MULTIPART),
        "bad part header": (b"--b\r\nno colon here\r\n\r\nx\r\n--b--\r\n", MULTIPART),
        "no part name": (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n", MULTIPART),
        "file before folder": (
            multipart((field("file"), b"data"), (field("folder"), b"models")),
            MULTIPART,
        ),
        "no file": (multipart((field("folder"), b"models")), MULTIPART),
    }
    peak = _peak_rss(quiet)
    for name, (body, headers) in cases.items():
        reply = raw_exchange(quiet, http_request("POST", f"/upload/{KNOWN}", headers, body))
        assert 400 <= reply.status < 500, (name, reply.status, reply.body[:200])
        assert reply.json()["error"] in ("bad_request", "payload_too_large"), name
        assert _peak_rss(quiet) - peak < RSS_GROWTH_LIMIT, name
    leftovers = [p for p in Path(quiet.env["MODEL_CACHE_DIR"]).rglob(".upload-*")]
    assert leftovers == []


def test_encoded_file_part_is_stored_as_sent_not_inflated(agent: AgentProcess) -> None:
    """A part's own Content-Encoding is not applied: a gzip bomb is stored as its few bytes."""
    bomb = gzip_bomb(128 * MiB)
    head = field("file") + b'; filename="bomb.gz"\r\nContent-Encoding: gzip'
    body = multipart((field("folder"), FOLDER.encode()), (head, bomb))
    peak = _peak_rss(agent)
    reply = agent.request("POST", "/upload/bomb.gz", body, headers=MULTIPART)
    assert reply.status == 200, reply.body
    assert reply.json()["size"] == len(bomb)
    assert _peak_rss(agent) - peak < RSS_GROWTH_LIMIT
    loaded = agent.request("POST", "/load/bomb.gz", {"folder": FOLDER})
    assert loaded.body == bomb


# ---------------------------------------------------------------------------------------------
# The socket and the TCP port


def _owner_ids(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])  # effective ids


def _connect_as(path: Path, uid: int, gid: int) -> str:
    """Try to connect to ``path`` as another user; returns "ok" or the errno name."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(path)!r}); print('ok')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", code],  # the venv's may sit where that user cannot read
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    return result.stdout.strip() or result.stderr.strip()


def test_socket_is_0660_owned_by_the_agent_and_refuses_others(
    make_agent: MakeAgent, agent_root: Path
) -> None:
    agent_root.chmod(0o711)  # let another user reach the socket file itself
    agent = make_agent()
    assert agent.proc is not None
    info = agent.socket_path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == _owner_ids(agent.proc.pid)
    parent = agent.socket_path.parent.lstat()
    assert not parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH), "others could replace the socket"
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root")
    assert _connect_as(agent.socket_path, NOBODY, NOBODY) == "EACCES"
    assert _connect_as(agent.socket_path, NOBODY, info.st_gid) == "ok"  # the socket's group


def _listening_tcp(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                found.append((_address(address, width), int(port, 16)))
    return found


def _address(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if width == 8 else socket.AF_INET6
    return socket.inet_ntop(family, words)


def test_tcp_listens_on_loopback_only(quiet: AgentProcess) -> None:
    assert quiet.proc is not None
    listening = _listening_tcp(quiet.proc.pid)
    assert listening, "the agent listens on no TCP port"
    assert {port for _, port in listening} == {quiet.port}
    for address, _ in listening:
        assert address in ("127.0.0.1", "::1"), address


def test_non_loopback_http_host_is_refused_at_start(make_agent: MakeAgent) -> None:
    agent = make_agent(start=False, LOADER_HTTP_HOST="0.0.0.0")
    agent.start(wait=False)
    assert agent.proc is not None
    proc = agent.proc

    def settled() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return agent.request("GET", "/health").status == 200
        except OSError:
            return False

    wait_for(settled, 20, "the agent to exit or serve")
    assert proc.poll() == 2, "the agent serves the local API on every interface"
    assert "LOADER_HTTP_HOST" in agent.log()


# ---------------------------------------------------------------------------------------------
# Answers: headers, and no secret anywhere


def test_answers_forbid_caching_sniffing_and_hide_versions(quiet: AgentProcess) -> None:
    replies = [
        quiet.request("GET", "/health"),
        quiet.request("GET", "/status"),
        quiet.request("GET", "/nope"),
        quiet.request("POST", "/login", b"{"),
        tcp_request(quiet.port, "GET", "/openapi.json", headers={"Host": "localhost"}),
    ]
    for reply in replies:
        headers = {k.lower(): v for k, v in reply.headers.items()}
        assert headers["cache-control"] == "no-store"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["server"] == "azaion-loader"
        assert headers["content-type"].startswith("application/json")


def test_no_secret_in_any_log_answer_or_cli_output(
    agent: AgentProcess, api: DevApi, tap: TokenTap
) -> None:
    """Every path that handles a secret, at TRACE, then the watch greps all of it; the watch
    must know the password, the tokens and both kinds of key fragment, so this is not vacuous."""
    watch: SecretWatch = WATCH
    # Credentials: good, wrong, and through every entry point.
    agent.request("POST", "/login", {"email": api.email, "password": "wrong-" + api.password})
    agent.request("POST", "/login", {"email": api.email, "password": api.password})
    agent.cli("login", "--email", api.email, AZAION_PASSWORD=api.password)
    agent.request("POST", "/unlock", {"email": api.email, "password": api.password})
    # Resources, with the API failing in the ways that put upstream details in messages.
    out = agent.root / "loaded.bin"
    down = agent.cli("load", KNOWN, "--folder", FOLDER, "-o", str(out))
    assert down.returncode == 0, down.stderr
    assert out.read_bytes() == KNOWN_DATA
    for fault in ({"status": 403}, {"status": 500}, {"garbage": True}, {"truncate": True}):
        api.faults(**fault, path="/resources/")
        agent.request("POST", f"/load/{KNOWN}", {"folder": FOLDER})
        api.clear_faults()
    api.faults(expire_tokens=True)  # the next request re-logs in with the password
    reload = agent.request("POST", f"/load/{KNOWN}", {"folder": FOLDER})
    assert reload.status == 200 and reload.body == KNOWN_DATA
    agent.request("GET", "/status")
    agent.cli("status", "--json")
    assert len(tap.tokens) >= 2  # the login and the one after expiry

    leaks = watch.check()
    assert leaks == [], leaks
    kinds = watch.kinds()
    for kind in (
        "dev-api password",
        "bearer token",
        "images key fragment",
        "resource key fragment",
    ):
        assert kind in kinds, f"the watch does not know any {kind}"
    assert watch.texts_checked > 50
    assert watch.log_offsets.get(agent.log_path, 0) > 10_000  # the TRACE log was read
    # The watch does find what it is meant to find.
    token = sorted(tap.tokens)[0]
    assert watch.find(f"Authorization: Bearer {token}") == ["bearer token"]
    assert watch.find(f"prefix {token[:12]}...") == ["bearer token"]
    assert watch.find(api.password) == ["dev-api password"]


def test_cli_errors_are_one_line_without_secrets(agent: AgentProcess, api: DevApi) -> None:
    result = agent.cli("login", "--email", api.email, AZAION_PASSWORD="wrong-" + api.password)
    assert result.returncode == 1
    assert result.stderr.startswith("azaion-loader: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert api.password not in result.stderr
    relogin = agent.request("POST", "/login", {"email": api.email, "password": api.password})
    assert relogin.status == 200
