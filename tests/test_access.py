"""Access by peer identity, with real users (docs/security.md, "Who may call what").

Real system users (one in the allowed group, one not, and root) run real clients (curl under
``setpriv``) against the real agent over its Unix socket and over loopback TCP, IPv4 and IPv6.
The agent decides from what the kernel reports (``SO_PEERCRED``/``SO_PEERGROUPS`` on the socket,
``sock_diag`` on TCP); nothing the client sends can claim an identity.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import stream
from tests.fixtures.agent import AgentProcess
from tests.fixtures.devapi import DevApi
from tests.fixtures.dockerd import Dockerd, import_image
from tests.fixtures.users import AccessUsers, CurlReply, User, curl_as

MakeAgent = Callable[..., AgentProcess]

OPEN = [
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/status"),
    ("GET", "/unlock/status"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]
# Protected endpoints, each with a request that an allowed caller gets a quick, known answer
# to (the agent has no credentials and no archive): the check comes before anything else.
PROTECTED = [
    ("POST", "/login", {"body": "{}"}, 400),
    ("POST", "/load/model.bin", {"body": '{"folder": "models"}'}, 401),
    ("POST", "/upload/model.bin", {"form": {"folder": "models", "file": "@/etc/hostname"}}, 401),
    ("POST", "/unlock", {"body": "{}"}, 404),
]
LISTENERS = ("unix", "tcp4", "tcp6")


@pytest.fixture(scope="module")
def agents(
    access_users: AccessUsers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, AgentProcess]]:
    """Two agents (TCP on 127.0.0.1 and on ::1), their sockets open to everyone at the file
    level (0666) so that the peer check alone decides."""
    from tests.fixtures.agent import agent_env, short_tmpdir

    started: dict[str, AgentProcess] = {}
    for family, host in (("tcp4", "127.0.0.1"), ("tcp6", "::1")):
        root = short_tmpdir()
        os.chmod(root, 0o755)
        agent = AgentProcess(
            root, agent_env(root, LOADER_HTTP_HOST=host, LOADER_ALLOWED_GROUPS=access_users.group)
        ).start()
        os.chmod(agent.socket_path.parent, 0o755)
        os.chmod(agent.socket_path, 0o666)
        started[family] = agent
    yield started
    for agent in started.values():
        agent.stop()


def call(
    agents: dict[str, AgentProcess], listener: str, user: User | None, method: str, path: str,
    **kw: object,
) -> CurlReply:  # fmt: skip
    if listener == "unix":
        agent = agents["tcp4"]
        return curl_as(user, method, f"http://localhost{path}",
                       unix_socket=str(agent.socket_path), **kw)  # type: ignore[arg-type]  # fmt: skip
    agent = agents[listener]
    host = "127.0.0.1" if listener == "tcp4" else "[::1]"
    return curl_as(user, method, f"http://{host}:{agent.port}{path}", **kw)  # type: ignore[arg-type]


def identities(users: AccessUsers) -> dict[str, User | None]:
    return {"root": None, "member": users.member, "outsider": users.outsider}


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("who", ("root", "member", "outsider"))
def test_open_endpoints_answer_every_local_peer(
    agents: dict[str, AgentProcess], access_users: AccessUsers, listener: str, who: str
) -> None:
    user = identities(access_users)[who]
    for method, path in OPEN:
        reply = call(agents, listener, user, method, path)
        expected = 503 if path == "/ready" else 200  # nothing is unlocked on these agents
        assert reply.status == expected, (method, path, reply)


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("who", ("root", "member", "outsider"))
def test_protected_endpoints_need_an_allowed_peer(
    agents: dict[str, AgentProcess], access_users: AccessUsers, listener: str, who: str
) -> None:
    user = identities(access_users)[who]
    for method, path, request, allowed_status in PROTECTED:
        reply = call(agents, listener, user, method, path, **request)
        if who == "outsider":
            assert reply.status == 403, (path, reply)
            document = json.loads(reply.body)
            assert document["error"] == "forbidden"
            assert f"uid {access_users.outsider.uid}" in document["message"]
            assert access_users.group in document["message"]
        else:
            assert reply.status == allowed_status, (path, reply)


def test_a_refusal_is_one_warning_line_with_who_and_what(
    agents: dict[str, AgentProcess], access_users: AccessUsers
) -> None:
    agent = agents["tcp4"]
    before = len(agent.log())
    outsider = access_users.outsider
    assert call(agents, "unix", outsider, "POST", "/unlock", body="{}").status == 403
    assert call(agents, "tcp4", outsider, "POST", "/unlock", body="{}").status == 403
    lines = [line for line in agent.log()[before:].splitlines() if "refused" in line]
    assert len(lines) == 2, lines
    for line, over in zip(lines, ("unix", "tcp"), strict=True):
        assert "WARNING" in line and '"/unlock"' in line and "POST" in line
        assert f"uid={outsider.uid} gid={outsider.gid}" in line and f"over {over}" in line
    assert re.search(r"pid=\d+ over unix", lines[0])  # the socket also knows the process


def test_identity_claimed_in_headers_is_ignored(
    agents: dict[str, AgentProcess], access_users: AccessUsers
) -> None:
    claims = {
        "X-Forwarded-For": "127.0.0.1",
        "Forwarded": "for=127.0.0.1;by=root",
        "X-Real-IP": "127.0.0.1",
        "X-Uid": "0",
        "X-Remote-User": "root",
        "X-Forwarded-User": access_users.member.name,
    }
    for listener in LISTENERS:
        reply = call(agents, listener, access_users.outsider, "POST", "/unlock", body="{}",
                     headers=claims)  # fmt: skip
        assert reply.status == 403, (listener, reply)


def test_refusals_flood_the_log_with_a_bounded_number_of_lines(
    agents: dict[str, AgentProcess], access_users: AccessUsers
) -> None:
    agent = agents["tcp6"]
    before = len(agent.log())
    url = f"http://[::1]:{agent.port}/unlock"
    outsider = access_users.outsider
    # curl takes many URLs in one run (each with its own -o), over one kept-alive connection.
    command = ["setpriv", f"--reuid={outsider.uid}", f"--regid={outsider.gid}",
               "--init-groups", "curl", "-s", "-w", "%{http_code}\\n", "-X", "POST", "-H",
               "Content-Type: application/json", "--data-binary", "{}"]  # fmt: skip
    for _ in range(300):
        command += ["-o", "/dev/null", url]
    codes = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout.split()
    assert codes == ["403"] * 300
    refused = [line for line in agent.log()[before:].splitlines() if "refused" in line]
    assert 1 <= len(refused) <= 11, len(refused)


@pytest.fixture
def logged_in_agent(
    make_agent: MakeAgent, access_users: AccessUsers, shared_dev_api: DevApi
) -> AgentProcess:
    agent = make_agent(RESOURCE_API_URL=shared_dev_api.url,
                       LOADER_ALLOWED_GROUPS=access_users.group)  # fmt: skip
    os.chmod(agent.root, 0o755)
    os.chmod(agent.socket_path.parent, 0o755)
    os.chmod(agent.socket_path, 0o666)
    login = {"email": shared_dev_api.email, "password": shared_dev_api.password}
    assert agent.request("POST", "/login", login).status == 200
    return agent


def test_a_refused_request_changes_nothing(
    logged_in_agent: AgentProcess, access_users: AccessUsers, shared_dev_api: DevApi
) -> None:
    agent = logged_in_agent
    sock = str(agent.socket_path)
    outsider = access_users.outsider
    url = f"http://127.0.0.1:{agent.port}"
    before_log = agent.log().count("credentials set")
    # Credentials: not replaced.
    hijack = json.dumps({"email": "attacker@example.com", "password": "attacker-password"})
    assert curl_as(outsider, "POST", f"{url}/login", body=hijack).status == 403
    assert curl_as(outsider, "POST", "http://localhost/unlock", body=hijack,
                   unix_socket=sock).status == 403  # fmt: skip
    assert agent.log().count("credentials set") == before_log
    assert agent.request("GET", "/status").json()["authenticated"] is True
    # Nothing stored, nothing cached.
    cache = Path(agent.env["MODEL_CACHE_DIR"])
    files_before = sorted(cache.rglob("*"))
    stored_before = shared_dev_api.count("PUT", "/")
    reply = curl_as(outsider, "POST", f"{url}/upload/x.bin",
                    form={"folder": "access", "file": "@/etc/hostname"})  # fmt: skip
    assert reply.status == 403
    assert sorted(cache.rglob("*")) == files_before
    assert shared_dev_api.count("PUT", "/") == stored_before
    # No unlock started, even with an archive to unlock.
    archive = Path(agent.env["IMAGES_PATH"])
    encryptor = stream.Encryptor([shared_dev_api.key_fragment])
    archive.write_bytes(encryptor.update(b"x") + encryptor.finalize())
    assert curl_as(outsider, "POST", f"{url}/unlock", body="{}").status == 403
    assert agent.request("GET", "/unlock/status").json()["state"] == "idle"
    # A member does what the outsider could not.
    member = access_users.member
    reply = curl_as(member, "POST", f"{url}/upload/x.bin",
                    form={"folder": "access", "file": "@/etc/hostname"})  # fmt: skip
    assert reply.status == 200, reply
    loaded = curl_as(member, "POST", f"{url}/load/x.bin", body='{"folder": "access"}')
    assert loaded.status == 200 and loaded.body == Path("/etc/hostname").read_text()
    refused = curl_as(outsider, "POST", f"{url}/load/x.bin", body='{"folder": "access"}')
    assert refused.status == 403


def test_socket_groups_come_from_the_process_not_the_account(
    logged_in_agent: AgentProcess, access_users: AccessUsers
) -> None:
    """Over the socket the kernel reports the process's groups (SO_PEERGROUPS): an outsider's
    process given the group (as `docker run --group-add` does) is allowed; over TCP only the
    account's groups count."""
    agent = logged_in_agent
    outsider = access_users.outsider
    gid = access_users.gid
    over_socket = curl_as(outsider, "POST", "http://localhost/unlock", body="{}",
                          unix_socket=str(agent.socket_path), extra_groups=(gid,))  # fmt: skip
    assert over_socket.status != 403, over_socket
    over_tcp = curl_as(outsider, "POST", f"http://127.0.0.1:{agent.port}/unlock", body="{}",
                       extra_groups=(gid,))  # fmt: skip
    assert over_tcp.status == 403


def test_a_bad_group_name_stops_serve_with_exit_2(make_agent: MakeAgent) -> None:
    agent = make_agent(start=False, LOADER_ALLOWED_GROUPS="root,no-such-group-here")
    agent.start(wait=False)
    assert agent.proc is not None
    assert agent.proc.wait(20) == 2
    lines = agent.log().strip().splitlines()
    assert len(lines) == 1 and "LOADER_ALLOWED_GROUPS" in lines[0], lines
    assert "no-such-group-here" in lines[0]


# -- containers (docs/operations.md, "Who may call what") -------------------------------------

UNIX_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    raise SystemExit(0)
sock.sendall(b"POST /unlock HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\n"
             b"Content-Length: 2\\r\\nConnection: close\\r\\n\\r\\n{}")
print(sock.makefile("rb").readline().decode().strip())
"""
TCP_REQUEST = (
    "POST /unlock HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: application/json\\r\\n"
    "Content-Length: 2\\r\\nConnection: close\\r\\n\\r\\n{}"
)


def host_python(script: str, *args: str) -> list[str]:
    """Run the host's own Python inside a busybox container (the host's root mounted at
    /host, read-only): a real client process with the container's uid and groups."""
    loader = Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))
    python = os.path.realpath("/usr/bin/python3")
    return [f"/host{loader}", "--library-path", f"/host{loader.parent}", f"/host{python}",
            "-c", script, *args]  # fmt: skip


def test_containers_need_the_group_on_the_socket_and_a_member_uid_on_tcp(
    make_agent: MakeAgent, access_users: AccessUsers, dockerd: Dockerd
) -> None:
    agent = make_agent(LOADER_ALLOWED_GROUPS=access_users.group)
    os.chmod(agent.root, 0o755)
    os.chmod(agent.socket_path.parent, 0o755)
    os.chown(agent.socket_path, 0, access_users.gid)  # as the socket unit makes it (0660)
    image = "azaion/access-client:1"
    import_image(dockerd.client, image)
    outsider, member = access_users.outsider, access_users.member

    def run(user: User, group_add: list[str], **kw: object) -> str:
        output = dockerd.client.containers.run(
            image, user=f"{user.uid}:{user.gid}", group_add=group_add, remove=True, **kw
        )
        return str(output.decode().strip())

    socket_mount = {
        "volumes": {
            str(agent.socket_path.parent): {"bind": "/run/azaion-loader", "mode": "rw"},
            "/": {"bind": "/host", "mode": "ro"},
        },
        "environment": {"PYTHONHOME": "/host/usr"},
        "command": host_python(UNIX_CLIENT, "/run/azaion-loader/loader.sock"),
    }
    # The socket bind-mounted, the group added: allowed (404: no archive to unlock).
    assert run(outsider, [str(access_users.gid)], **socket_mount).startswith("HTTP/1.1 404")
    # The same container without the group: the 0660 socket does not even open.
    assert run(outsider, [], **socket_mount) == "EACCES"

    tcp = {
        "network_mode": "host",
        "command": ["sh", "-c", f"printf '{TCP_REQUEST}' | busybox nc 127.0.0.1 {agent.port}"],
    }
    # Host networking: a member account's uid is allowed, another uid is not, and adding the
    # group to the container's process does not help over TCP (the kernel reports the uid).
    assert run(member, [], **tcp).startswith("HTTP/1.1 404")
    assert run(outsider, [], **tcp).startswith("HTTP/1.1 403")
    assert run(outsider, [str(access_users.gid)], **tcp).startswith("HTTP/1.1 403")
