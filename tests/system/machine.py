"""A real systemd in a container: the boot harness of the system tests.

- ``base_rootfs(suite, arch)``: a minimal Debian root file system (bookworm amd64 unless asked
  for another suite or architecture) made by ``debootstrap`` once and cached on the machine
  (``/var/cache/azaion-loader-test/rootfs-<suite>-<arch>-<key>``, the key a hash of suite,
  architecture, variant, mirror and package list); later runs reuse it. Never written to: every
  machine is an overlay on top of it. Another architecture's root (arm64 on an amd64 host) is
  made and run under qemu-user-static, registered with the kernel by ``binfmt.ensure``.
- ``Machine``: one container. ``boot()`` runs ``systemd-nspawn --boot`` (systemd as PID 1),
  ``run()`` executes a command inside with ``nsenter`` into the leader's namespaces,
  ``reboot()`` / ``poweroff()`` go through systemd itself, ``destroy()`` cleans everything up.
- ``install_offline()`` installs a .deb into a stopped machine (``systemd-nspawn`` without
  ``--boot``, as on an image being prepared); ``chroot()`` / ``chroot_install()`` do what an
  image builder does instead: plain ``chroot``, nothing mounted (no /proc, /sys, /dev, /run);
  ``execute()`` runs a command in the stopped machine under ``systemd-nspawn`` without
  ``--boot`` (/proc and /sys mounted, no init); ``freeze()`` turns a stopped machine's changes
  into a read-only layer that other machines start from.

This host may not run systemd as PID 1 (a CI VM whose init is something else): then there is no
unit to keep, so each container gets a cgroup of its own made here, and ``--keep-unit`` with
``--register=no`` keeps nspawn from asking a systemd that is not there. With systemd as PID 1,
``systemd-run --scope`` gives it its unit instead.

The containers share the host's network namespace (no ``--private-network``): the agent inside
reaches a dev-api on the host over loopback, as the issue asks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from azaion_loader_dev.harness.agent import wait_for as wait_for
from azaion_loader_dev.harness.process import log_tail
from tests.system import binfmt

SUITE = "bookworm"
VARIANT = "minbase"
# What the package needs from the system (see packaging/debian/control.in) plus a booting init.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_DIR = Path(os.environ.get("LOADER_TEST_ROOTFS_CACHE", "/var/cache/azaion-loader-test"))
WORK_PARENT = Path(os.environ.get("LOADER_TEST_MACHINES_DIR", "/var/tmp"))
TOOLS = ("systemd-nspawn", "debootstrap", "nsenter", "mount", "umount")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_GROUP = "azaion-loader-test"

BOOT_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 60.0
COMMAND_TIMEOUT = 120.0
DEBOOTSTRAP_TIMEOUT = 1200.0
# `systemctl reboot` inside a container makes nspawn exit with this status.
EXIT_REBOOT = 133
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
    "TERM": "dumb",
}


def require(problems: Sequence[str], install: str) -> None:
    """Skip (or, under CI=true, fail) when anything is in ``problems``."""
    if not problems:
        return
    message = f"{'; '.join(problems)} (apt-get install {install})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def missing(*tools: str) -> list[str]:
    return [f"{tool} is missing" for tool in tools if shutil.which(tool) is None]


def require_tools() -> None:
    """Skip (or, under CI=true, fail) unless this machine can boot containers."""
    problems = missing(*TOOLS)
    if os.geteuid() != 0:
        problems.append("booting containers needs root")
    require(problems, "systemd-container debootstrap")


def require_deb_build_tools() -> None:
    """What packaging/build-deb.sh needs: Debian's python3 with venv, dpkg-dev, binutils."""
    problems = missing("dpkg-deb", "dpkg-shlibdeps", "strip")
    venv = subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True)
    if venv.returncode != 0:
        problems.append("/usr/bin/python3 cannot make a virtual environment")
    require(problems, "python3-venv dpkg-dev binutils")


# -- the cached root file system --------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (it is reachable from here), else the default.

    It serves every suite and architecture of the archive, whichever the host itself runs."""
    configured = os.environ.get("LOADER_TEST_DEBIAN_MIRROR")
    if configured:
        return configured
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    sources += [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]
    for path in sources:
        with contextlib.suppress(OSError):
            mirror = _mirror_in(path.read_text(errors="replace"))
            if mirror:
                return mirror
    return DEFAULT_MIRROR


def _mirror_in(text: str) -> str | None:
    """The first URI serving Debian's main suite (not -security) in a sources file."""
    one_line = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", text, re.M)
    if one_line and "security" not in one_line.group(1):
        return one_line.group(1)
    for stanza in re.split(r"\n\s*\n", text):
        uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
        suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
        if uris and suites and SUITE in suites.group(1).split() and "security" not in uris[1]:
            return uris.group(1)
    return None


def native_arch() -> str:
    """This host's Debian architecture (amd64 on the CI machines)."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def rootfs_key(
    mirror: str, packages: Sequence[str] = PACKAGES, suite: str = SUITE, arch: str = "amd64"
) -> str:
    recipe = "|".join([suite, arch, VARIANT, mirror, ",".join(sorted(packages))])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def rootfs_path(
    packages: Sequence[str] = PACKAGES, suite: str = SUITE, arch: str | None = None
) -> Path:
    """Where ``base_rootfs`` keeps (or will keep) this root file system."""
    arch = arch or native_arch()
    key = rootfs_key(debian_mirror(), packages, suite, arch)
    return CACHE_DIR / f"rootfs-{suite}-{arch}-{key}"


def require_foreign(arch: str) -> None:
    """Skip (or, under CI=true, fail) unless ``arch``'s programs can run here (qemu-user)."""
    require(binfmt.problems(arch), "qemu-user-static")


def base_rootfs(
    packages: Sequence[str] = PACKAGES, suite: str = SUITE, arch: str | None = None
) -> Path:
    """The cached root file system of ``suite`` for ``arch``, made by debootstrap on first use."""
    arch = arch or native_arch()
    if arch != native_arch():
        binfmt.ensure(arch)  # debootstrap runs the new root's maintainer scripts in it
    target = rootfs_path(packages, suite, arch)
    if (target / ".complete").exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "lock").open("w") as lock:
        # Another test session may be bootstrapping the same root file system right now.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _debootstrap(target, debian_mirror(), packages, suite, arch)
    return target


def _debootstrap(target: Path, mirror: str, packages: Sequence[str], suite: str, arch: str) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log = CACHE_DIR / f"{target.name}.log"
    command = [
        "debootstrap",
        f"--arch={arch}",
        f"--variant={VARIANT}",
        f"--include={','.join(packages)}",
        suite,
        str(partial),
        mirror,
    ]
    with log.open("wb") as out:
        result = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"debootstrap failed ({result.returncode}); {log}:\n{tail}")
    # Containers boot it, they do not install it: apt's downloads are dead weight.
    for leftover in (partial / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()
    (partial / ".complete").write_text(" ".join(command) + "\n")
    partial.rename(target)


# -- cgroups: give each container a unit-like place of its own ---------------------------------


def _host_runs_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _cgroup_hierarchies() -> list[Path]:
    """Where a process's cgroup must be set for nspawn: unified, or hybrid (name=systemd)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [path for path in (CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified") if path.is_dir()]


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir():
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


# -- one container ----------------------------------------------------------------------------


@dataclass
class Machine:
    """One container on an overlay of read-only layers (the base root file system first)."""

    name: str
    workdir: Path
    layers: list[Path]
    binds: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    boots: int = 0

    @classmethod
    def create(cls, layers: Sequence[Path], prefix: str = "al") -> Machine:
        """A stopped machine whose root is an overlay: ``layers`` (topmost first) + its own."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        WORK_PARENT.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=WORK_PARENT))
        machine = cls(name=name, workdir=workdir, layers=list(layers))
        for sub in ("upper", "work", "root"):
            (workdir / sub).mkdir()
        lower = ":".join(str(layer) for layer in machine.layers)
        options = f"lowerdir={lower},upperdir={workdir / 'upper'},workdir={workdir / 'work'}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(machine.root)],
            check=True,
            capture_output=True,
        )
        return machine

    @property
    def root(self) -> Path:
        """The machine's file system as seen from the host (write files into it from here)."""
        return self.workdir / "root"

    @property
    def upper(self) -> Path:
        return self.workdir / "upper"

    @property
    def log_path(self) -> Path:
        return self.workdir / "console.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def bind(self, source: Path, target: str, read_only: bool = False) -> None:
        """Bind-mount a host path into the machine from its next boot on."""
        flag = "--bind-ro" if read_only else "--bind"
        self.binds.append(f"{flag}={source}:{target}")

    # -- files, from the host ------------------------------------------------------------------

    def write(self, path: str, text: str | bytes, mode: int = 0o644) -> Path:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode() if isinstance(text, str) else text
        target.write_bytes(data)
        target.chmod(mode)
        return target

    # -- lifecycle -----------------------------------------------------------------------------

    def _command(self, boot: bool, extra: Sequence[str]) -> list[str]:
        command = [
            "systemd-nspawn",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--quiet",
            *self.binds,
        ]
        if boot:
            command += ["--boot", "--console=read-only"]
        command += list(extra)
        if _host_runs_systemd():
            return ["systemd-run", "--scope", "--quiet", f"--unit={self.name}", *command]
        return command

    def _enter_own_cgroup(self) -> None:
        """Runs in the child before exec: move it into a fresh cgroup named after the machine."""
        for hierarchy in _cgroup_hierarchies():
            group = hierarchy / CGROUP_GROUP / self.name
            group.mkdir(parents=True, exist_ok=True)
            (group / "cgroup.procs").write_text(str(os.getpid()))

    def _spawn(self, command: list[str], out: Any) -> subprocess.Popen[bytes]:
        preexec = None if _host_runs_systemd() else self._enter_own_cgroup
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )

    def install_offline(self, deb: Path) -> subprocess.CompletedProcess[str]:
        """``dpkg -i`` into the stopped machine (no systemd running), as on an image."""
        inside = f"/tmp/{deb.name}"
        return self.execute(["dpkg", "--install", inside], [f"--bind-ro={deb}:{inside}"])

    def execute(
        self, command: Sequence[str], options: Sequence[str] = (), timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the stopped machine under ``systemd-nspawn`` without ``--boot``:
        /proc, /sys, /dev and a /tmp tmpfs are there, no init. ``options`` go to nspawn."""
        assert not self.running, "execute() is for a stopped machine"
        command = self._command(boot=False, extra=[*options, "--", *command])
        try:
            return subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=None if _host_runs_systemd() else self._enter_own_cgroup,
                env=INSIDE_ENV,
            )
        finally:
            self._cleanup_cgroups()

    def chroot(
        self, command: Sequence[str], timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in the stopped machine's root with plain ``chroot``, nothing mounted
        (no /proc, /sys, /dev, /run): what an image builder does to a root file system."""
        assert not self.running, "chroot() is for a stopped machine"
        return subprocess.run(
            ["chroot", str(self.root), "env", "-i", *_env_args(INSIDE_ENV), *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=INSIDE_ENV,
        )

    def chroot_install(
        self, deb: Path, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``chroot ROOT dpkg -i`` of ``deb`` copied into the root (and deleted afterwards)."""
        inside = f"/{deb.name}"
        copy = self.root / deb.name
        shutil.copyfile(deb, copy)
        try:
            return self.chroot(["dpkg", "--install", inside], timeout=timeout)
        finally:
            copy.unlink()

    def boot(self) -> None:
        """Boot systemd as PID 1 and wait until it has finished starting up."""
        assert not self.running, "already running"
        with self.log_path.open("ab") as out:
            out.write(f"\n=== boot {self.boots + 1}\n".encode())
            out.flush()
            self.process = self._spawn(self._command(boot=True, extra=[]), out)
        self.boots += 1
        self.leader = wait_for(self._find_leader, BOOT_TIMEOUT, f"{self.name} to start systemd")
        wait_for(self._booted, BOOT_TIMEOUT, f"{self.name} to finish booting")

    def _find_leader(self) -> int | None:
        """The container's PID 1 (systemd), a child of nspawn."""
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited at boot:\n{self.console()}")
        for pid in _descendants(self.process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
        return None

    def _booted(self) -> bool:
        if not self.running:
            raise AssertionError(f"the container stopped while booting:\n{self.console()}")
        state = self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout
        return state.strip() in ("running", "degraded")

    def run(
        self,
        command: Sequence[str],
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the booted machine (as root) and capture its output."""
        assert self.leader is not None and self.running, "the machine is not running"
        nsenter = ["nsenter", f"--target={self.leader}", "-m", "-p", "-u", "-i", "-n", "--"]
        result = subprocess.run(
            [*nsenter, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=INSIDE_ENV,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode} in {self.name}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def poweroff(self) -> None:
        self._shut_down(["systemctl", "poweroff"], expected=0)

    def reboot(self) -> None:
        """A real reboot: systemd shuts down, nspawn reports it, the same root boots again."""
        self._shut_down(["systemctl", "reboot"], expected=EXIT_REBOOT)
        self.boot()

    def _shut_down(self, command: list[str], expected: int) -> None:
        assert self.process is not None
        self.run(command, check=False, timeout=10)
        try:
            code = self.process.wait(SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise AssertionError(f"{self.name} did not shut down:\n{self.console()}") from exc
        finally:
            self._after_exit()
        if code != expected:
            raise AssertionError(f"systemd-nspawn exited {code}, not {expected}:\n{self.console()}")

    def kill(self) -> None:
        """Stop at once: SIGKILL to the container's PID 1 ends its whole PID namespace."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if self.leader is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
            try:
                self.process.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._after_exit()

    def _after_exit(self) -> None:
        self.process = None
        self.leader = None
        self._cleanup_cgroups()

    def _cleanup_cgroups(self) -> None:
        if _host_runs_systemd():
            return
        for hierarchy in _cgroup_hierarchies():
            _remove_cgroup_tree(hierarchy / CGROUP_GROUP / self.name)

    def unmount(self) -> None:
        if self.root.is_mount():
            subprocess.run(["umount", str(self.root)], check=True, capture_output=True)

    def freeze(self) -> Path:
        """Stop using this machine and return its changes as a read-only layer for others."""
        assert not self.running
        self.unmount()
        return self.upper

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.running:
                self.poweroff()
        self.kill()
        try:
            self.unmount()
        except subprocess.CalledProcessError:
            subprocess.run(["umount", "--lazy", str(self.root)], check=False, capture_output=True)
        if self.root.is_mount():
            raise RuntimeError(f"cannot unmount {self.root}: left in place")
        # Deleting through a mounted overlay would only hide files; it is unmounted by now.
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what went on inside -------------------------------------------------------------------

    def console(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines, "(no console log)")

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        command = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit:
            command += ["-u", unit]
        return self.run(command, check=False).stdout


def _env_args(env: dict[str, str]) -> list[str]:
    return [f"{name}={value}" for name, value in env.items()]


def _descendants(pid: int) -> Iterator[int]:
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield int(child)
            pending.append(int(child))


@contextlib.contextmanager
def machine(layers: Sequence[Path], prefix: str = "al") -> Iterator[Machine]:
    made = Machine.create(layers, prefix)
    try:
        yield made
    finally:
        made.destroy()
