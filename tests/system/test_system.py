"""The package on a real systemd: install, boot, serve, stop, crash, watchdog, unlock, reboot.

Each test boots a fresh bookworm container (systemd as PID 1) with the built .deb installed,
and looks at it the way an operator would: ``systemctl``, ``journalctl``, the CLI, the socket.
"""

from __future__ import annotations

import http.client
import io
import re
import shutil
import socket
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import stream
from agent.images import ImageEngine
from agent.pack import pack_images
from azaion_loader_dev.harness.agent import free_port
from tests.fixtures.devapi import DevApi
from tests.fixtures.dockerd import Dockerd, import_image
from tests.system.machine import Machine, missing, require, wait_for

pytestmark = pytest.mark.system

AGENT = "azaion-loader.service"
SOCKET = "azaion-loader.socket"
SOCKET_PATH = "/run/azaion-loader/loader.sock"
START_TIMEOUT = 30.0
UNLOCK_TIMEOUT = 120.0
# A stop is SIGTERM, STOPPING=1, responses finished, exit 0: well under the unit's 20 s.
QUICK_STOP = 5.0
MAX_EXPOSURE = 2.0
# The unit's 30 s watchdog, shortened for the test by a drop-in.
TEST_WATCHDOG = "2s"
API_VERSION = "v-system"
READY = "ready: 1 image loaded"

NewMachine = Callable[..., Machine]


# -- helpers ----------------------------------------------------------------------------------


def show(machine: Machine, unit: str, *properties: str) -> dict[str, str]:
    """``systemctl show`` as a dict of the asked properties."""
    out = machine.run(["systemctl", "show", unit, *(f"--property={p}" for p in properties)])
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def wait_running(machine: Machine, unit: str = AGENT, timeout: float = START_TIMEOUT) -> str:
    """Wait for active (running); returns the main PID. A failed unit fails at once."""

    def running() -> str | None:
        state = show(machine, unit, "ActiveState", "SubState", "MainPID")
        if state["ActiveState"] == "failed":
            raise AssertionError(f"{unit} failed:\n{machine.journal(unit)}")
        if (state["ActiveState"], state["SubState"]) == ("active", "running"):
            return state["MainPID"]
        return None

    return wait_for(running, timeout, f"{unit} to be active (running)")


def status_text(machine: Machine) -> str:
    return show(machine, AGENT, "StatusText")["StatusText"]


def use_port(machine: Machine, port: int) -> None:
    """Move the socket unit's loopback port: the containers share the host's network, so the
    default 8765 could clash with another test or agent. Also the documented way to change it."""
    machine.write(
        f"/etc/systemd/system/{SOCKET}.d/test-port.conf",
        f"[Socket]\nListenStream=\nListenStream={SOCKET_PATH}\nListenStream=127.0.0.1:{port}\n",
    )


def agent_dropin(machine: Machine, name: str, text: str) -> None:
    machine.write(f"/etc/systemd/system/{AGENT}.d/{name}.conf", text)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """A plain GET on loopback (http.client: no proxy from the environment in the way)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def boot_installed(new_machine: NewMachine) -> tuple[Machine, int]:
    machine = new_machine()
    port = free_port()
    use_port(machine, port)
    machine.boot()
    return machine, port


# -- the package ------------------------------------------------------------------------------


def test_package_is_lintian_clean_of_errors(deb_package: Path) -> None:
    require(missing("lintian"), "lintian")
    result = subprocess.run(
        ["lintian", "--fail-on", "error", "--no-tag-display-limit", str(deb_package)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], "\n".join(errors)
    assert result.returncode == 0, result.stdout + result.stderr


def dpkg_deb(*args: str | Path) -> str:
    return subprocess.run(
        ["dpkg-deb", *map(str, args)], capture_output=True, text=True, check=True
    ).stdout


def package_file(deb: Path, path: str) -> bytes:
    """One file of the package's data, read without installing it."""
    tar = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        member = archive.extractfile(f"./{path.removeprefix('./').lstrip('/')}")
        assert member is not None, f"{path} is not a file in the package"
        return member.read()


WHEELS = "./usr/lib/azaion-loader/wheels/"
# Extension modules the agent needs: each must come as a wheel for every supported Python.
COMPILED = ("aiohttp", "cffi", "frozenlist", "multidict", "propcache", "pydantic_core", "yarl")
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


def test_package_carries_a_wheelhouse_for_debian_12_and_13(deb_package: Path) -> None:
    """The environment is built on the device from wheels for its architecture and for both
    Debian 12's Python 3.11 and Debian 13's 3.13: no upper bound on python3, nothing under /opt
    owned by dpkg, no bytecode."""
    depends = dpkg_deb("--field", deb_package, "Depends").strip()
    version = dpkg_deb("--field", deb_package, "Version").strip()
    machine = MACHINES[dpkg_deb("--field", deb_package, "Architecture").strip()]
    assert re.search(r"(^|, )python3 \(>= 3\.11~\)(,|$)", depends), depends
    assert "<<" not in depends and "python3.11" not in depends, depends
    assert dpkg_deb("--info", deb_package, "triggers").split() == [
        "interest-noawait",
        "/usr/bin/python3",
    ]
    contents = dpkg_deb("--contents", deb_package)
    for path in (
        "./usr/bin/azaion-loader -> /opt/azaion-loader/current/bin/azaion-loader",
        "./usr/lib/azaion-loader/ensure-env",
        f"{WHEELS}azaion_loader-{version}-py3-none-any.whl",
        f"{WHEELS}sdnotify-",
        f"{WHEELS}pip-",
        "./lib/systemd/system/azaion-loader.service",
        "./lib/systemd/system/azaion-loader.socket",
        "./usr/lib/sysusers.d/azaion-loader.conf",
        "./usr/lib/tmpfiles.d/azaion-loader.conf",
        "./etc/azaion-loader/loader.env",
    ):
        assert path in contents, f"{path} is not in the package"
    wheels = [line.split(WHEELS, 1)[1] for line in contents.splitlines() if WHEELS in line]
    wheels = [name for name in wheels if name.endswith(".whl")]
    for name in COMPILED:
        for python in ("cp311", "cp313"):
            assert any(w.startswith(f"{name}-") and f"-{python}-{python}-" in w for w in wheels), (
                f"no {python} wheel of {name}"
            )
    assert any(w.startswith("cryptography-") and "-abi3-" in w for w in wheels), wheels
    platform_specific = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert all(w.endswith(f"_{machine}.whl") for w in platform_specific), platform_specific
    assert " ./opt/" not in contents and "__pycache__" not in contents and ".pyc" not in contents


DEVELOPMENT_TOOLS = re.compile(r"azaion_loader_dev|azaion-loader-dev|devapi|dev_api")
# The one file of that name that belongs: azaion-loader's shim, which says dev-api is not here.
DEV_API_SHIM = "agent/cli/devapi.py"


def test_package_holds_no_development_tools(deb_package: Path) -> None:
    """No dev-api (an unauthenticated fault-injection endpoint), no test harness, no
    ``azaion-loader-dev``: the device package, and the agent's wheel in it, hold the device's
    code only."""
    version = dpkg_deb("--field", deb_package, "Version").strip()
    contents = dpkg_deb("--contents", deb_package)
    found = [line for line in contents.splitlines() if DEVELOPMENT_TOOLS.search(line)]
    assert found == [], "\n".join(found)
    wheel = package_file(deb_package, f"{WHEELS}azaion_loader-{version}-py3-none-any.whl")
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        names = archive.namelist()
        assert DEV_API_SHIM in names  # the listing is the wheel's
        found = [n for n in names if DEVELOPMENT_TOOLS.search(n) and n != DEV_API_SHIM]
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert found == [], "\n".join(found)
    assert "azaion-loader = agent.cli:main" in scripts
    assert not DEVELOPMENT_TOOLS.search(scripts), scripts


def test_dev_api_on_the_device_says_it_is_not_installed(new_machine: NewMachine) -> None:
    machine, _ = boot_installed(new_machine)

    result = machine.run(
        ["azaion-loader", "dev-api", "--port", "0", "--data-dir", "/tmp/d", "--user", "a:b"],
        check=False,
        timeout=30,  # were it there, it would serve until this ends it
    )

    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert "dev-api is a development tool, not installed on this device" in line, line


# -- install, boot, serve ---------------------------------------------------------------------


def test_install_in_booted_machine_then_purge(new_machine: NewMachine, deb_package: Path) -> None:
    machine = new_machine(installed=False)
    use_port(machine, free_port())
    machine.write("/root/azaion-loader.deb", deb_package.read_bytes())
    machine.boot()

    machine.run(["dpkg", "--install", "/root/azaion-loader.deb"])

    # postinst: user in the docker group, units enabled and started by a running systemd.
    groups = machine.run(["id", "--name", "--groups", "azaion-loader"]).stdout.split()
    assert "docker" in groups
    enabled = machine.run(["systemctl", "is-enabled", AGENT, SOCKET], check=False).stdout
    assert enabled.split() == ["enabled", "enabled"]
    assert machine.run(["test", "-d", "/var/lib/azaion-loader"], check=False).returncode == 0

    # An upgrade (here: the same version again) restarts the agent; the socket stays up.
    first = wait_running(machine)
    machine.run(["dpkg", "--install", "/root/azaion-loader.deb"])
    assert wait_running(machine) != first
    assert show(machine, SOCKET, "ActiveState")["ActiveState"] == "active"

    machine.run(["dpkg", "--purge", "azaion-loader"])

    state = show(machine, AGENT, "ActiveState", "LoadState")
    assert state == {"ActiveState": "inactive", "LoadState": "not-found"}
    for gone in ("/var/lib/azaion-loader", "/var/cache/azaion-loader", "/opt/azaion-loader"):
        assert machine.run(["test", "-e", gone], check=False).returncode != 0, f"{gone} stayed"
    assert machine.run(["test", "-S", SOCKET_PATH], check=False).returncode != 0


def test_units_verify_clean_and_exposure_is_low(new_machine: NewMachine) -> None:
    machine, _ = boot_installed(new_machine)

    verify = machine.run(["systemd-analyze", "verify", AGENT, SOCKET], check=False)
    assert verify.stdout + verify.stderr == ""
    assert verify.returncode == 0

    security = machine.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--no-pager",
            f"/lib/systemd/system/{AGENT}",
        ],
        check=False,
    ).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security)
    assert found, security
    assert float(found.group(1)) <= MAX_EXPOSURE, security


def test_boots_to_active_running_with_status(new_machine: NewMachine) -> None:
    machine, port = boot_installed(new_machine)

    pid = wait_running(machine)

    assert status_text(machine).startswith("serving"), status_text(machine)
    status = machine.run(["systemctl", "status", "--no-pager", "--lines=5", AGENT], check=False)
    assert "Active: active (running)" in status.stdout, status.stdout
    assert 'Status: "serving' in status.stdout, status.stdout
    assert SOCKET in status.stdout  # TriggeredBy: the socket unit
    # Not root: its own user, with the socket the units promise.
    assert machine.run(["stat", "--format=%U", f"/proc/{pid}"]).stdout.strip() == "azaion-loader"
    sock = machine.run(["stat", "--format=%a %U %G", SOCKET_PATH]).stdout.split()
    assert sock == ["660", "azaion-loader", "azaion-loader"]
    # Operators' and local apps' ways in: the CLI over the socket, HTTP on loopback.
    cli = machine.run(["azaion-loader", "status"], check=False)
    assert cli.returncode == 2, cli.stderr  # serving; no archive, so the images are locked
    assert cli.stdout.startswith("azaion-loader "), cli.stdout
    code, body = http_get(port, "/health")
    assert code == 200, body


def test_socket_activation_starts_the_agent(new_machine: NewMachine) -> None:
    machine, port = boot_installed(new_machine)
    wait_running(machine)
    machine.run(["systemctl", "stop", AGENT])
    assert show(machine, AGENT, "ActiveState")["ActiveState"] == "inactive"
    assert show(machine, SOCKET, "ActiveState")["ActiveState"] == "active"

    # A client connecting while the agent is down waits; systemd starts the agent for it.
    code, _ = http_get(port, "/health")
    cli = machine.run(["azaion-loader", "status"], check=False)

    assert code == 200
    assert cli.returncode == 2, cli.stderr  # it answered: serving, images locked
    wait_running(machine)


def test_stop_is_clean_and_quick(new_machine: NewMachine) -> None:
    machine, _ = boot_installed(new_machine)
    wait_running(machine)

    started = time.monotonic()
    machine.run(["systemctl", "stop", AGENT])
    took = time.monotonic() - started

    assert took < QUICK_STOP, f"systemctl stop took {took:.1f} s"
    result = show(machine, AGENT, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert result == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: it exited by itself, was not killed
        "ExecMainStatus": "0",
    }
    journal = machine.journal(AGENT)
    assert re.search(r"azaion-loader\[\d+\]: stopped$", journal, re.M), journal
    assert "SIGKILL" not in journal and "timed out" not in journal, journal


def test_sigkill_is_restarted_by_systemd(new_machine: NewMachine) -> None:
    machine, _ = boot_installed(new_machine)
    first = wait_running(machine)

    # From outside systemd, like a crash (minbase has no kill binary: the shell's builtin).
    machine.run(["sh", "-c", f"kill -KILL {first}"])

    def restarted() -> str | None:
        pid = show(machine, AGENT, "MainPID")["MainPID"]
        return pid if pid not in ("0", first) else None

    wait_for(restarted, START_TIMEOUT, "systemd to restart the killed agent")
    wait_running(machine)
    assert int(show(machine, AGENT, "NRestarts")["NRestarts"]) >= 1
    assert "status=9/KILL" in machine.journal(AGENT)


def test_watchdog_restarts_a_blocked_event_loop(new_machine: NewMachine) -> None:
    machine = new_machine()
    use_port(machine, free_port())
    # The agent's debug-only hook: SIGUSR2 blocks its event loop (no WATCHDOG=1 any more).
    agent_dropin(
        machine,
        "watchdog-test",
        f"[Service]\nEnvironment=LOADER_DEBUG_BLOCK_LOOP_ON_SIGUSR2=1\nWatchdogSec={TEST_WATCHDOG}\n",
    )
    machine.boot()
    first = wait_running(machine)

    machine.run(["systemctl", "kill", "--kill-who=main", "--signal=SIGUSR2", AGENT])

    def watchdog_fired() -> bool:
        return "Watchdog timeout" in machine.journal(AGENT)

    wait_for(watchdog_fired, START_TIMEOUT, "systemd's watchdog to fire")
    second = wait_running(machine)
    assert second != first
    assert int(show(machine, AGENT, "NRestarts")["NRestarts"]) >= 1


def test_encrypted_credentials_reach_the_agent(new_machine: NewMachine, dev_api: DevApi) -> None:
    """The TPM-bound way of operations.md, with the host key standing in for a TPM."""
    machine, _ = boot_installed(new_machine)
    machine.write("/etc/azaion-loader/loader.env", f"RESOURCE_API_URL={dev_api.url}\n")
    for name, value in (("email", dev_api.email), ("password", dev_api.password)):
        machine.run(
            ["systemd-creds", "encrypt", f"--name={name}", "--with-key=host", "-", cred(name)],
            input=value,
        )
    agent_dropin(
        machine,
        "credentials",
        "[Service]\nLoadCredential=\n"
        f"LoadCredentialEncrypted=email:{cred('email')}\n"
        f"LoadCredentialEncrypted=password:{cred('password')}\n",
    )
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "restart", AGENT])
    wait_running(machine)
    machine.write("/root/model.bin", b"weights" * 1000)

    # Uploading logs the agent in with what systemd decrypted for it.
    machine.run(["azaion-loader", "upload", "/root/model.bin", "--folder", "models"])

    status = machine.run(["azaion-loader", "status", "--json"], check=False).stdout  # 2: locked
    assert '"authenticated": true' in status, status
    assert dev_api.password not in machine.journal(AGENT)


def cred(name: str) -> str:
    return f"/etc/azaion-loader/credentials/{name}.cred"


# -- the unlock at boot, and the offline reboot -----------------------------------------------


def published_archive(dockerd: Dockerd, dev_api: DevApi, directory: Path) -> tuple[str, str, Path]:
    """What a publisher makes: a one-image archive for dev-api's key fragment (the image is then
    removed from the engine, so the unlock really loads it). Returns (ref, image id, archive)."""
    ref = f"azaion/system-test-{time.time_ns() % 10**10}:1.0"
    image_id = import_image(dockerd.client, ref)
    archive = directory / "images.enc"
    with ImageEngine.connect(dockerd.host) as engine:
        pack_images(engine, [ref], archive, [dev_api.key_fragment])
    dockerd.client.images.remove(image_id, force=True)
    assert image_id not in dockerd.image_ids()
    return ref, image_id, archive


def provision(machine: Machine, dockerd: Dockerd, dev_api: DevApi, archive: Path) -> int:
    """What the image builder puts on a device before its first boot: the archive, the
    credentials, the settings; plus the test's engine at Docker's default path and a free
    loopback port. Returns the port."""
    machine.write("/opt/azaion/images.enc", archive.read_bytes())
    machine.write("/etc/azaion-loader/credentials/email", dev_api.email, mode=0o600)
    machine.write("/etc/azaion-loader/credentials/password", dev_api.password, mode=0o600)
    machine.write(
        "/etc/azaion-loader/loader.env",
        f"RESOURCE_API_URL={dev_api.url}\nAPI_VERSION={API_VERSION}\n",
    )
    share_engine(machine, dockerd)
    port = free_port()
    use_port(machine, port)
    return port


def share_engine(machine: Machine, dockerd: Dockerd) -> None:
    """The test's engine stands in for the device's: its socket, owned by the machine's docker
    group (as docker.io would make it), at Docker's default path."""
    socket_path = dockerd.daemon.socket_path
    shutil.chown(socket_path, group=group_id(machine, "docker"))
    machine.bind(socket_path, "/run/docker.sock")


def wait_ready(machine: Machine, timeout: float = UNLOCK_TIMEOUT) -> str:
    def ready() -> str | None:
        text = status_text(machine)
        if "error" in text:
            raise AssertionError(f"unlock failed: {text}\n{machine.journal(AGENT)}")
        return text if READY in text else None

    return wait_for(ready, timeout, "the agent to report its images ready")


def assert_unlocked(dockerd: Dockerd, ref: str, image_id: str) -> None:
    assert image_id in dockerd.image_ids()
    assert str(dockerd.client.images.get(f"{ref.split(':')[0]}:{API_VERSION}").id) == image_id


def test_unlocks_at_boot_then_ready_offline_after_reboot(
    new_machine: NewMachine, dockerd: Dockerd, dev_api: DevApi, tmp_path: Path
) -> None:
    ref, image_id, archive = published_archive(dockerd, dev_api, tmp_path)

    machine = new_machine()
    provision(machine, dockerd, dev_api, archive)

    machine.boot()
    wait_running(machine)
    wait_ready(machine)
    assert_unlocked(dockerd, ref, image_id)
    status = machine.run(["systemctl", "status", "--no-pager", AGENT], check=False).stdout
    assert "ready: 1 image loaded" in status, status
    cli = machine.run(["azaion-loader", "status"]).stdout
    assert "ready" in cli, cli

    # What lets it come back offline: the record of the loaded images, in its state directory.
    machine.run(["test", "-s", "/var/lib/azaion-loader/unlock.json"])
    dev_api.stop()
    machine.reboot()

    wait_running(machine)
    wait_ready(machine, START_TIMEOUT)
    assert "ready: 1 image loaded" in status_text(machine)


def group_id(machine: Machine, name: str) -> int:
    for line in (machine.root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise AssertionError(f"no group {name} in the machine")


# -- access by peer identity, under the shipped units -----------------------------------------

TCP_CLIENT = """
import http.client, sys
port, path, body = int(sys.argv[1]), sys.argv[2], sys.argv[3]
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
response = connection.getresponse()
data = response.read()
print(response.status, len(data), flush=True)
sys.stdout.buffer.write(data[:300])
"""


def test_peer_identity_decides_under_the_shipped_units(
    new_machine: NewMachine, dev_api: DevApi
) -> None:
    """The agent as its packaged user, its sockets handed over by systemd: a member of the
    azaion-loader group uploads (socket) and loads (TCP); another user is refused on TCP with
    403 and cannot open the socket (0660)."""
    machine, port = boot_installed(new_machine)
    machine.write("/etc/azaion-loader/credentials/email", dev_api.email, mode=0o600)
    machine.write("/etc/azaion-loader/credentials/password", dev_api.password, mode=0o600)
    machine.write("/etc/azaion-loader/loader.env", f"RESOURCE_API_URL={dev_api.url}\n")
    machine.run(["systemctl", "restart", AGENT])
    wait_running(machine)
    machine.run(["useradd", "--groups", "azaion-loader", "member"])
    machine.run(["useradd", "outsider"])
    machine.write("/srv/client.py", TCP_CLIENT)
    machine.write("/srv/model.bin", b"weights" * 1000)
    user = show(machine, AGENT, "MainPID")["MainPID"]
    owner = machine.run(["stat", "-c", "%U", f"/proc/{user}"]).stdout.strip()
    assert owner == "azaion-loader"

    def as_user(name: str, *command: str) -> subprocess.CompletedProcess[str]:
        return machine.run(["runuser", "-u", name, "--", *command], check=False)

    up = as_user("member", "azaion-loader", "upload", "/srv/model.bin", "--folder", "models")
    assert up.returncode == 0, up.stdout + up.stderr
    body = '{"folder": "models"}'
    load = as_user("member", "python3", "/srv/client.py", str(port), "/load/model.bin", body)
    assert load.stdout.startswith(f"200 {7000}"), load.stdout + load.stderr
    refused = as_user("outsider", "python3", "/srv/client.py", str(port), "/load/model.bin", body)
    assert refused.stdout.startswith("403 "), refused.stdout + refused.stderr
    assert '"forbidden"' in refused.stdout
    socket_refused = as_user("outsider", "azaion-loader", "status")
    assert socket_refused.returncode != 0 and "ermission" in socket_refused.stderr
    journal = machine.journal(AGENT)
    assert re.search(r"refused POST \"/load/model.bin\" from uid=\d+ .* over tcp", journal), journal


# -- failure modes end, visibly; the journal at true priorities --------------------------------


def journal_at(machine: Machine, priority: str) -> list[str]:
    """Our lines at ``priority`` or worse (``-u`` with ``-p`` and no cursor reads them all)."""
    out = machine.run(
        ["journalctl", "--no-pager", "-o", "cat", "-p", priority, "-u", AGENT], check=False
    ).stdout
    return [line for line in out.splitlines() if line and not line.startswith("-- ")]


def starts_of(machine: Machine) -> int:
    """How many times systemd started the agent's process (one 'invalid setting' line each)."""
    return sum("invalid setting" in line for line in journal_at(machine, "info"))


def test_a_bad_setting_ends_failed_with_the_reason_and_no_start_loop(
    new_machine: NewMachine,
) -> None:
    machine, port = boot_installed(new_machine)
    wait_running(machine)
    machine.run(["systemctl", "stop", AGENT])
    machine.write("/etc/azaion-loader/loader.env", "LOADER_HTTP_PORT=abc\n")
    # A client connects to the (still listening) socket: that starts the agent, which cannot.
    began = time.monotonic()
    client = socket.create_connection(("127.0.0.1", port), timeout=15)
    client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        answer = client.recv(4096)  # the connection is closed (b"" or a reset), not left hanging
    except ConnectionResetError:
        answer = b""
    finally:
        client.close()
    assert answer == b"" and time.monotonic() - began < 10

    def both_failed() -> bool:
        states = [show(machine, unit, "ActiveState")["ActiveState"] for unit in (AGENT, SOCKET)]
        return states == ["failed", "failed"]

    wait_for(both_failed, 10, "the agent and its socket to end failed")
    assert time.monotonic() - began < 15
    starts = starts_of(machine)
    assert 1 <= starts <= 6, machine.journal(AGENT)
    time.sleep(3)  # a polling period: no more starts come after the end
    assert starts_of(machine) == starts
    status = machine.run(["systemctl", "status", "--no-pager", "-n", "10", AGENT], check=False)
    assert "invalid setting LOADER_HTTP_PORT" in status.stdout, status.stdout
    errors = journal_at(machine, "err")
    assert any("invalid setting LOADER_HTTP_PORT" in line for line in errors), errors


def test_transient_faults_keep_the_agent_running_and_retrying(
    new_machine: NewMachine, dev_api: DevApi, tmp_path: Path
) -> None:
    machine, _ = boot_installed(new_machine)
    archive = tmp_path / "images.enc"
    encryptor = stream.Encryptor([dev_api.key_fragment])
    archive.write_bytes(encryptor.update(b"x") + encryptor.finalize())
    machine.write("/opt/azaion/images.enc", archive.read_bytes())
    machine.write("/etc/azaion-loader/credentials/email", dev_api.email, mode=0o600)
    machine.write("/etc/azaion-loader/credentials/password", dev_api.password, mode=0o600)
    # Nothing listens there: the network is "down" for the agent.
    machine.write(
        "/etc/azaion-loader/loader.env", f"RESOURCE_API_URL=http://127.0.0.1:{free_port()}\n"
    )
    machine.run(["systemctl", "restart", AGENT])
    pid = wait_running(machine)
    wait_for(lambda: "waiting for network" in status_text(machine), 30, "the agent to retry")
    # "attempt N" shows only while the agent waits between tries, and a jittered pause may be
    # a few milliseconds: look for any N >= 3 (the count only grows while the network is down).
    wait_for(lambda: _attempt_shown(status_text(machine)) >= 3, 60, "a third attempt")
    assert show(machine, AGENT, "MainPID")["MainPID"] == pid
    assert show(machine, AGENT, "NRestarts")["NRestarts"] == "0"
    assert show(machine, AGENT, "ActiveState")["ActiveState"] == "active"


def _attempt_shown(status: str) -> int:
    match = re.search(r"\(attempt (\d+)\)", status)
    return int(match[1]) if match else 0


def test_a_healthy_boot_logs_nothing_at_err_and_status_is_utf8(
    new_machine: NewMachine,
) -> None:
    machine = new_machine()
    use_port(machine, free_port())
    path = "/opt/azaion/образы 🚀.enc"
    machine.write("/etc/azaion-loader/loader.env", f"IMAGES_PATH={path}\n")
    machine.boot()
    wait_running(machine)
    wait_for(lambda: path in status_text(machine), 30, "STATUS= to name the archive path")
    assert f"no images archive at {path}" in status_text(machine)
    pid = show(machine, AGENT, "MainPID")["MainPID"]
    limits = machine.run(["cat", f"/proc/{pid}/limits"]).stdout
    assert re.search(r"Max core file size\s+0\s+0", limits), limits  # LimitCORE=0
    assert journal_at(machine, "err") == []
    assert "образы 🚀" in "\n".join(journal_at(machine, "info"))
