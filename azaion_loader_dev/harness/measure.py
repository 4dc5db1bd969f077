"""What the benchmarks measure with: ``/proc`` readers and the baselines two of them share.

Light on purpose (no aiohttp, no docker): a benchmark's measured child process imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent import stream

MIB = 1 << 20
TICKS = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int | str = "self", field_name: str = "VmRSS") -> int:
    """A memory figure of ``/proc/PID/status``, in KiB: ``VmRSS`` now, ``VmHWM`` its peak.

    Not ``ru_maxrss`` for a peak: Linux carries that across exec, so a child would report the
    (large) parent's peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Start ``VmHWM`` afresh (Linux >= 4.0); False if the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time (user + system) of a process, all its threads, living or gone: on a shared
    machine, waiting is not counted."""
    if pid == "self":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def thread_cpu_seconds(pid: int) -> float:
    """CPU time of a process's living threads, to the nanosecond (``/proc/PID/task/*/schedstat``):
    ``cpu_seconds`` counts clock ticks (10 ms), too coarse for a step of 30 ms. Threads that
    ended are not counted: take it across a span in which none ends (an agent's loop and its
    worker threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def io_counters(pid: int | str = "self") -> dict[str, int]:
    """``/proc/PID/io``: ``write_bytes`` is what the process made the kernel write to storage."""
    counters = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        counters[key] = int(value)
    return counters


class RawDecrypt:
    """Raw AES-GCM over 64 KiB records laid out in memory (bench_stream.py's raw baseline)."""

    def __init__(self, size: int) -> None:
        self.key = os.urandom(32)  # the C floor of bench_load_socket.py decrypts the same records
        self.aead = AESGCM(self.key)
        block = os.urandom(stream.CHUNK_SIZE)
        records = size // stream.CHUNK_SIZE
        self.nonces = [index.to_bytes(12, "big") for index in range(records)]
        self.data = b"".join(self.aead.encrypt(n, block, None) for n in self.nonces)
        self.size = records * stream.CHUNK_SIZE

    def run(self) -> dict[str, float]:
        record = stream.CHUNK_SIZE + stream.TAG_SIZE
        view = memoryview(self.data)
        wall, cpu = time.perf_counter(), cpu_seconds()
        for index, nonce in enumerate(self.nonces):
            self.aead.decrypt(nonce, view[index * record : (index + 1) * record], None)
        return {"seconds": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}


def make_plaintext(path: Path, size: int) -> None:
    """``size`` random bytes, each MiB marked with its index (no two MiB alike)."""
    block = bytearray(os.urandom(MIB))
    with path.open("wb") as file:
        for index in range(-(-size // MIB)):
            block[:8] = index.to_bytes(8, "big")
            file.write(block[: min(MIB, size - index * MIB)])


def write_random_file(path: Path, size: int) -> None:
    """``size`` bytes of one random 16 MiB block, repeated: fine for AES, and fast to write."""
    block = os.urandom(16 * MIB)
    with open(path, "wb") as file:
        for offset in range(0, size, len(block)):
            file.write(block[: min(len(block), size - offset)])


def file_digest(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(MIB):
            digest.update(block)
    return digest.hexdigest()
