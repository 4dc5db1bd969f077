"""``azaion-loader encrypt``/``decrypt`` of a large file against a minimal raw pipeline.

    .venv/bin/python bench/bench_cli.py [--size-mib 1024] [--runs 5] [--dir DIR] [--compare DIR]

For each command, the same work in the fewest lines Python allows is the yardstick: a script
that imports only ``cryptography``'s AESGCM, reads 64 KiB (plus the tag, to decrypt), seals or
opens it with the same nonces and writes it, then fsyncs the output as the CLI does (it writes a
header of the same size when encrypting). Both run as separate processes under GNU
``/usr/bin/time`` (wall, user and system seconds, peak RSS of the process itself), interleaved
run by run and in alternating order, each writing a file that does not exist yet; the ratio is
the median of per-run ratios CLI / raw. ``--compare DIR`` runs another checkout's CLI too (say a
``git worktree`` of the base commit), interleaved the same way. Then the CLI's start-up alone:
``azaion-loader --version`` against ``python`` importing AESGCM.

Goal (issue 3): CLI <= 1.15x the raw pipeline's wall time for both commands, and the CLI's peak
RSS < 48 MiB. Exit status 1 if missed. Not a test: the machine may be shared, so read the
medians and the load average printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent import keys, stream
from azaion_loader_dev.harness.measure import file_digest, write_random_file

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TIME = "/usr/bin/time"
RATIO_GOAL = 1.15
RSS_GOAL_MIB = 48
VERBS = ("encrypt", "decrypt")

# The yardstick: the same reads, AEAD calls, writes and fsync as the CLI, and nothing else.
RAW_PIPELINE = """
import os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
verb, key, header, source, target = sys.argv[1:]
aead, chunk, tag, header = AESGCM(bytes.fromhex(key)), 1 << 16, 16, bytes.fromhex(header)
with open(source, "rb") as fin, open(target, "wb") as fout:
    size = os.fstat(fin.fileno()).st_size
    if verb == "decrypt":
        fin.seek(len(header))
        read, run, chunks = chunk + tag, aead.decrypt, -(-(size - len(header)) // (chunk + tag))
    else:
        fout.write(header)
        read, run, chunks = chunk, aead.encrypt, max(1, -(-size // chunk))
    for i in range(chunks):
        nonce = i.to_bytes(11, "big") + (b"\\x01" if i == chunks - 1 else b"\\x00")
        fout.write(run(nonce, fin.read(read), None))
    fout.flush()
    os.fsync(fout.fileno())
"""


@dataclass(frozen=True)
class Run:
    wall: float
    user: float
    system: float
    peak_mib: float


def measured(command: list[str], env: dict[str, str], cwd: Path) -> Run:
    """One process under GNU time: its own figures, not this (large) process's."""
    with tempfile.NamedTemporaryFile("r") as report:
        full = [TIME, "-f", "%e %U %S %M", "-o", report.name, *command]
        completed = subprocess.run(full, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
        if completed.returncode != 0:
            raise SystemExit(f"{command[:4]} failed with status {completed.returncode}")
        wall, user, system, peak_kib = report.read().split()[-4:]
    return Run(float(wall), float(user), float(system), int(peak_kib) / 1024)


def tree_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def median_of(runs: list[Run], field: str) -> float:
    return statistics.median(float(getattr(run, field)) for run in runs)


def report(verb: str, size_mib: int, cases: dict[str, list[Run]]) -> float:
    """Print each case's medians; returns the median per-run wall ratio CLI / raw."""
    print(f"\n{verb} {size_mib} MiB (medians of {len(cases['raw'])} interleaved runs):")
    for name, runs in cases.items():
        wall = median_of(runs, "wall")
        print(f"  {name:10s} wall {wall:6.2f} s ({size_mib / wall:5.0f} MiB/s)  user "
              f"{median_of(runs, 'user'):5.2f} s  system {median_of(runs, 'system'):5.2f} s  "
              f"peak RSS {median_of(runs, 'peak_mib'):5.1f} MiB")  # fmt: skip
    ratios = {}
    for name in cases:
        if name != "raw":
            ratios[name] = statistics.median(
                a.wall / b.wall for a, b in zip(cases[name], cases["raw"], strict=True)
            )
            cpu = statistics.median(
                (a.user + a.system) / (b.user + b.system)
                for a, b in zip(cases[name], cases["raw"], strict=True)
            )
            print(f"  {name} / raw: wall {ratios[name]:.3f}, cpu {cpu:.3f} (median of per-run "
                  f"ratios)")  # fmt: skip
    return ratios["CLI"]


def startup(trees: dict[str, Path], runs: int) -> None:
    cases: dict[str, list[Run]] = {name: [] for name in ("python + AESGCM", *trees)}
    importing = [sys.executable, "-c", "from cryptography.hazmat.primitives.ciphers import aead"]
    for _ in range(runs):
        cases["python + AESGCM"].append(measured(importing, dict(os.environ), REPO))
        for name, tree in trees.items():
            version = [sys.executable, "-m", "agent", "--version"]
            cases[name].append(measured(version, tree_env(tree), tree))
    print(f"\nstart-up alone (medians of {runs}): ", end="")
    print(", ".join(f"{name} {median_of(c, 'wall') * 1000:.0f} ms" for name, c in cases.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (on disk)")
    parser.add_argument("--compare", type=Path, help="another checkout's CLI, run the same way")
    args = parser.parse_args()
    if not os.access(TIME, os.X_OK):
        raise SystemExit(f"{TIME} (GNU time) is needed for each process's own figures")
    trees = {"CLI": REPO} | ({"compared": args.compare.resolve()} if args.compare else {})
    for tree in trees.values():  # as installed (the .deb's postinst compiles the bytecode)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "agent")], check=True)
    size = args.size_mib * MIB
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load average {load_average()}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-cli-") as scratch:
        directory = Path(scratch)
        key, plain, encrypted = directory / "key", directory / "plain", directory / "enc"
        keys.write_fragment_file(key, keys.generate_fragment())
        write_random_file(plain, size)
        cli = [sys.executable, "-m", "agent"]
        measured([*cli, "encrypt", "--key-fragment", str(key), str(plain), str(encrypted)],
                 tree_env(REPO), REPO)  # fmt: skip
        with open(encrypted, "rb") as file:
            header_bytes = file.read(stream.HEADER_SIZE)
        header = stream.parse_header(header_bytes)
        payload_key = stream.open_header(header, [keys.read_fragment_file(key)]).payload_key
        sources = {"encrypt": plain, "decrypt": encrypted}
        ratios, peaks = {}, []
        for verb in VERBS:
            cases: dict[str, list[Run]] = {name: [] for name in ("raw", *trees)}
            commands = {
                "raw": ([sys.executable, "-c", RAW_PIPELINE, verb, payload_key.hex(),
                         header_bytes.hex(), str(sources[verb])], dict(os.environ), REPO),
            } | {
                name: ([*cli, verb, "--key-fragment", str(key), str(sources[verb])],
                       tree_env(tree), tree)
                for name, tree in trees.items()
            }  # fmt: skip
            for run in range(args.runs):
                order = list(commands) if run % 2 == 0 else list(reversed(commands))
                for name in order:
                    command, env, cwd = commands[name]
                    out = directory / f"out-{name}"
                    out.unlink(missing_ok=True)  # a new file each time, its removal not timed
                    cases[name].append(measured([*command, str(out)], env, cwd))
            if verb == "decrypt" and file_digest(directory / "out-CLI") != file_digest(plain):
                raise SystemExit("the CLI's decrypted file differs from the original")
            for name in commands:
                (directory / f"out-{name}").unlink(missing_ok=True)
            ratios[verb] = report(verb, args.size_mib, cases)
            peaks.append(max(run.peak_mib for run in cases["CLI"]))
        startup(trees, max(args.runs, 9))
    print(f"\nload average after: {load_average()}")
    met = all(ratio <= RATIO_GOAL for ratio in ratios.values()) and max(peaks) < RSS_GOAL_MIB
    print(f"goal (CLI <= {RATIO_GOAL}x raw pipeline, wall, both commands; peak RSS < "
          f"{RSS_GOAL_MIB} MiB): {'met' if met else 'MISSED'} (encrypt {ratios['encrypt']:.3f}x, "
          f"decrypt {ratios['decrypt']:.3f}x, peak {max(peaks):.1f} MiB)")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
