"""A real, private Docker engine, and tiny images built without a registry.

``DockerDaemon`` starts ``/usr/sbin/dockerd`` with its own data root, exec root, pidfile and
socket under a short temp dir (a Unix socket path must fit in 108 bytes), with no bridge and no
iptables, so it touches nothing of the host's network or of another engine.

Images are made with ``docker import`` of a rootfs tarball written in Python around the static
``/bin/busybox``: no registry, no network. ``import_big_image`` adds an incompressible layer of
a chosen size for the benchmarks.
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from azaion_loader_dev.harness.process import log_tail, stop_process

DOCKERD = Path(os.environ.get("LOADER_TEST_DOCKERD", "/usr/sbin/dockerd"))
BUSYBOX = Path("/bin/busybox")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
MiB = 1024 * 1024
PR_SET_PDEATHSIG = 1


def missing_binaries(dockerd: Path = DOCKERD, busybox: Path = BUSYBOX) -> str | None:
    """What is missing to start a daemon and build its images, or None."""
    missing = [str(path) for path in (dockerd, busybox) if not path.exists()]
    if not missing:
        return None
    return f"needs {' and '.join(missing)} (apt-get install docker.io busybox-static)"


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class DockerDaemon:
    """One private dockerd process; ``host`` is the ``unix://`` URL to reach it."""

    root: Path
    process: subprocess.Popen[bytes] | None = None
    clients: list[docker.DockerClient] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.root / "d.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    @classmethod
    def create(cls) -> DockerDaemon:
        """A daemon whose socket path is known but that is not running yet."""
        return cls(root=Path(tempfile.mkdtemp(prefix="dk", dir="/tmp")))

    @classmethod
    def start_new(cls) -> DockerDaemon:
        daemon = cls.create()
        daemon.start()
        return daemon

    def start(self) -> None:
        missing = missing_binaries()
        if missing is not None:
            raise RuntimeError(f"cannot start dockerd: {missing}")
        command = [
            str(DOCKERD),
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'x'}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            f"--host={self.host}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--log-level=warn",
        ]
        driver = os.environ.get("LOADER_TEST_DOCKER_STORAGE_DRIVER")
        if driver:
            command.append(f"--storage-driver={driver}")
        log = self.log_path.open("ab")
        # Own session: a Ctrl-C in the caller (pytest, a benchmark) must not reach dockerd before
        # the caller stops it; and if the caller dies first, the kernel sends dockerd SIGTERM.
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        log.close()
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not answer in time:\n{self._log_tail()}")
            time.sleep(0.05)  # polling interval, not a synchronisation stand-in

    def _answers(self) -> bool:
        # Probe the socket ourselves first: the SDK leaks a socket when it cannot connect.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            try:
                raw.connect(str(self.socket_path))
            except OSError:
                return False
        try:
            # Constructing the client already asks the daemon for its API version.
            probe = docker.DockerClient(base_url=self.host, timeout=5)
        except docker.errors.DockerException:
            return False
        try:
            return bool(probe.ping())
        except docker.errors.DockerException:
            return False
        finally:
            probe.close()

    def client(self) -> docker.DockerClient:
        """A Docker SDK client for this daemon, closed when the daemon stops."""
        client = docker.DockerClient(base_url=self.host, timeout=120)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.process is not None:
            stop_process(self.process, timeout=STOP_TIMEOUT, group=True)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _log_tail(self) -> str:
        return log_tail(self.log_path)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_busybox(tar: tarfile.TarFile, marker: bytes) -> None:
    for directory in ("bin", "etc", "tmp"):
        info = tarfile.TarInfo(directory)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
    _add_file(tar, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    link = tarfile.TarInfo("bin/sh")
    link.type = tarfile.SYMTYPE
    link.linkname = "busybox"
    tar.addfile(link)
    # The marker makes every test image distinct, so unlocking it really has to load it.
    _add_file(tar, "etc/azaion-test-marker", marker)


def busybox_rootfs(marker: bytes) -> bytes:
    """A tiny rootfs tarball (~2 MB): static busybox, ``/bin/sh``, a marker file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add_busybox(tar, marker)
    return buffer.getvalue()


def import_image(client: docker.DockerClient, ref: str, marker: bytes | None = None) -> str:
    """``docker import`` a busybox rootfs as ``ref`` (``repo:tag``); returns the image ID."""
    repository, tag = split_ref(ref)
    data = busybox_rootfs(marker if marker is not None else os.urandom(16))
    client.api.import_image_from_data(data, repository=repository, tag=tag)
    return str(client.images.get(ref).id)


def split_ref(ref: str) -> tuple[str, str]:
    repository, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repository, tag


class _RandomLayerStream(io.RawIOBase):
    """A rootfs tarball with busybox and ``size`` random bytes, produced as it is read."""

    def __init__(self, size: int) -> None:
        self._chunks = self._generate(size)
        self._pending = b""

    @staticmethod
    def _generate(size: int) -> Iterator[bytes]:
        head = io.BytesIO()
        with tarfile.open(fileobj=head, mode="w") as tar:
            _add_busybox(tar, os.urandom(16))
            members_end = tar.offset  # where tarfile writes its end-of-archive blocks
        yield head.getvalue()[:members_end]
        info = tarfile.TarInfo("opt/payload.bin")
        info.size = size
        info.mode = 0o644
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        remaining = size
        while remaining:
            step = min(remaining, 4 * MiB)
            yield os.urandom(step)
            remaining -= step
        yield b"\0" * ((-size) % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def import_big_image(client: docker.DockerClient, ref: str, size: int) -> str:
    """Import an image with an incompressible ``size``-byte layer, streamed (no big buffer)."""
    repository, tag = split_ref(ref)

    def chunks() -> Iterator[bytes]:
        stream = _RandomLayerStream(size)
        while block := stream.read(MiB):
            yield block

    client.api.import_image_from_data(chunks(), repository=repository, tag=tag)
    return str(client.images.get(ref).id)
