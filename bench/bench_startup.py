"""Start-up time to READY=1 and idle RSS of the whole agent process.

Runs ``python -m agent serve`` N times with a real NOTIFY_SOCKET, measures the time from
spawning the process to receiving READY=1 (so interpreter start and imports count), then the
process's RSS once idle. Baseline in the same run: a bare ``python -c pass`` start, so the
figure can be read as "agent start-up over Python's own".

    .venv/bin/python bench/bench_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
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


def one_run(root: Path) -> tuple[float, int]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / "notify.sock"))
    notify.settimeout(60)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(root / "notify.sock"),
        "LOADER_SOCKET_PATH": str(root / "loader.sock"),
        "LOADER_HTTP_PORT": "0",
        "LOADER_STATE_DIR": str(root / "state"),
        "MODEL_CACHE_DIR": str(root / "cache"),
        "IMAGES_PATH": str(root / "none.enc"),
        "LOADER_AUTO_UNLOCK": "false",
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "serve"],
        env=env,
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        elapsed = time.perf_counter() - start
        time.sleep(1.0)  # let it settle: this is the idle figure, not a synchronisation
        rss = status_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        notify.close()
        for p in root.iterdir():
            if p.is_socket():
                p.unlink()
    return elapsed, rss


def python_start() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="al-bench-", dir="/tmp"))
    try:
        results = [one_run(root) for _ in range(args.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = statistics.median(python_start() for _ in range(args.runs))
    ready = statistics.median(r[0] for r in results)
    rss = statistics.median(r[1] for r in results)
    print(f"runs: {args.runs}")
    print(f"start to READY=1 (median): {ready * 1000:.0f} ms")
    print(f"bare python start (median): {baseline * 1000:.0f} ms  (ratio {ready / baseline:.1f}x)")
    print(f"idle RSS (median): {rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
