"""Benchmark of the encrypted stream format (docs/format.md) against raw AES-GCM, on one core.

    .venv/bin/python bench/bench_stream.py [--size-mib 512] [--runs 5] [--cli-size-mib 1024]

Measures, on the same data in one run (medians of ``--runs`` interleaved runs):

1. in memory: raw ``AESGCM.encrypt``/``decrypt`` over the same chunks vs this format's
   ``encrypt_iter``/``decrypt_iter`` fed 1 MiB pieces;
2. from a file (page-cached, so CPU-bound): raw AES-GCM over record-sized reads vs
   ``encrypt_file``/``decrypt_file``;
3. ``openssl speed -evp aes-256-gcm`` (64 KiB blocks) and ``openssl enc -aes-256-ctr`` over the
   file (``enc`` has no GCM), where openssl is installed;
4. the decrypt ratio for other chunk sizes (why 64 KiB, see docs/format.md);
5. the CLI: ``azaion-loader encrypt`` then ``decrypt`` of a ``--cli-size-mib`` file (to disk,
   fsync included), with each process's peak RSS from GNU ``/usr/bin/time``, against a 64 MiB
   budget, and at 128 MiB to show memory does not grow with the input.

In-process cases are timed in CPU seconds of this process (``time.process_time``), so time
spent descheduled by other load does not count; ratios are medians of per-run ratios.

Goal (issue 3): decrypt >= 0.9x raw AES-GCM over the same chunk size; CLI peak RSS < 64 MiB.
Exit status 1 if a goal is missed. Not a test: the machine may be shared, so use the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent import stream
from azaion_loader_dev.harness.measure import file_digest, write_random_file

REPO = Path(__file__).resolve().parent.parent

MIB = 1 << 20
PIECE = MIB  # how callers feed the format: ~1 MiB reads
FRAGMENTS = [bytes(range(32))]
RSS_BUDGET_MIB = 64
TIME = "/usr/bin/time"
DECRYPT_RATIO_GOAL = 0.9


class NullSink:
    """A binary file that discards what it is given (the benchmark measures crypto, not disk)."""

    def write(self, data: bytes) -> int:
        return len(data)


def timed(action: Callable[[], object]) -> float:
    """CPU seconds of this process: on a shared machine, time spent descheduled is not ours."""
    start = time.process_time()
    action()
    return time.process_time() - start


def timed_wall(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def raw_encrypt(aead: AESGCM, plaintext: memoryview, chunk_size: int) -> None:
    chunks = max(1, -(-len(plaintext) // chunk_size))
    for index in range(chunks):
        start = index * chunk_size
        aead.encrypt(nonce(index, index == chunks - 1), plaintext[start : start + chunk_size], None)


def raw_decrypt(aead: AESGCM, body: memoryview, chunk_size: int) -> None:
    record = chunk_size + stream.TAG_SIZE
    chunks = -(-len(body) // record)
    for index in range(chunks):
        start = index * record
        aead.decrypt(nonce(index, index == chunks - 1), body[start : start + record], None)


def raw_decrypt_file(aead: AESGCM, path: Path, chunk_size: int) -> None:
    record = chunk_size + stream.TAG_SIZE
    size = path.stat().st_size - stream.HEADER_SIZE
    chunks = -(-size // record)
    with open(path, "rb") as file:
        file.seek(stream.HEADER_SIZE)
        for index in range(chunks):
            aead.decrypt(nonce(index, index == chunks - 1), file.read(record), None)


def raw_encrypt_file(aead: AESGCM, path: Path, chunk_size: int) -> None:
    chunks = max(1, -(-path.stat().st_size // chunk_size))
    with open(path, "rb") as file:
        for index in range(chunks):
            aead.encrypt(nonce(index, index == chunks - 1), file.read(chunk_size), None)


def pieces(data: memoryview) -> Iterator[memoryview]:
    return (data[i : i + PIECE] for i in range(0, len(data), PIECE))


def drain(iterator: Iterator[bytes]) -> None:
    for _ in iterator:
        pass


def format_encrypt(plaintext: memoryview, chunk_size: int) -> None:
    drain(stream.encrypt_iter(pieces(plaintext), FRAGMENTS, chunk_size=chunk_size))


def format_decrypt(ciphertext: memoryview) -> None:
    drain(stream.decrypt_iter(pieces(ciphertext), FRAGMENTS))


def payload_aead(ciphertext: bytes) -> AESGCM:
    """The raw baseline uses the very key the format derived, so it checks the same tags."""
    header = stream.parse_header(ciphertext[: stream.HEADER_SIZE])
    return AESGCM(stream.open_header(header, FRAGMENTS).payload_key)


def throughput(size: int, seconds: list[float]) -> float:
    return size / statistics.median(seconds) / MIB


def measure_pairs(cases: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Interleaved runs, so drifting load on a shared machine hits every case alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, action in cases.items():
            times[name].append(timed(action))
    return times


def ratio(times: dict[str, list[float]], baseline: str, candidate: str) -> float:
    """Median over runs of baseline time / candidate time (1.0 = as fast as the baseline);
    each run times both cases back to back, so the pair shares the machine's load."""
    return statistics.median(b / c for b, c in zip(times[baseline], times[candidate], strict=True))


def ratio_of_medians(times: dict[str, list[float]], baseline: str, candidate: str) -> float:
    return statistics.median(times[baseline]) / statistics.median(times[candidate])


def bench_memory(size: int, runs: int) -> dict[str, float]:
    plaintext_bytes = os.urandom(size)
    plaintext = memoryview(plaintext_bytes)
    ciphertext_bytes = b"".join(stream.encrypt_iter([plaintext], FRAGMENTS))
    ciphertext = memoryview(ciphertext_bytes)
    aead = payload_aead(ciphertext_bytes)
    body = ciphertext[stream.HEADER_SIZE :]
    cs = stream.CHUNK_SIZE
    times = measure_pairs(
        {
            "raw encrypt": lambda: raw_encrypt(aead, plaintext, cs),
            "format encrypt": lambda: format_encrypt(plaintext, cs),
            "raw decrypt": lambda: raw_decrypt(aead, body, cs),
            "format decrypt": lambda: format_decrypt(ciphertext),
        },
        runs,
    )
    report("in memory", size, times)
    return {
        "memory encrypt ratio": ratio(times, "raw encrypt", "format encrypt"),
        "memory decrypt ratio": ratio(times, "raw decrypt", "format decrypt"),
        "memory decrypt ratio of medians": ratio_of_medians(times, "raw decrypt", "format decrypt"),
    }


def bench_file(size: int, runs: int, directory: Path) -> dict[str, float]:
    plain_path, cipher_path = directory / "bench.plain", directory / "bench.enc"
    write_random_file(plain_path, size)
    with open(plain_path, "rb") as fin, open(cipher_path, "wb") as fout:
        stream.encrypt_file(fin, fout, FRAGMENTS)
    with open(cipher_path, "rb") as file:
        aead = payload_aead(file.read(stream.HEADER_SIZE))
    cs = stream.CHUNK_SIZE

    def format_encrypt_file() -> None:
        with open(plain_path, "rb") as fin:
            stream.encrypt_file(fin, cast(BinaryIO, NullSink()), FRAGMENTS)

    def format_decrypt_file() -> None:
        with open(cipher_path, "rb") as fin:
            stream.decrypt_file(fin, cast(BinaryIO, NullSink()), FRAGMENTS)

    cases: dict[str, Callable[[], object]] = {
        "raw encrypt": lambda: raw_encrypt_file(aead, plain_path, cs),
        "format encrypt": format_encrypt_file,
        "raw decrypt": lambda: raw_decrypt_file(aead, cipher_path, cs),
        "format decrypt": format_decrypt_file,
    }
    times = measure_pairs(cases, runs)
    if shutil.which("openssl"):  # a child process: wall-clock time
        times["openssl enc -aes-256-ctr (wall)"] = [
            timed_wall(lambda: openssl_enc(plain_path)) for _ in range(runs)
        ]
    report("from a file (page cache)", size, times)
    return {
        "file encrypt ratio": ratio(times, "raw encrypt", "format encrypt"),
        "file decrypt ratio": ratio(times, "raw decrypt", "format decrypt"),
        "file decrypt ratio of medians": ratio_of_medians(times, "raw decrypt", "format decrypt"),
    }


def openssl_enc(path: Path) -> None:
    key, iv = "00" * 32, "00" * 16
    subprocess.run(
        ["openssl", "enc", "-aes-256-ctr", "-K", key, "-iv", iv, "-in", str(path), "-out",
         os.devnull],
        check=True,
    )  # fmt: skip


def openssl_speed() -> None:
    if not shutil.which("openssl"):
        print("openssl speed: openssl not installed")
        return
    result = subprocess.run(
        ["openssl", "speed", "-evp", "aes-256-gcm", "-bytes", "65536", "-seconds", "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    line = [line for line in result.stdout.splitlines() if line.lower().startswith("aes-256-gcm")]
    if line:  # "AES-256-GCM  <n>k": thousands of bytes per second
        kilobytes = float(line[-1].split()[-1].rstrip("k"))
        print(f"openssl speed -evp aes-256-gcm, 64 KiB blocks: {kilobytes * 1000 / MIB:8.0f} MiB/s")


def bench_chunk_sizes(size: int, runs: int) -> None:
    """The decrypt ratio per chunk size: the reason for the default (docs/format.md)."""
    plaintext = memoryview(os.urandom(size))
    print(f"\ndecrypt ratio by chunk size ({size // MIB} MiB, median of {runs}):")
    for log2 in (12, 14, 16, 18, 20):
        chunk_size = 1 << log2
        ciphertext_bytes = b"".join(
            stream.encrypt_iter([plaintext], FRAGMENTS, chunk_size=chunk_size)
        )
        ciphertext = memoryview(ciphertext_bytes)
        aead = payload_aead(ciphertext_bytes)
        body = ciphertext[stream.HEADER_SIZE :]
        times = measure_pairs(
            {
                "raw": lambda: raw_decrypt(aead, body, chunk_size),  # noqa: B023
                "format": lambda: format_decrypt(ciphertext),  # noqa: B023
            },
            runs,
        )
        print(
            f"  {chunk_size // 1024:5d} KiB: raw {throughput(size, times['raw']):6.0f} MiB/s, "
            f"format {throughput(size, times['format']):6.0f} MiB/s, "
            f"ratio {ratio(times, 'raw', 'format'):.3f}"
        )


# The same work as ``encrypt``/``decrypt`` in a process that imports only the format: shows what
# the format itself costs, apart from what importing the whole CLI costs.
STREAM_ONLY = """
import sys
from agent import keys, stream
transform = stream.encrypt_file if sys.argv[1] == "encrypt" else stream.decrypt_file
with open(sys.argv[3], "rb") as fin, open(sys.argv[4], "wb") as fout:
    transform(fin, fout, [keys.read_fragment_file(sys.argv[2])])
"""


def bench_cli(size: int, directory: Path) -> float:
    """Peak RSS of ``azaion-loader encrypt`` and ``decrypt`` processes; returns the largest."""
    key = directory / "bench.key"
    plain, encrypted, decrypted = (directory / n for n in ("cli.plain", "cli.enc", "cli.out"))
    write_random_file(plain, size)
    run_measured(["-m", "agent", "keygen", "--out", str(key), "--force"])
    peaks = []
    for command, source, target in (
        ("encrypt", plain, encrypted),
        ("decrypt", encrypted, decrypted),
    ):
        seconds, peak = run_measured(
            ["-m", "agent", command, "--key-fragment", str(key), str(source), str(target)]
        )
        peaks.append(peak)
        _, only_peak = run_measured(
            ["-c", STREAM_ONLY, command, str(key), str(source), str(target)]
        )
        print(
            f"  {command:7s} {size // MIB:5d} MiB: CLI {seconds:6.2f} s "
            f"({size / seconds / MIB:4.0f} MiB/s), peak RSS {peak:5.1f} MiB; "
            f"format alone peak RSS {only_peak:5.1f} MiB"
        )
    if file_digest(plain) != file_digest(decrypted):
        raise SystemExit("CLI round trip FAILED: the decrypted file differs")
    for path in (plain, encrypted, decrypted):
        path.unlink()
    return max(peaks)


def idle_baselines() -> None:
    cli_idle = run_measured(["-m", "agent", "--version"])[1]
    format_idle = run_measured(["-c", "import agent.keys, agent.stream"])[1]
    print(
        f"  idle processes: azaion-loader --version {cli_idle:5.1f} MiB, "
        f"python importing agent.stream {format_idle:5.1f} MiB"
    )


def run_measured(python_args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a Python process, from GNU time: the child's own peak
    (a child forked from this big process would inherit its high-water mark)."""
    with tempfile.NamedTemporaryFile("r") as report_file:
        command = [TIME, "-f", "%e %M", "-o", report_file.name, sys.executable, *python_args]
        completed = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL)
        if completed.returncode != 0:
            raise SystemExit(f"{python_args[:3]} failed with status {completed.returncode}")
        seconds, peak_kib = report_file.read().split()[-2:]
    return float(seconds), int(peak_kib) / 1024


def report(title: str, size: int, times: dict[str, list[float]]) -> None:
    print(f"\n{title}: {size // MIB} MiB, chunk {stream.CHUNK_SIZE // 1024} KiB, median of "
          f"{len(next(iter(times.values())))} runs")  # fmt: skip
    for name, seconds in times.items():
        print(f"  {name:26s} {throughput(size, seconds):7.0f} MiB/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="data size (default 512)")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--cli-size-mib", type=int, default=1024, help="CLI file (default 1024)")
    parser.add_argument("--skip-cli", action="store_true", help="skip the CLI round trip")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    size = args.size_mib * MIB
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}, {os.cpu_count()} cpus")
    results = bench_memory(size, args.runs)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-stream-") as scratch:
        directory = Path(scratch)
        results |= bench_file(size, args.runs, directory)
        print()
        openssl_speed()
        bench_chunk_sizes(min(size, 256 * MIB), max(3, args.runs // 2))
        if not args.skip_cli and not os.access(TIME, os.X_OK):
            print(f"\nCLI round trip skipped: {TIME} (GNU time) is not installed")
        elif not args.skip_cli:
            print("\nCLI round trip (separate processes; wall time, peak RSS from GNU time):")
            idle_baselines()
            small_peak = bench_cli(min(128, args.cli_size_mib) * MIB, directory)
            results["cli peak RSS MiB"] = max(small_peak, bench_cli(args.cli_size_mib * MIB,
                                                                    directory))  # fmt: skip
    print("\nsummary:")
    for name, value in results.items():
        print(f"  {name:32s} {value:7.3f}")
    ok = results["memory decrypt ratio"] >= DECRYPT_RATIO_GOAL
    ok = ok and results.get("cli peak RSS MiB", 0) < RSS_BUDGET_MIB
    print(f"goals (decrypt >= {DECRYPT_RATIO_GOAL}x raw, CLI RSS < {RSS_BUDGET_MIB} MiB): "
          f"{'met' if ok else 'MISSED'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
