"""Start-up time to READY=1 and idle RSS of the whole agent process, and what its imports cost.

Runs ``python -m agent serve`` N times with a real NOTIFY_SOCKET, measures the time from
spawning the process to receiving READY=1 (so interpreter start and imports count), then the
process's RSS once idle. Baseline in the same run, interleaved: a bare ``python -c pass``
start, so the figure can be read as "agent start-up over Python's own". Then the same start
under ``python -X importtime``, the imports' own time summed by top-level package (median over
the runs): what the serving path pays for before READY=1.

The agent's modules are compiled to bytecode first (``compileall``, as the .deb's postinst
does), so a ``PYTHONDONTWRITEBYTECODE`` environment does not count compiling them.

``--compare DIR`` runs another checkout of the project (say ``git worktree add /tmp/base
<commit>``) the same way, interleaved with this one: before and after, side by side, in the
same conditions.

Goal (issue 2): start to READY=1 <= 250 ms, median. Exit status 1 if missed. Not a test: the
machine may be shared, so read the medians and the load average printed with them.

    .venv/bin/python bench/bench_startup.py [--runs 5] [--compare DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from azaion_loader_dev.harness.measure import status_kib

REPO = Path(__file__).resolve().parents[1]
GOAL_MS = 250
TOP_GROUPS = 14


def serve_env(root: Path, tree: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(tree),  # this checkout's agent, whichever one is installed
        "NOTIFY_SOCKET": str(root / "notify.sock"),
        "LOADER_SOCKET_PATH": str(root / "loader.sock"),
        "LOADER_HTTP_PORT": "0",
        "LOADER_STATE_DIR": str(root / "state"),
        "MODEL_CACHE_DIR": str(root / "cache"),
        "IMAGES_PATH": str(root / "none.enc"),
        "LOADER_AUTO_UNLOCK": "false",
    }


def one_run(
    root: Path, tree: Path, *, settle: float = 1.0, python_flags: tuple[str, ...] = ()
) -> tuple[float, int, str]:
    """Seconds to READY=1, idle RSS (KiB) after ``settle`` seconds, and the process's stderr."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / "notify.sock"))
    notify.settimeout(60)
    with tempfile.TemporaryFile("w+", dir=root) as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "agent", "serve"],
            env=serve_env(root, tree),
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            elapsed = time.perf_counter() - start
            time.sleep(settle)  # let it settle: this is the idle figure, not a synchronisation
            rss = status_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            notify.close()
            for p in root.iterdir():
                if p.is_socket():
                    p.unlink()
        stderr.seek(0)
        return elapsed, rss, stderr.read()


def python_start() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def import_groups(importtime_output: str) -> dict[str, float]:
    """``-X importtime`` lines summed by top-level package: each module's own time, in ms."""
    groups: collections.Counter[str] = collections.Counter()
    for line in importtime_output.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line[len("import time:") :].split("|")
        groups[name.strip().split(".")[0]] += int(own)
    return {name: us / 1000 for name, us in groups.items()}


def compile_tree(tree: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(tree / "agent")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def report_imports(label: str, runs: list[dict[str, float]]) -> None:
    names = set().union(*runs)
    median = {name: statistics.median(run.get(name, 0.0) for run in runs) for name in names}
    ranked = sorted(median.items(), key=lambda item: -item[1])
    total = sum(median.values())
    print(f"\nimports before READY=1, {label} (-X importtime, own time by package, median of "
          f"{len(runs)}): {total:.0f} ms in {len(names)} packages")  # fmt: skip
    for name, ms in ranked[:TOP_GROUPS]:
        print(f"  {name:24s} {ms:7.1f} ms")
    rest = ranked[TOP_GROUPS:]
    print(f"  {f'({len(rest)} others)':24s} {sum(ms for _, ms in rest):7.1f} ms")
    for heavy in ("docker", "requests", "urllib3"):
        print(f"  {heavy} imported: {'YES' if heavy in names else 'no'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another checkout to run the same way")
    args = parser.parse_args()
    trees = {"this tree": REPO}
    if args.compare is not None:
        trees["compared"] = args.compare.resolve()
    for tree in trees.values():
        compile_tree(tree)
    root = Path(tempfile.mkdtemp(prefix="al-bench-", dir="/tmp"))
    ready: dict[str, list[float]] = {label: [] for label in trees}
    rss: dict[str, list[int]] = {label: [] for label in trees}
    imports: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    baseline = []
    print(f"load average before: {load_average()}")
    try:
        for _ in range(args.runs):  # interleaved: drifting load hits every case alike
            baseline.append(python_start())
            for label, tree in trees.items():
                elapsed, idle, _ = one_run(root, tree)
                ready[label].append(elapsed)
                rss[label].append(idle)
        for _ in range(args.runs):
            for label, tree in trees.items():
                *_, stderr = one_run(root, tree, settle=0, python_flags=("-X", "importtime"))
                imports[label].append(import_groups(stderr))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    python_ms = statistics.median(baseline) * 1000
    print(f"load average after:  {load_average()}")
    print(f"runs: {args.runs}, interleaved; bare python start (median): {python_ms:.0f} ms")
    for label, tree in trees.items():
        ms = statistics.median(ready[label]) * 1000
        low, high = min(ready[label]) * 1000, max(ready[label]) * 1000
        print(f"{label} ({tree}):")
        print(f"  start to READY=1 (median): {ms:.0f} ms  (min {low:.0f}, max {high:.0f}; "
              f"{ms / python_ms:.1f}x bare python)")  # fmt: skip
        print(f"  idle RSS (median): {statistics.median(rss[label]) / 1024:.1f} MiB")
    if "compared" in trees:
        ratios = [a / b for a, b in zip(ready["this tree"], ready["compared"], strict=True)]
        print(f"this tree / compared, start to READY=1: {statistics.median(ratios):.2f} "
              f"(median of per-run ratios)")  # fmt: skip
    for label in trees:
        report_imports(label, imports[label])
    ready_ms = statistics.median(ready["this tree"]) * 1000
    met = ready_ms <= GOAL_MS
    print(f"\ngoal (start to READY=1 <= {GOAL_MS} ms, median): {'met' if met else 'MISSED'} "
          f"({ready_ms:.0f} ms)")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
