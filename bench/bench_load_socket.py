"""Benchmark of a warm ``POST /load`` over the agent's Unix socket and TCP (issues 4 and 15).

    .venv/bin/python bench/bench_load_socket.py [--sizes-mib 100,1024] [--runs 5]

A dev-api and a real agent (``python -m agent serve``, generated credentials, everything in a
temporary directory; both by ``azaion_loader_dev.harness``) are started here. For each size a
fresh agent is started (so its peak RSS is per size) and one resource is uploaded through its
socket; then, in the same run and interleaved (medians of ``--runs``):

1. raw AES-256-GCM decrypt of the same amount in memory, 64 KiB records: the raw-primitive
   baseline of bench/bench_stream.py;
2. reading the plaintext file (page-cached, 1 MiB reads): what any "load" costs at least;
3. dev-api's raw CDN download of the big part (aiohttp GET, bytes discarded);
4. a plain loop with no asyncio and no HTTP: read 1 MiB of records from a page-cached file,
   decrypt them, send the plaintext 192 KiB at a time (fits the socket's default 208 KiB send
   buffer; per chunk, one ``sendmsg`` per read and 1 MiB sends measured slower) over a Unix
   socket to a process reading 1 MiB at a time. What the copies and the socket cost on top of
   the AES on this machine; a ``/load`` near it has little overhead left to remove;
5. the physical floor, in C (``bench/load_floor.c``, compiled here with ``gcc -O2 -lcrypto``):
   the same path with nothing else: pread 16 records (1 MiB + tags) of the same page-cached
   ciphertext, EVP aes-256-gcm decrypt each with its tag checked into one buffer, ``send`` it
   over a Unix socket (with the send buffer the agent asks for, ``LOAD_SEND_BUFFER``), and
   again over TCP loopback, to the reader of 4. (``recv_into`` 1 MiB, as the ``/load`` client
   reads its body). What a program with no interpreter reaches on the path ``/load`` takes.
   It links the system's libcrypto (Debian 12: OpenSSL 3.0, ~5.2 GB/s AES-256-GCM here),
   which is slower than the OpenSSL that cryptography's wheel carries (~9 GB/s, VAES): the
   floor is what the path costs with the C library a device has;
6. ``/load`` over the socket, warm cache (the client reads 1 MiB at a time and discards), and
   the same over loopback TCP;
7. the same while a second process asks ``/health`` every few milliseconds (its latencies);
8. ``/load``, cold cache, also probed: the cached big part is deleted first (the cache trusts
   a file by its inode/size/mtime/ctime stamp, so a missing file is downloaded again).

Before the timed runs one load is checked: byte count == size and SHA-256 == the plaintext's.
"MiB/s" is wall-clock; "MiB/CPU-s" is per CPU second of the agent process (all its threads, to
the nanosecond from ``schedstat``; for the raw, read, CDN and plain cases, of this process; for
the C floor, of the C program), which load from other processes disturbs less. The
agent's peak RSS is ``VmHWM`` from ``/proc/<pid>/status``, reset (``clear_refs``) after the
upload and before each case, so each figure is that of the loads alone.

Goals (issue 15): warm ``/load`` >= 0.8x the raw decrypt throughput, or, where the path itself
cannot carry that (a Unix socket or TCP loopback copy costs more than the AES), within 10% of
the floor on the same transport (>= 0.9x), the floor being the higher of the C floor and
1 / (1/raw + 1/path alone), for every size, over the socket and over TCP; each ratio by wall
clock, or per CPU second when the machine is busy (the better of the two, both printed); the
agent's peak RSS < 100 MiB at every size; ``/health`` p99 < 20 ms while loading. Exit status 1
if one is missed. Not a test: the machine may be shared; use medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from load_common import (
    READ_BLOCK,
    Probe,
    Timing,
    cdn_download,
    check_one_load,
    drop_cached,
    machine,
    pid_of,
    quantile_ms,
    scratch,
    socket_load,
    start_agent,
    tcp_load,
    upload,
)

from agent import stream
from agent.server import LOAD_SEND_BUFFER
from azaion_loader_dev.harness.agent import AgentProcess
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api
from azaion_loader_dev.harness.measure import (
    MIB,
    RawDecrypt,
    cpu_seconds,
    file_digest,
    make_plaintext,
    reset_peak_rss,
    status_kib,
    thread_cpu_seconds,
)

WARM_RATIO_GOAL = 0.8  # of the raw decrypt...
FLOOR_RATIO_GOAL = 0.9  # ...or of the C floor on the same transport
RSS_GOAL_MIB = 100
HEALTH_P99_GOAL_MS = 20.0
PLAIN_SEND_CHUNKS = 3  # the plain loop's sends: 192 KiB


# -- the agent process -----------------------------------------------------------------------------


def memory_mib(agent: AgentProcess, field_name: str) -> float:
    return status_kib(pid_of(agent), field_name) / 1024


# -- the cases -------------------------------------------------------------------------------------


def read_plaintext(path: Path) -> Timing:
    buffer = bytearray(READ_BLOCK)
    wall, cpu = time.perf_counter(), cpu_seconds()
    with path.open("rb", buffering=0) as file:
        while file.readinto(buffer):
            pass
    return {"seconds": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}


DRAIN = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
sock.sendall(b"r")
buffer = memoryview(bytearray(1 << 20))
while sock.recv_into(buffer):
    pass
"""


class PlainLoop:
    """The least a Python server does per byte, with no asyncio and no HTTP: read 16 records at
    a time from a (page-cached) file, AES-GCM-decrypt them, send their plaintext 3 chunks at a
    time over a Unix socket to another process that reads 1 MiB at a time."""

    def __init__(self, raw: RawDecrypt, path: Path) -> None:
        self._raw, self._path = raw, path
        path.write_bytes(raw.data)

    def run(self) -> Timing:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            reader = subprocess.Popen(
                [sys.executable, "-c", DRAIN, str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
        record = stream.CHUNK_SIZE + stream.TAG_SIZE
        buffer = bytearray(16 * record)
        view = memoryview(buffer)
        nonces = iter(self._raw.nonces)
        with ours, self._path.open("rb", buffering=0) as file:
            ours.recv(1)  # the reader is up: its start-up is not timed
            wall, cpu = time.perf_counter(), cpu_seconds()
            while count := file.readinto(buffer):
                plaintexts = [
                    self._raw.aead.decrypt(next(nonces), view[offset : offset + record], None)
                    for offset in range(0, count, record)
                ]
                for first in range(0, len(plaintexts), PLAIN_SEND_CHUNKS):
                    ours.sendall(b"".join(plaintexts[first : first + PLAIN_SEND_CHUNKS]))
            ours.shutdown(socket.SHUT_WR)
            cpu = cpu_seconds() - cpu
            reader.wait()
        return {"seconds": time.perf_counter() - wall, "cpu": cpu}


class Floor:
    """``bench/load_floor.c``, compiled into ``directory``: the C program on the /load path."""

    SOURCE = Path(__file__).with_name("load_floor.c")

    def __init__(self, raw: RawDecrypt, records: Path, directory: Path) -> None:
        self._key, self._records = raw.key.hex(), records
        self._binary = directory / "load_floor"
        if shutil.which("gcc") is None:
            raise SystemExit("bench_load_socket needs gcc (and libssl-dev) for the C floor")
        built = subprocess.run(
            ["gcc", "-O2", "-o", str(self._binary), str(self.SOURCE), "-lcrypto"],
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            raise SystemExit(f"could not build the C floor (libssl-dev?):\n{built.stderr}")

    def run(self, transport: str, *, decrypt: bool = True) -> Timing:
        """One transfer; without ``decrypt``, each record is copied instead: the path alone."""
        ours, theirs = connected_pair(transport)
        with theirs:
            reader = subprocess.Popen(
                [sys.executable, "-c", DRAIN, str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
        # Over the socket, the send buffer the agent asks for its loads (LOAD_SEND_BUFFER).
        tuning = ["16", str(MIB), str(LOAD_SEND_BUFFER)] if transport == "unix" else []
        with ours:
            out = subprocess.run(
                [
                    str(self._binary),
                    str(self._records),
                    self._key if decrypt else "none",
                    str(ours.fileno()),
                    *tuning,
                ],
                pass_fds=[ours.fileno()],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        reader.wait()
        seconds, cpu = (float(figure) for figure in out.split())
        return {"seconds": seconds, "cpu": cpu}


def connected_pair(transport: str) -> tuple[socket.socket, socket.socket]:
    """Two connected stream sockets: a Unix socket pair, or both ends of a TCP loopback
    connection (as the agent's listeners would have them, default buffer sizes)."""
    if transport == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        return accepted, client


def agent_load(
    agent: AgentProcess,
    name: str,
    size: int,
    latencies: list[float] | None,
    transport: str = "unix",
) -> Timing:
    """One ``/load``, timed; with ``latencies``, /health is probed meanwhile and its latencies
    (seconds) appended."""
    probe = Probe(agent.socket_path, "/health") if latencies is not None else None
    start, wall, cpu = time.monotonic(), time.perf_counter(), thread_cpu_seconds(pid_of(agent))
    if transport == "unix":
        received = socket_load(agent.socket_path, name).size
    else:
        received = tcp_load(agent.port, name).size
    timing = {
        "seconds": time.perf_counter() - wall,
        "cpu": thread_cpu_seconds(pid_of(agent)) - cpu,
    }
    if probe is not None and latencies is not None:
        latencies += probe.latencies(start, time.monotonic())
    if received != size:
        raise SystemExit(f"/load/{name} sent {received} bytes, not {size}")
    return timing


# -- one size --------------------------------------------------------------------------------------

CASES = {
    "raw": "raw AES-GCM decrypt (memory, 64 KiB)",
    "read": "read plaintext file (1 MiB reads)",
    "cdn": "dev-api raw CDN download",
    "plain": "plain loop: read+decrypt+send, no HTTP",
    "floor": "C floor: pread+EVP decrypt+send, socket",
    "floor_tcp": "C floor over TCP loopback",
    "copy": "C, no AES (pread+send), socket",
    "copy_tcp": "C, no AES, TCP loopback",
    "warm": "/load over socket, warm cache",
    "warm_tcp": "/load over TCP, warm cache",
    "before": "--compare's /load over socket, warm",
    "before_tcp": "--compare's /load over TCP, warm",
    "warm_probed": "/load warm, /health probed",
    "cold": "/load cold cache, /health probed",
}


@dataclass
class SizeResult:
    size_mib: int
    upload_mib_s: float = 0.0
    rss_idle_mib: float = 0.0
    rss_upload_mib: float = 0.0
    rss_reset: bool = True
    wall: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CASES})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CASES})
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    health: list[float] = field(default_factory=list)

    def record(self, case: str, timing: Timing) -> None:
        self.wall[case].append(self.size_mib / timing["seconds"])
        self.cpu[case].append(self.size_mib / max(timing["cpu"], 1e-9))

    def ratio(self, numbers: dict[str, list[float]], case: str, baseline: str) -> float:
        """Median of per-run ratios (each run measures both, so they share the machine's load)."""
        pairs = zip(numbers[case], numbers[baseline], strict=True)
        return statistics.median(c / b for c, b in pairs)

    def health_ms(self, quantile: float) -> float:
        return quantile_ms(self.health, quantile)


def bench_size(
    api: DevApi, root: Path, size_mib: int, runs: int, compare: Path | None
) -> SizeResult:
    size, name = size_mib * MIB, f"model-{size_mib}"
    result = SizeResult(size_mib)
    before: AgentProcess | None = None
    source = root / f"{name}.plain"
    make_plaintext(source, size)
    agent = start_agent(root / f"agent-{size_mib}", api)
    try:
        result.rss_idle_mib = memory_mib(agent, "VmRSS")
        wall = time.perf_counter()
        uploaded = upload(agent, source, name)
        result.upload_mib_s = size_mib / (time.perf_counter() - wall)
        result.rss_upload_mib = memory_mib(agent, "VmHWM")
        big_name = str(uploaded["big_sha256"])
        check_one_load(agent, name, size, file_digest(source))
        before = None
        if compare is not None:
            before = start_agent(root / f"before-{size_mib}", api, compare)
            check_one_load(before, name, size, file_digest(source))
        raw = RawDecrypt(size)
        plain = PlainLoop(raw, root / f"{name}.records")
        floor = Floor(raw, root / f"{name}.records", root)

        def measured(case: str, action: Callable[[], Timing]) -> None:
            result.rss_reset = reset_peak_rss(pid_of(agent)) and result.rss_reset
            result.record(case, action())
            peak = memory_mib(agent, "VmHWM")
            result.peak_rss_mib[case] = max(result.peak_rss_mib.get(case, 0.0), peak)

        for run in range(runs):
            print(f"  {size_mib} MiB: run {run + 1} of {runs}", file=sys.stderr, flush=True)
            measured("raw", raw.run)
            measured("read", lambda: read_plaintext(source))
            measured("cdn", lambda: asyncio.run(cdn_download(api, big_name)))
            measured("plain", plain.run)
            measured("floor", lambda: floor.run("unix"))
            measured("warm", lambda: agent_load(agent, name, size, None))
            measured("floor_tcp", lambda: floor.run("tcp"))
            measured("copy", lambda: floor.run("unix", decrypt=False))
            measured("copy_tcp", lambda: floor.run("tcp", decrypt=False))
            measured("warm_tcp", lambda: agent_load(agent, name, size, None, "tcp"))
            if before is not None:
                result.record("before", agent_load(before, name, size, None))
                result.record("before_tcp", agent_load(before, name, size, None, "tcp"))
            measured("warm_probed", lambda: agent_load(agent, name, size, result.health))
            drop_cached(agent, big_name)
            measured("cold", lambda: agent_load(agent, name, size, result.health))
        del raw, plain
    finally:
        agent.stop()
        if before is not None:
            before.stop()
        source.unlink()
        (root / f"{name}.records").unlink(missing_ok=True)
    for case in ("raw", "read", "cdn", "plain", "floor", "floor_tcp", "copy", "copy_tcp"):
        result.peak_rss_mib.pop(case, None)
    return result


# -- the report ------------------------------------------------------------------------------------


def floor_estimate(numbers: dict[str, list[float]], floor: str, copy: str) -> list[float]:
    """Per run, the higher floor: the C floor links the system's (slower) AES; with the
    wheel's, one thread doing both would take the time of the raw decrypt plus the path alone,
    1 / (1/raw + 1/path)."""
    return [
        max(f, 1 / (1 / r + 1 / c))
        for r, c, f in zip(numbers["raw"], numbers[copy], numbers[floor], strict=True)
    ]


def ratio_to_floor(numbers: dict[str, list[float]], case: str, floor: str, copy: str) -> float:
    """Median of per-run ratios of ``case`` to the higher floor."""
    floors = floor_estimate(numbers, floor, copy)
    return statistics.median(c / f for c, f in zip(numbers[case], floors, strict=True))


def report(results: list[SizeResult], runs: int) -> bool:
    ok = True
    for result in results:
        print(
            f"\n== {result.size_mib} MiB, median of {runs} runs (upload through the agent "
            f"{result.upload_mib_s:.0f} MiB/s; agent RSS idle {result.rss_idle_mib:.0f} MiB, "
            f"peak during upload {result.rss_upload_mib:.0f} MiB)"
        )
        print(f"  {'':<38} {'MiB/s':>7} {'MiB/CPU-s':>10} {'agent peak RSS':>15}")
        for case, label in CASES.items():
            if not result.wall[case]:
                continue
            wall = statistics.median(result.wall[case])
            cpu = statistics.median(result.cpu[case])
            peak = result.peak_rss_mib.get(case)
            rss = f"{peak:11.0f} MiB" if peak is not None else ""
            print(f"  {label:<38} {wall:7.0f} {cpu:10.0f} {rss:>15}")
        cases = (("warm", "floor", "copy", "socket"), ("warm_tcp", "floor_tcp", "copy_tcp", "TCP"))
        for warm, floor, copy, over in cases:
            warm_raw = result.ratio(result.wall, warm, "raw")
            # The C floor links the system's (slower) AES; with the wheel's, one thread doing
            # both would take the time of the raw decrypt plus the path alone: the floor is the
            # higher of the two.
            higher = statistics.median(floor_estimate(result.wall, floor, copy))
            warm_floor = ratio_to_floor(result.wall, warm, floor, copy)
            warm_floor_cpu = ratio_to_floor(result.cpu, warm, floor, copy)
            path, c_floor = (statistics.median(result.wall[case]) for case in (copy, floor))
            print(
                f"  {over}: the path alone (C: pread+send, no AES) {path:.0f} MiB/s; C floor "
                f"{c_floor:.0f}; the higher of it and 1/(1/raw + 1/path) {higher:.0f}; /load / "
                f"that: {warm_floor:.2f}x wall, {warm_floor_cpu:.2f}x per CPU-s (goal >= "
                f"{FLOOR_RATIO_GOAL}x)"
            )
            print(
                f"  warm /load over {over} / raw decrypt: {warm_raw:.2f}x wall, "
                f"{result.ratio(result.cpu, warm, 'raw'):.2f}x per CPU-s (goal >= "
                f"{WARM_RATIO_GOAL}x); / C floor: "
                f"{result.ratio(result.wall, warm, floor):.2f}x wall, "
                f"{result.ratio(result.cpu, warm, floor):.2f}x per CPU-s; C floor / raw: "
                f"{result.ratio(result.wall, floor, 'raw'):.2f}x"
            )
            # Wall, or per CPU second when the machine is busy (as the raw ratio always was).
            best_floor = max(warm_floor, warm_floor_cpu)
            best_raw = max(warm_raw, result.ratio(result.cpu, warm, "raw"))
            ok = ok and (best_raw >= WARM_RATIO_GOAL or best_floor >= FLOOR_RATIO_GOAL)
        if result.wall["before"]:
            print(
                f"  warm /load / --compare's: socket "
                f"{result.ratio(result.wall, 'warm', 'before'):.2f}x wall, "
                f"{result.ratio(result.cpu, 'warm', 'before'):.2f}x per CPU-s; TCP "
                f"{result.ratio(result.wall, 'warm_tcp', 'before_tcp'):.2f}x wall, "
                f"{result.ratio(result.cpu, 'warm_tcp', 'before_tcp'):.2f}x per CPU-s"
            )
        print(
            f"  warm /load / plain loop: {result.ratio(result.wall, 'warm', 'plain'):.2f}x wall, "
            f"{result.ratio(result.cpu, 'warm', 'plain'):.2f}x per CPU-s; plain loop / raw "
            f"decrypt: {result.ratio(result.wall, 'plain', 'raw'):.2f}x wall"
        )
        print(
            f"  warm /load / read plaintext: {result.ratio(result.wall, 'warm', 'read'):.2f}x; "
            f"cold /load / CDN download: {result.ratio(result.wall, 'cold', 'cdn'):.2f}x (wall)"
        )
        p50, p99 = result.health_ms(0.5), result.health_ms(0.99)
        print(
            f"  /health while loading: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max "
            f"{1000 * max(result.health):.1f} ms over {len(result.health)} probes "
            f"(goal p99 < {HEALTH_P99_GOAL_MS:.0f} ms)"
        )
        if not result.rss_reset:
            print("  (the kernel refused to reset VmHWM: peaks include the upload)")
        ok = ok and all(peak < RSS_GOAL_MIB for peak in result.peak_rss_mib.values())
        ok = ok and p99 < HEALTH_P99_GOAL_MS
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="100,1024", help="comma-separated (100,1024)")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (/tmp)")
    parser.add_argument("--compare", type=Path, help="another checkout's agent, interleaved")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes_mib.split(",")]
    print(machine())
    with scratch("bls", args.dir) as root:
        api = new_dev_api(root / "dev-api")
        try:
            compare = args.compare.resolve() if args.compare is not None else None
            results = [bench_size(api, root, size, args.runs, compare) for size in sizes]
        finally:
            api.stop()
    ok = report(results, args.runs)
    print(f"\ngoals: {'met' if ok else 'MISSED'}; load average now {os.getloadavg()[0]:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
