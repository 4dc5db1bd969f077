"""The package where devices are made and kept: arm64 under qemu, images built in a plain chroot,
Debian 12 and 13, the release upgrade between them, and the upgrade from the field's 0.1.0.

Each root file system is debootstrapped once and cached (``machine.base_rootfs``); the package
is installed into a copy (an overlay) the way an image builder does it, ``chroot ROOT dpkg -i``
with nothing mounted, and that copy is kept as a read-only layer that the tests boot copies of.
An archive packed on the host (the format is the same for every architecture) is unlocked into
the test's own Docker engine, whose socket the machine gets at Docker's default path, with the
key fragment from a dev-api on host loopback (the containers share the host's network).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from azaion_loader_dev.harness.agent import free_port, wait_for
from tests.fixtures.devapi import DevApi
from tests.fixtures.dockerd import Dockerd
from tests.system.conftest import build_deb
from tests.system.machine import Machine, missing, native_arch, require
from tests.system.test_system import (
    AGENT,
    SOCKET,
    assert_unlocked,
    http_get,
    provision,
    published_archive,
    show,
    use_port,
    wait_ready,
    wait_running,
)
from tests.vectors import generate

pytestmark = pytest.mark.system

NewMachine = Callable[..., Machine]
REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors"
# The agent's STATUS= once the archive (one image in every test here) is unlocked.
# Emulated arm64 is 5 to 10 times slower: building the environment, starting Python.
EMULATED_INSTALL_TIMEOUT = 900.0
EMULATED_TIMEOUT = 300.0
NATIVE_INSTALL_TIMEOUT = 300.0
# systemd's exit status when a unit's LoadCredential= cannot be set up, and its log line.
EXIT_CREDENTIALS = "243"
CREDENTIALS_FAILURE = "status=243/CREDENTIALS"
# systemd's "unit started" journal message (SD_MESSAGE_UNIT_STARTED).
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"
ERROR_LINE = re.compile(r"\berror\b", re.I)
STATE_DIRS = (
    "/var/lib/azaion-loader",
    "/var/cache/azaion-loader",
    "/etc/azaion-loader/credentials",
)


# -- the packages -----------------------------------------------------------------------------


def deb_field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def lintian_errors(deb: Path) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    result = subprocess.run(
        ["lintian", "--fail-on", "error", "--no-tag-display-limit", str(deb)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return [line for line in result.stdout.splitlines() if line.startswith("E:")], result


def python_tags(wheel: Path) -> tuple[str, str, str]:
    """(python, abi, platform) of a wheel's file name (the last three dash-separated fields)."""
    python, abi, platform = wheel.name.removesuffix(".whl").split("-")[-3:]
    return python, abi, platform


def machine_of(path: Path) -> tuple[str, str]:
    """What ``file`` and ``readelf -h`` say about one binary."""
    described = subprocess.run(
        ["file", "--brief", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    header = subprocess.run(
        ["readelf", "-h", str(path)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"^\s*Machine:\s*(.+)$", header, re.M)
    return described, found.group(1).strip() if found else header


def test_arm64_package_carries_aarch64_wheels_for_both_pythons(
    arm64_deb: Path, tmp_path: Path
) -> None:
    """The arm64 .deb, built on this amd64 host: arm64, a wheelhouse with every compiled
    dependency for Debian 12's CPython 3.11 and Debian 13's 3.13, and every shared object in
    it (and in the package) is AArch64 machine code."""
    require(missing("file", "readelf", "lintian"), "file binutils lintian")
    assert deb_field(arm64_deb, "Architecture") == "arm64"
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "--extract", str(arm64_deb), str(tree)], check=True)
    wheels = sorted(tree.rglob("*.whl"))
    assert wheels, "the package holds no wheels"

    compiled: dict[str, set[tuple[str, str]]] = {}
    for wheel in wheels:
        python, abi, platform = python_tags(wheel)
        assert "x86_64" not in platform and "amd64" not in platform, wheel.name
        if platform != "any":
            assert "aarch64" in platform, wheel.name
            compiled.setdefault(wheel.name.split("-")[0].lower(), set()).add((python, abi))
    for must in ("pydantic_core", "aiohttp", "cryptography"):
        assert must in compiled, f"no compiled {must} wheel: {sorted(compiled)}"
    # Each compiled dependency for both interpreters: a wheel for any CPython from 3.11 on
    # (stable ABI, or none), or one built for each of cp311 and cp313.
    for name, tags in compiled.items():
        stable = any(abi == "none" or (abi == "abi3" and python <= "cp311") for python, abi in tags)
        specific = {python for python, abi in tags if abi == python}
        assert stable or {"cp311", "cp313"} <= specific, f"{name}: {sorted(tags)}"

    objects = tmp_path / "objects"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if re.search(r"\.so(\.\d+)*$", member):
                    archive.extract(member, objects / wheel.name)
    binaries = sorted(p for p in objects.rglob("*") if p.is_file())
    binaries += [p for p in tree.rglob("*") if p.is_file() and is_elf(p)]
    assert len(binaries) >= 8, f"only {len(binaries)} shared objects in the wheels"
    foreign = []
    for binary in binaries:
        described, machine = machine_of(binary)
        if "ARM aarch64" not in described or "x86-64" in described or machine != "AArch64":
            foreign.append(f"{binary.relative_to(tmp_path)}: {described}; Machine: {machine}")
    assert foreign == [], "\n".join(foreign)

    errors, result = lintian_errors(arm64_deb)
    assert errors == [], "\n".join(errors)
    assert result.returncode == 0, result.stdout + result.stderr


def is_elf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == b"\x7fELF"


# -- images built in a plain chroot -----------------------------------------------------------


@dataclass
class Image:
    """A root file system with the package installed by ``chroot ROOT dpkg -i``."""

    suite: str
    arch: str
    layers: list[Path]  # topmost first: the install, then the debootstrap root
    install: subprocess.CompletedProcess[str]

    def assert_installed_cleanly(self) -> None:
        output = self.install.stdout + self.install.stderr
        assert self.install.returncode == 0, (
            f"chroot dpkg -i exited {self.install.returncode}:\n{output}"
        )
        errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
        assert errors == [], output


@pytest.fixture(scope="session")
def chroot_image(
    request: pytest.FixtureRequest, root_of: Callable[[str, str], Path]
) -> Iterator[Callable[[str, str], Image]]:
    """``chroot_image(suite, arch)``: the package installed into a copy of that root the way
    an image builder does it (nothing mounted), once per session, kept as a read-only layer."""
    made: dict[tuple[str, str], Image] = {}
    builders: list[Machine] = []

    def get(suite: str, arch: str) -> Image:
        if (suite, arch) not in made:
            root = root_of(suite, arch)
            deb: Path = request.getfixturevalue("deb_package" if arch == "amd64" else "arm64_deb")
            builder = Machine.create([root], prefix="al-chroot")
            builders.append(builder)
            timeout = NATIVE_INSTALL_TIMEOUT if arch == native_arch() else EMULATED_INSTALL_TIMEOUT
            install = builder.chroot_install(deb, timeout=timeout)
            made[suite, arch] = Image(suite, arch, [builder.freeze(), root], install)
        return made[suite, arch]

    yield get
    for builder in builders:
        builder.destroy()


def agent_python(machine: Machine) -> str:
    """The interpreter the running agent's process executes (``/proc/PID/exe``)."""
    pid = show(machine, AGENT, "MainPID")["MainPID"]
    assert pid != "0", "the agent is not running"
    return machine.run(["readlink", f"/proc/{pid}/exe"]).stdout.strip()


def tmpfiles_entries(machine: Machine) -> list[tuple[str, str, str, str, str]]:
    """(type, path, mode, user, group) of the ``d`` and ``f`` lines the package installed."""
    conf = machine.root / "usr/lib/tmpfiles.d/azaion-loader.conf"
    entries = []
    for line in conf.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in ("d", "f"):
            entries.append((fields[0], fields[1], fields[2], fields[3], fields[4]))
    assert entries, conf.read_text()
    return entries


def assert_as_tmpfiles_says(
    machine: Machine, look: Callable[[str], tuple[str, int, str, str] | None]
) -> None:
    """Each ``d``/``f`` path of the package's tmpfiles.d is there with its type, mode, owner."""
    wrong = []
    for kind, path, mode, user, group in tmpfiles_entries(machine):
        expected = ("directory" if kind == "d" else "file", int(mode, 8), user, group)
        found = look(path)
        if found != expected:
            wrong.append(f"{path}: {found or 'missing'}, not {expected}")
    assert wrong == [], "\n".join(wrong)


def stat_inside(machine: Machine, path: str) -> tuple[str, int, str, str] | None:
    """(type, mode, user, group) of ``path`` in the running machine."""
    found = machine.run(["stat", "--format=%F|%a|%U|%G", path], check=False)
    if found.returncode != 0:
        return None
    kind, mode, user, group = found.stdout.strip().split("|")
    return "directory" if kind == "directory" else "file", int(mode, 8), user, group


def stat_on_disk(machine: Machine, path: str) -> tuple[str, int, str, str] | None:
    """The same, read from the host in the stopped machine's root (names from its own files)."""
    target = machine.root / path.lstrip("/")
    if not target.exists():
        return None
    info = target.lstat()
    users, groups = (names_in(machine, table) for table in ("passwd", "group"))
    kind = "directory" if target.is_dir() else "file"
    mode = info.st_mode & 0o7777
    return kind, mode, users.get(info.st_uid, str(info.st_uid)), groups.get(info.st_gid, "?")


def names_in(machine: Machine, table: str) -> dict[int, str]:
    lines = (machine.root / "etc" / table).read_text().splitlines()
    return {int(fields[2]): fields[0] for fields in (line.split(":") for line in lines) if fields}


EXPECTED_PYTHON = {"bookworm": "python3.11", "trixie": "python3.13"}


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_image_built_in_a_chroot_boots_to_ready(
    suite: str,
    chroot_image: Callable[[str, str], Image],
    new_machine: NewMachine,
    dockerd: Dockerd,
    dev_api: DevApi,
    tmp_path: Path,
) -> None:
    """Debian 12 (Python 3.11) and 13 (Python 3.13), amd64: ``chroot ROOT dpkg -i`` with
    nothing mounted succeeds and says nothing of an error; the image builder adds the archive,
    credentials and settings; the first boot creates what tmpfiles.d says, with the user and
    the units in place, and the agent unlocks the archive, running on that Debian's Python."""
    image = chroot_image(suite, "amd64")
    image.assert_installed_cleanly()
    ref, image_id, archive = published_archive(dockerd, dev_api, tmp_path)
    machine = new_machine(layers=image.layers)
    # The postinst made the user and the directories in the chroot already (no /proc there).
    assert_as_tmpfiles_says(machine, lambda path: stat_on_disk(machine, path))
    port = provision(machine, dockerd, dev_api, archive)

    machine.boot()

    wait_running(machine)
    wait_ready(machine)
    assert_unlocked(dockerd, ref, image_id)
    code, _ = http_get(port, "/ready")
    assert code == 200
    assert agent_python(machine) == f"/usr/bin/{EXPECTED_PYTHON[suite]}"
    # The user and its groups, from the package's sysusers.d.
    passwd = machine.run(["getent", "passwd", "azaion-loader"]).stdout.split(":")
    assert int(passwd[2]) < 1000 and passwd[5] == "/var/lib/azaion-loader", passwd
    assert "docker" in machine.run(["id", "-nG", "azaion-loader"]).stdout.split()
    enabled = machine.run(["systemctl", "is-enabled", AGENT, SOCKET], check=False).stdout
    assert enabled.split() == ["enabled", "enabled"]
    # Owners and modes as the package's tmpfiles.d says.
    assert_as_tmpfiles_says(machine, lambda path: stat_inside(machine, path))
    failed = machine.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
    assert failed.strip() == "", failed


# -- arm64 under qemu -------------------------------------------------------------------------

# Run in the arm64 root: the stream vectors through the arm64 CLI, all at once (2 cores, and
# most of each run is Python starting up under emulation).
DECRYPT_VECTORS = """
cd /srv/work
for name in $(cat names); do
  (
    set --
    for key in $(cat "keys/$name.list"); do set -- "$@" --key-fragment "keys/$key"; done
    azaion-loader decrypt "$@" "vectors/$(cat "files/$name")" "out/$name" \\
      >"res/$name.out" 2>"res/$name.err"
    echo $? >"res/$name.rc"
  ) &
done
wait
"""


def vector_workdir(directory: Path) -> list[dict[str, Any]]:
    """A directory for DECRYPT_VECTORS: every positive vector and one negative vector of each
    error class, their key fragment files, and empty ``out/`` and ``res/``."""
    index = json.loads((VECTORS / generate.INDEX_NAME).read_text())
    chosen: list[dict[str, Any]] = []
    classes: set[str] = set()
    for vector in index["vectors"]:
        error = vector.get("error")
        if error is None or error not in classes:
            chosen.append(vector)
            if error:
                classes.add(error)
    for sub in ("keys", "files", "vectors", "out", "res"):
        (directory / sub).mkdir(parents=True)
    for vector in chosen:
        name = vector["name"]
        key_names = []
        for number, fragment in enumerate(vector["decrypt_fragments"]):
            key = directory / "keys" / f"{name}.{number}"
            key.write_text(fragment + "\n")
            key.chmod(0o600)
            key_names.append(key.name)
        (directory / "keys" / f"{name}.list").write_text("".join(f"{k}\n" for k in key_names))
        (directory / "files" / name).write_text(vector["file"])
        shutil.copyfile(VECTORS / vector["file"], directory / "vectors" / vector["file"])
    (directory / "names").write_text("".join(f"{v['name']}\n" for v in chosen))
    return chosen


def test_arm64_installs_in_a_plain_chroot_and_runs_under_qemu(
    chroot_image: Callable[[str, str], Image],
    new_machine: NewMachine,
    arm64_deb: Path,
    tmp_path: Path,
) -> None:
    """arm64 bookworm, as an image builder on an amd64 host makes it: ``chroot ROOT dpkg -i``
    of the arm64 .deb under qemu-user-static (the postinst builds the environment from the
    wheelhouse, emulated) exits 0 without an error line, and leaves the user and the
    directories of its tmpfiles.d in place. The arm64 code then runs (nspawn, not booted):
    ``azaion-loader --version``; the agent's interpreter is an aarch64 Python 3.11 that imports
    the compiled dependencies; ``azaion-loader decrypt`` of the stream test vectors (every
    positive one, one negative of each error class) gives the plaintexts, and the same exit
    codes and messages as the amd64 code here."""
    image = chroot_image("bookworm", "arm64")
    image.assert_installed_cleanly()
    work = tmp_path / "work"
    chosen = vector_workdir(work)
    machine = new_machine(layers=image.layers)
    # The user and directories come from the postinst here: under qemu the boot cannot make
    # them (systemd-sysusers and systemd-tmpfiles-setup fail, see the boot test below).
    assert_as_tmpfiles_says(machine, lambda path: stat_on_disk(machine, path))
    machine.write("/srv/decrypt-vectors.sh", DECRYPT_VECTORS)
    # The agent's own interpreter (its console script's #!), with its compiled dependencies.
    probe = (
        "azaion-loader --version && "
        '"$(sed -n "1s/^#!//p" /usr/bin/azaion-loader)" -c "'
        "import platform, sys, cryptography.hazmat.bindings._rust, pydantic_core, aiohttp; "
        'print(platform.machine(), *sys.version_info[:2])" && '
        "sh /srv/decrypt-vectors.sh"
    )

    result = machine.execute(
        ["sh", "-c", probe], [f"--bind={work}:/srv/work"], timeout=EMULATED_TIMEOUT
    )

    assert result.returncode == 0, result.stdout + result.stderr
    version, cpu = result.stdout.splitlines()[:2]
    assert version == f"azaion-loader {deb_field(arm64_deb, 'Version')}"
    assert cpu == "aarch64 3 11", cpu
    for vector in chosen:
        name = vector["name"]
        code = (work / "res" / f"{name}.rc").read_text().strip()
        message = (work / "res" / f"{name}.err").read_text()
        if "error" not in vector:
            assert code == "0", f"{name}: exit {code}: {message}"
            plaintext = (work / "out" / name).read_bytes()
            assert plaintext == generate.pattern(vector["plaintext_length"]), name
            continue
        expected = host_decrypt(work, name)
        assert (code, message) == (str(expected.returncode), expected.stderr), name
        assert code == "1" and message.startswith("azaion-loader: error: "), (name, message)
        assert not (work / "out" / name).exists(), name


def host_decrypt(work: Path, name: str) -> subprocess.CompletedProcess[str]:
    """The same decrypt, same relative paths, by this host's (amd64) code."""
    keys = (work / "keys" / f"{name}.list").read_text().split()
    options = [arg for key in keys for arg in ("--key-fragment", f"keys/{key}")]
    file = (work / "files" / name).read_text()
    return subprocess.run(
        [sys.executable, "-m", "agent", "decrypt", *options, f"vectors/{file}", f"out/{name}"],
        cwd=work,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_arm64_boots_under_qemu_and_unlocks_with_credentials_passed_another_way(
    chroot_image: Callable[[str, str], Image],
    new_machine: NewMachine,
    dockerd: Dockerd,
    dev_api: DevApi,
    tmp_path: Path,
) -> None:
    """The arm64 image from the chroot, provisioned like the amd64 ones, booted under
    ``systemd-nspawn --boot`` with every arm64 program emulated by qemu-user-static.

    What works: systemd (arm64) boots to the end (``degraded``); the package's units are
    enabled; the socket unit listens; and once a test-only drop-in takes the credentials out of
    ``LoadCredential=`` (giving them through an ``EnvironmentFile=`` instead), the agent starts
    under systemd with the package's unit otherwise unchanged (Type=notify, its user, the
    hardening), serves ``/health`` on loopback and unlocks the archive into the Docker engine:
    the arm64 code does the whole unlock.

    What does not work, and why: every unit with ``LoadCredential=`` fails at systemd's step
    CREDENTIALS (exit status 243, "Failed to set up credentials: Invalid argument"): the shipped
    ``azaion-loader.service``, and systemd's own ``systemd-sysusers``,
    ``systemd-tmpfiles-setup`` and ``systemd-tmpfiles-setup-dev`` (so at boot neither the
    sysusers nor the tmpfiles snippets are applied: the postinst must have made the user, and
    the directories the boot would create are whatever the image brought). The cause is the
    emulator, not the unit: qemu-user refuses the ``clone(CLONE_NEWNS)`` that systemd's
    credential setup forks with (a transient unit with only ``LoadCredential=`` fails the same
    way, checked here); on real arm64 hardware the shipped unit runs as on amd64. Seccomp is not
    enforced under qemu-user either, so this boot proves nothing about ``SystemCallFilter=``.
    """
    image = chroot_image("bookworm", "arm64")
    image.assert_installed_cleanly()
    ref, image_id, archive = published_archive(dockerd, dev_api, tmp_path)
    machine = new_machine(layers=image.layers)
    port = provision(machine, dockerd, dev_api, archive)

    machine.boot()

    state = machine.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state == "degraded", state
    enabled = machine.run(["systemctl", "is-enabled", AGENT, SOCKET], check=False).stdout
    assert enabled.split() == ["enabled", "enabled"]
    assert show(machine, SOCKET, "ActiveState")["ActiveState"] == "active"

    wait_for(
        lambda: failed_at_credentials(machine, AGENT),
        EMULATED_TIMEOUT,
        "the agent's start to fail at the credentials step",
    )
    assert show(machine, AGENT, "Result")["Result"] == "exit-code"
    assert CREDENTIALS_FAILURE in machine.journal(AGENT), machine.journal(AGENT)
    failed = machine.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
    failed_units = [line.split()[0] for line in failed.splitlines() if line.strip()]
    assert {"systemd-sysusers.service", "systemd-tmpfiles-setup.service"} <= set(failed_units)
    for unit in failed_units:
        assert failed_at_credentials(machine, unit), f"{unit} failed otherwise"
    # The emulator's limitation, not the unit's: credentials alone fail, nothing else does.
    bare = machine.run(["systemd-run", "--wait", "--collect", "--quiet", "true"], check=False)
    assert bare.returncode == 0, bare.stderr
    credential = "LoadCredential=x:/etc/hostname"
    probe = machine.run(
        ["systemd-run", "--wait", "--collect", "--quiet", "-p", credential, "true"], check=False
    )
    assert probe.returncode != 0, "LoadCredential= works under this qemu: test the shipped unit"

    machine.write(
        "/etc/azaion-loader/test-credentials.env",
        f"AZAION_EMAIL={dev_api.email}\nAZAION_PASSWORD={dev_api.password}\n",
        mode=0o600,
    )
    machine.write(
        f"/etc/systemd/system/{AGENT}.d/qemu-no-credentials.conf",
        "[Service]\nLoadCredential=\nEnvironmentFile=/etc/azaion-loader/test-credentials.env\n",
    )
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "reset-failed", AGENT])
    machine.run(["systemctl", "restart", AGENT], timeout=EMULATED_TIMEOUT)

    wait_running(machine, timeout=EMULATED_TIMEOUT)
    wait_ready(machine, timeout=EMULATED_TIMEOUT)
    assert_unlocked(dockerd, ref, image_id)
    code, body = http_get(port, "/health")
    assert code == 200, body
    cli = machine.run(["azaion-loader", "status"], check=False, timeout=EMULATED_TIMEOUT)
    assert cli.returncode == 0 and "ready" in cli.stdout, cli.stdout + cli.stderr
    assert "aarch64" in machine.run(["uname", "-m"]).stdout


def failed_at_credentials(machine: Machine, unit: str) -> bool:
    """Whether ``unit``'s last start ended with systemd's exit status 243 (CREDENTIALS), in its
    main process or its ExecStartPre= (the status, not the journal: units that fail before
    journald runs leave no line there)."""
    found = show(machine, unit, "ExecMainStatus", "ExecStartPre")
    return found["ExecMainStatus"] == EXIT_CREDENTIALS or (
        f"status={EXIT_CREDENTIALS}" in found.get("ExecStartPre", "")
    )


# -- Debian 12 -> 13 --------------------------------------------------------------------------


CACHE_INDEX = "/var/cache/azaion-loader/.index.json"


def snapshot(machine: Machine) -> dict[str, str]:
    """Every file under the agent's state, cache and credentials: owner, mode and content;
    but the cache's index, its own record of which part was used last (written as loads use
    parts, and remade from the files when missing), which the agent changes by design."""
    listing = machine.run(
        ["find", *STATE_DIRS, "-printf", "%p %u:%g %m %y\n"], check=False
    ).stdout.splitlines()
    sums = machine.run(["find", *STATE_DIRS, "-type", "f", "-exec", "sha256sum", "{}", "+"])
    digests = {line.split()[1]: line.split()[0] for line in sums.stdout.splitlines()}
    return {
        line.split()[0]: " ".join(line.split()[1:]) + " " + digests.get(line.split()[0], "")
        for line in listing
        if not line.startswith(CACHE_INDEX + " ")
    }


def apt(machine: Machine, arguments: str, timeout: float = 900.0) -> str:
    """An apt-get run inside the machine, non-interactive, keeping changed configuration."""
    options = "-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
    command = f"DEBIAN_FRONTEND=noninteractive apt-get {options} {arguments}"
    return machine.run(["sh", "-c", command], timeout=timeout).stdout


def test_release_upgrade_12_to_13_keeps_the_agent_ready_offline(
    chroot_image: Callable[[str, str], Image],
    new_machine: NewMachine,
    dockerd: Dockerd,
    dev_api: DevApi,
    tmp_path: Path,
) -> None:
    """A running Debian 12 device, package installed and unlocked, upgraded to Debian 13 the
    way an operator does it, in the booted machine: apt sources to trixie, ``apt-get update``,
    ``apt-get dist-upgrade`` (from the Debian mirror: needs the network), then, as on a system
    installed normally rather than by debootstrap, Python 3.11 is autoremoved. The package
    stays installed, and its trigger on /usr/bin/python3 has already moved the running agent
    onto an environment on Python 3.13. Then a reboot with the Resource API gone: the agent is
    ready from its unlock record, on Python 3.13, its state, cache and credentials as they
    were. (All of it in the booted machine: a dist-upgrade runs fine under a booted nspawn.)"""
    image = chroot_image("bookworm", "amd64")
    image.assert_installed_cleanly()
    ref, image_id, archive = published_archive(dockerd, dev_api, tmp_path)
    machine = new_machine(layers=image.layers)
    provision(machine, dockerd, dev_api, archive)
    machine.boot()
    wait_running(machine)
    wait_ready(machine)
    assert agent_python(machine) == "/usr/bin/python3.11"
    before = snapshot(machine)
    version = installed_version(machine)

    machine.run(["sed", "-i", "s/bookworm/trixie/g", "/etc/apt/sources.list"])
    apt(machine, "update")
    upgrade = apt(machine, "dist-upgrade")
    python311 = "python3.11 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib"
    machine.run(["sh", "-c", f"apt-mark auto {python311}"])
    apt(machine, "autoremove --purge")

    assert installed_version(machine) == version, upgrade
    assert machine.root.joinpath("etc/debian_version").read_text().startswith("13"), upgrade
    assert not machine.root.joinpath("usr/bin/python3.11").exists()
    # The package's trigger on /usr/bin/python3 rebuilt the environment during the upgrade and
    # moved the running agent onto it: no reboot needed for that.
    wait_running(machine)
    assert agent_python(machine) == "/usr/bin/python3.13", upgrade
    wait_ready(machine)
    dev_api.stop()
    machine.reboot()

    wait_running(machine)
    wait_ready(machine, timeout=60)
    assert agent_python(machine) == "/usr/bin/python3.13"
    assert snapshot(machine) == before
    assert_unlocked(dockerd, ref, image_id)
    cli = machine.run(["azaion-loader", "status"])
    assert "ready" in cli.stdout, cli.stdout
    failed = machine.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
    assert AGENT not in failed and SOCKET not in failed, failed


def installed_version(machine: Machine) -> str:
    """The package's version when dpkg has it installed and configured."""
    out = machine.run(
        ["dpkg-query", "--show", "--showformat=${Status}|${Version}", "azaion-loader"], check=False
    ).stdout
    status, _, version = out.partition("|")
    assert status == "install ok installed", out
    return version


# -- package upgrade from the field's 0.1.0 ---------------------------------------------------


def starts(machine: Machine) -> list[str]:
    """The agent's starts, from the whole journal read as it is (no -u/-p/cursor filtering):
    systemd's "Started" messages for the unit, with each start's invocation id."""
    out = machine.run(["journalctl", "--no-pager", "--output=json"], timeout=60).stdout
    found = []
    for line in out.splitlines():
        entry = json.loads(line)
        if entry.get("MESSAGE_ID") == UNIT_STARTED and entry.get("UNIT") == AGENT:
            found.append(entry.get("INVOCATION_ID", ""))
    return found


def agent_version(machine: Machine) -> str:
    return machine.run(["azaion-loader", "--version"]).stdout.strip()


def test_upgrade_from_the_field_release_keeps_everything_and_restarts_once(
    new_machine: NewMachine,
    deb_package: Path,
    old_deb: Path,
    dockerd: Dockerd,
    dev_api: DevApi,
    tmp_path: Path,
) -> None:
    """A device of the field: 0.1.0 (the whole environment shipped as dpkg's files under
    /opt/azaion-loader) installed on its image, unlocked at boot, a resource loaded into its
    cache. ``dpkg -i`` of the new package on the running device: the agent is restarted exactly
    once, onto the new version, ready again; state, cache and credentials are untouched; dpkg's
    own record of the files is intact; a reboot with the Resource API gone comes back ready.
    Then a downgrade to 0.1.0 is safe: dpkg cannot refuse it (0.1.0's own maintainer scripts
    accept any upgrade), so 0.1.0 must come back working from the same state."""
    new_version = deb_field(deb_package, "Version")
    old_version = deb_field(old_deb, "Version")
    assert dpkg_newer(new_version, old_version), (new_version, old_version)
    ref, image_id, archive = published_archive(dockerd, dev_api, tmp_path)
    machine = new_machine(installed=False)
    installed = machine.install_offline(old_deb)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    provision(machine, dockerd, dev_api, archive)
    machine.write("/root/new.deb", deb_package.read_bytes())
    machine.write("/root/old.deb", old_deb.read_bytes())
    machine.write("/root/model.bin", b"weights" * 5000)
    machine.boot()
    wait_running(machine)
    wait_ready(machine)
    assert agent_version(machine) == f"azaion-loader {old_version}"
    machine.run(["azaion-loader", "upload", "/root/model.bin", "--folder", "models"])
    machine.run(["azaion-loader", "load", "model.bin", "--folder", "models", "-o", "/root/a"])
    before = snapshot(machine)
    assert any(path.startswith("/var/cache/azaion-loader/") for path in before), before
    assert "/var/lib/azaion-loader/unlock.json" in before, before
    started = starts(machine)
    assert len(started) == 1, started

    upgrade = machine.run(["dpkg", "--install", "/root/new.deb"], timeout=300)

    assert installed_version(machine) == new_version, upgrade.stdout
    wait_running(machine)
    wait_ready(machine, timeout=60)
    assert agent_version(machine) == f"azaion-loader {new_version}"
    after = starts(machine)
    assert len(after) == 2 and after[0] == started[0], (started, after)
    current = show(machine, AGENT, "InvocationID", "NRestarts")
    assert current == {"InvocationID": after[1], "NRestarts": "0"}, (current, after)
    assert snapshot(machine) == before
    verify = machine.run(["dpkg", "--verify", "azaion-loader"], check=False).stdout
    changed = [line for line in verify.splitlines() if " c /" not in line]  # conffiles may differ
    assert changed == [], verify
    dev_api.stop()
    machine.reboot()
    wait_running(machine)
    wait_ready(machine, timeout=60)
    assert snapshot(machine) == before
    assert_unlocked(dockerd, ref, image_id)

    downgrade = machine.run(["dpkg", "--install", "/root/old.deb"], check=False, timeout=300)

    assert downgrade.returncode == 0, downgrade.stdout + downgrade.stderr
    assert installed_version(machine) == old_version
    wait_running(machine)
    wait_ready(machine, timeout=60)
    assert agent_version(machine) == f"azaion-loader {old_version}"
    assert snapshot(machine) == before


def dpkg_newer(first: str, second: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", first, "gt", second]).returncode == 0


@pytest.fixture(scope="session")
def newer_deb(tmp_path_factory: pytest.TempPathFactory, deb_package: Path) -> Path:
    """The same package as the next patch version (``build-deb.sh --version``)."""
    *head, patch = deb_field(deb_package, "Version").split(".")
    newer = ".".join([*head, str(int(patch) + 1)])
    return build_deb(tmp_path_factory.mktemp("deb-newer"), "--version", newer)


def test_downgrade_between_wheelhouse_releases_is_refused_unless_allowed(
    new_machine: NewMachine, deb_package: Path, newer_deb: Path
) -> None:
    """From 0.2.0 on a downgrade is refused, in one sentence, and changes nothing (the newer
    agent keeps running, not even restarted): an older agent may not read the state a newer one
    wrote. ``AZAION_LOADER_ALLOW_DOWNGRADE=1`` in dpkg's environment lets it through."""
    older, newer = deb_field(deb_package, "Version"), deb_field(newer_deb, "Version")
    machine = new_machine(installed=False)
    use_port(machine, free_port())
    machine.write("/root/older.deb", deb_package.read_bytes())
    machine.write("/root/newer.deb", newer_deb.read_bytes())
    machine.boot()
    machine.run(["dpkg", "--install", "/root/newer.deb"], timeout=300)
    wait_running(machine)
    running = show(machine, AGENT, "InvocationID", "ActiveState")

    refused = machine.run(["dpkg", "--install", "/root/older.deb"], check=False, timeout=300)

    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert f"downgrading from {newer} to {older} is refused" in refused.stderr, refused.stderr
    assert installed_version(machine) == newer
    assert show(machine, AGENT, "InvocationID", "ActiveState") == running
    assert agent_version(machine) == f"azaion-loader {newer}"

    allow = "AZAION_LOADER_ALLOW_DOWNGRADE=1 dpkg --install /root/older.deb"
    machine.run(["sh", "-c", allow], timeout=300)

    assert installed_version(machine) == older
    wait_running(machine)
    assert agent_version(machine) == f"azaion-loader {older}"
