"""The real agent process on a real Unix socket and loopback TCP."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import startup
from azaion_loader_dev.devapi import DevApiConfig, create_app
from tests.fixtures.agent import REPO, AgentProcess, agent_env, tcp_request, unix_request

MakeAgent = Callable[..., AgentProcess]


def test_health_status_and_socket_mode(make_agent: MakeAgent) -> None:
    agent = make_agent()
    reply = agent.request("GET", "/health")
    assert (reply.status, reply.json()) == (200, {"status": "healthy"})
    assert stat.S_IMODE(agent.socket_path.stat().st_mode) == 0o660
    status = agent.request("GET", "/status").json()
    assert status["status"] == "healthy"
    assert status["authenticated"] is False
    assert status["modelCacheDir"] == agent.env["MODEL_CACHE_DIR"]
    assert status["unlock"]["state"] in ("idle", "checking", "error")
    assert set(status["unlock"]["progress"]) >= {"stage", "bytes_done", "bytes_total", "percent"}


def test_tcp_listens_on_loopback_only(shared_agent: AgentProcess) -> None:
    agent = shared_agent
    reply = tcp_request(agent.port, "GET", "/health")
    assert reply.status == 200
    # Bound to 127.0.0.1 alone: the kernel says so, and no other address of this machine
    # answers. 127.0.0.2 is one on every Linux machine (all of 127/8 is the loopback device),
    # so this fails for a socket bound to 0.0.0.0 even where the machine has no other address.
    assert _listening_addresses(agent.port) == {f"127.0.0.1:{agent.port}"}
    others = ["127.0.0.2", *_non_loopback_addresses()]
    for address in others:
        with socket.socket() as probe:
            probe.settimeout(2)
            assert probe.connect_ex((address, agent.port)) != 0, address


def _listening_addresses(port: int) -> set[str]:
    out = subprocess.run(
        ["ss", "-H", "-l", "-t", "-n", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def _non_loopback_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout
    return [a for a in out.split() if "." in a and not a.startswith("127.")]


def test_http_port_zero_disables_tcp(make_agent: MakeAgent) -> None:
    agent = make_agent(LOADER_HTTP_PORT="0")
    assert agent.request("GET", "/health").status == 200
    assert "http://" not in agent.log().split("serving on", 1)[1].splitlines()[0]


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example"},
        {"Host": "evil.example:8765"},
        {"Host": "127.0.0.1.nip.io"},
        {"Host": "localhost", "Origin": "http://evil.example"},
        {"Host": "localhost", "Origin": "null"},
        {"Host": "localhost", "Sec-Fetch-Site": "cross-site"},
    ],
)
def test_foreign_host_or_origin_is_refused(
    shared_agent: AgentProcess, headers: dict[str, str]
) -> None:
    agent = shared_agent
    for reply in (
        agent.request("GET", "/status", headers=headers),
        tcp_request(agent.port, "GET", "/status", headers=headers),
    ):
        assert reply.status == 403
        body = reply.json()
        assert body["error"] == "forbidden"
        assert body["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/load/..%2Fetc%2Fpasswd",
        "/load/..",
        "/load/%2e%2e",
        "/load/a%00b",
        "/load/a%5Cb",
        "/load/.hidden",
        "/load/a%0Ab",
        "/upload/..%2F..%2Fx",
    ],
)
def test_unsafe_names_in_paths_get_400(shared_agent: AgentProcess, path: str) -> None:
    agent = shared_agent
    reply = agent.request("POST", path, {"folder": "models"})
    assert reply.status == 400, (path, reply.body)
    assert reply.json()["error"] == "invalid_name"


@pytest.mark.parametrize("folder", ["../etc", "/abs", "a/b", "a\\b", "..", "x\x00y", ""])
def test_unsafe_folder_in_body_gets_400(shared_agent: AgentProcess, folder: str) -> None:
    agent = shared_agent
    reply = agent.request("POST", "/load/model.bin", {"folder": folder})
    assert reply.status == 400
    assert reply.json()["error"] == "invalid_name"


def test_errors_are_json(shared_agent: AgentProcess) -> None:
    agent = shared_agent
    cases = [
        (agent.request("GET", "/nope"), 404, "not_found"),
        (agent.request("DELETE", "/health"), 405, "method_not_allowed"),
        (agent.request("POST", "/login", b"{not json"), 400, "bad_request"),
        (agent.request("POST", "/login", b"[1, 2]"), 400, "bad_request"),
        (agent.request("POST", "/login", {"email": "a@b.c"}), 400, "bad_request"),
        (agent.request("POST", "/login", b"x" * (65 * 1024)), 413, "payload_too_large"),
    ]
    for reply, status, code in cases:
        assert reply.status == status, reply.body
        body = reply.json()
        assert body["error"] == code
        assert isinstance(body["message"], str) and body["message"]
        assert "Traceback" not in body["message"]


def test_missing_field_message_names_field_not_value(shared_agent: AgentProcess) -> None:
    agent = shared_agent
    reply = agent.request("POST", "/login", {"email": 5, "password": "s3cret-value"})
    assert reply.status == 400
    assert "email" in reply.json()["message"]
    assert "s3cret-value" not in reply.body.decode()


def test_upload_over_the_limit_is_413(make_agent: MakeAgent) -> None:
    agent = make_agent(LOADER_MAX_UPLOAD_BYTES="1000")
    body = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + b"x" * 2000
    reply = agent.request(
        "POST",
        "/upload/model.bin?folder=models",
        body,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert reply.status == 413
    assert reply.json()["error"] == "payload_too_large"


def test_stale_socket_is_replaced_and_live_one_refused(make_agent: MakeAgent) -> None:
    first = make_agent(start=False)
    # A stale socket file, as a crash leaves behind.
    first.socket_path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(first.socket_path))
    stale.close()
    first.start()
    assert first.request("GET", "/health").status == 200
    # A second agent on the same path refuses clearly and leaves the first one serving.
    env = {**first.env, "LOADER_HTTP_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "agent", "serve"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "another agent is already serving on" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert first.request("GET", "/health").status == 200


def test_sigterm_stops_cleanly_and_removes_socket(make_agent: MakeAgent) -> None:
    agent = make_agent()
    assert agent.stop(signal.SIGTERM) == 0
    assert not agent.socket_path.exists()
    assert "stopped" in agent.log()


def test_socket_activation_with_inherited_sockets(agent_root: Path) -> None:
    """systemd passes a listening Unix socket and a TCP socket as fds 3 and 4."""
    env = agent_env(agent_root)
    path = agent_root / "activated.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen()
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]

    def place_fds() -> None:
        # Copy out of the way first: the sockets may already sit on fds 3 and 4.
        fds = [os.dup(unix.fileno()), os.dup(tcp.fileno())]
        for target, fd in enumerate(fds, start=3):
            os.dup2(fd, target)

    env.update(LISTEN_FDS="2", LISTEN_FDNAMES="loader.sock:http")
    with (agent_root / "activated.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "sh",
                "-c",
                'export LISTEN_PID=$$; exec "$@"',
                "sh",
                sys.executable,
                "-m",
                "agent",
                "serve",
            ],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=log,
            pass_fds=(3, 4),  # placed there by place_fds; keep them open across exec
            preexec_fn=place_fds,
        )
    unix.close()
    tcp.close()
    try:
        # The sockets were listening before the agent started: a client may connect at once
        # and simply waits for the answer.
        reply = unix_request(path, "GET", "/health")
        assert (reply.status, reply.json()) == (200, {"status": "healthy"})
        assert tcp_request(port, "GET", "/health").status == 200
        # It did not create its own socket.
        assert not Path(env["LOADER_SOCKET_PATH"]).exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    text = (agent_root / "activated.log").read_text()
    assert "(from systemd)" in text
    # systemd owns the socket file: the agent leaves it.
    assert path.exists()


def test_cli_status_human_and_json(shared_agent: AgentProcess) -> None:
    agent = shared_agent
    human = agent.cli("status")
    assert human.returncode == 2, human.stderr  # serving, images locked (nothing unlocked)
    assert "healthy" in human.stdout and "images:" in human.stdout
    machine = agent.cli("status", "--json")
    assert machine.returncode == 2
    data = json.loads(machine.stdout)
    assert data["status"] == "healthy" and "unlock" in data


def test_cli_status_without_agent_is_one_clear_line(agent_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--socket", str(agent_root / "none.sock")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"azaion-loader: error: the agent is not running: no socket at {agent_root}/none.sock"
    )


def test_journald_lines_carry_syslog_priority(make_agent: MakeAgent) -> None:
    agent = make_agent(JOURNAL_STREAM="8:12345")
    agent.request("GET", "/nope")  # a warning line
    agent.stop()
    lines = [line for line in agent.log().splitlines() if line]
    assert lines
    assert all(line[:3] in ("<7>", "<6>", "<5>", "<4>", "<3>", "<2>") for line in lines), lines
    assert any(line.startswith("<4>") and "404" in line for line in lines) or any(
        line.startswith("<6>") for line in lines
    )
    assert any(line.startswith("<6>") and "serving on" in line for line in lines)


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_a_socket_from_systemd_off_loopback_stops_serve_with_exit_2(
    agent_root: Path, address: str
) -> None:
    """A socket unit edited to listen on all addresses would put the API on the network: the
    agent refuses to serve on it (exit 2, one line naming it), whatever else it was given."""
    env = agent_env(agent_root)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    exposed = socket.create_server((address, 0), family=family)

    def place_fd() -> None:
        os.dup2(os.dup(exposed.fileno()), 3)

    env.update(LISTEN_FDS="1")
    log_path = agent_root / "exposed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", sys.executable, "-m", "agent",
             "serve"],
            env=env, cwd=REPO, stdout=log, stderr=log, pass_fds=(3,), preexec_fn=place_fd,
        )  # fmt: skip
    exposed.close()
    assert proc.wait(20) == 2
    lines = log_path.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert "not on loopback" in lines[0] and "azaion-loader.socket" in lines[0]


def write_tls_files(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA (``name``-ca.pem) and a certificate it signed for 127.0.0.1, with its key."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        signer: ec.EllipticCurvePrivateKey,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        certificate(f"{name} CA", ca_key, f"{name} CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        certificate("127.0.0.1", server_key, f"{name} CA", ca_key)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (
        directory / f"{name}-ca.pem",
        directory / f"{name}-cert.pem",
        directory / f"{name}-key.pem",
    )
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.parametrize("trusted", [True, False], ids=["its-ca-trusted", "another-ca-trusted"])
async def test_tls_to_the_resource_api_verifies_with_the_ca_loaded_after_ready(
    tmp_path: Path, make_agent: MakeAgent, aiohttp_server: Any, trusted: bool
) -> None:
    """``serve`` loads its TLS contexts' CA certificates only after READY=1 (agent.startup):
    the first upstream call still verifies the Resource API's certificate against them, and
    only them (``SSL_CERT_FILE``, read by OpenSSL when they are loaded)."""
    ca, cert, key = write_tls_files(tmp_path, "api")
    other_ca, *_ = write_tls_files(tmp_path, "other")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    email, password = "device@example.test", "tls-test-password"
    api = create_app(DevApiConfig(data_dir=tmp_path / "api", users={email: password}))
    server = await aiohttp_server(api, ssl=server_tls)
    agent = await asyncio.to_thread(
        make_agent,
        RESOURCE_API_URL=f"https://127.0.0.1:{server.port}",
        SSL_CERT_FILE=str(ca if trusted else other_ca),
        SSL_CERT_DIR=str(tmp_path / "no-such-directory"),
    )
    login = {"email": email, "password": password}
    reply = await asyncio.to_thread(agent.request, "POST", "/login", login)
    if trusted:
        assert (reply.status, reply.json()) == (200, {"status": "ok", "verified": True})
    else:
        assert reply.status == 502, reply.body
        assert "TLS certificate was refused" in reply.json()["message"]


def test_deferred_ca_certificates_are_loaded_later_into_the_same_contexts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, *_ = write_tls_files(tmp_path, "unit")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-directory"))
    with startup.ca_certificates_deferred():
        verified = ssl.create_default_context()
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        unverified.set_default_verify_paths()
    assert "set_default_verify_paths" not in vars(ssl.SSLContext)  # ssl as it was
    assert ssl.create_default_context().cert_store_stats()["x509_ca"] == 1
    assert startup.deferred_contexts() == 2
    assert verified.cert_store_stats()["x509_ca"] == 0
    startup.load_deferred_certificates()
    assert startup.deferred_contexts() == 0
    assert verified.cert_store_stats()["x509_ca"] == 1
    assert unverified.cert_store_stats()["x509_ca"] == 0  # verifies nothing: never reads them
