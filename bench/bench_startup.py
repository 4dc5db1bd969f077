"""Start-up time to READY=1 and idle RSS of the whole agent process, what its imports cost, and
what the first requests after READY=1 cost.

Runs ``python -m agent serve`` N times with a real NOTIFY_SOCKET, measures the time from
spawning the process to receiving READY=1 (so interpreter start and imports count), then the
process's RSS once idle. Baseline in the same run, interleaved: a bare ``python -c pass``
start, so the figure can be read as "agent start-up over Python's own". Then the first
requests: a dev-api is started and one 1 MiB resource uploaded (its big part then cached); for
each run a fresh agent holding credentials is started and, the moment READY=1 arrives, asked
``GET /status`` twice and ``POST /load`` of that resource twice over its Unix socket, each timed
on its own: whatever start-up put off until after READY=1 (or builds on first use) shows as the
first request's excess over the second. Then the same start under ``python -X importtime``, the
imports' own time summed by top-level package (median over the runs): what the serving path
pays for before READY=1.

The agent's modules are compiled to bytecode first (``compileall``, as the .deb's postinst
does), so a ``PYTHONDONTWRITEBYTECODE`` environment does not count compiling them.

``--compare DIR`` runs another checkout of the project (say ``git worktree add /tmp/base
<commit>``) the same way, interleaved with this one: before and after, side by side, in the
same conditions.

Goals (issue 15, goal 4): start to READY=1 <= 250 ms, median; the first ``/status`` and the
first ``/load`` after READY=1 <= 100 ms each, median. Exit status 1 if one is missed. Not a
test: the machine may be shared, so read the medians and the load average printed with them.

    .venv/bin/python bench/bench_startup.py [--runs 5] [--compare DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from azaion_loader_dev.harness.agent import AgentProcess, agent_env, unix_request
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api
from azaion_loader_dev.harness.measure import status_kib

REPO = Path(__file__).resolve().parents[1]
GOAL_MS = 250
FIRST_REQUEST_GOAL_MS = 100
TOP_GROUPS = 14
RESOURCE_FOLDER, RESOURCE_NAME, RESOURCE_SIZE = "bench", "first-load.bin", 1 << 20
REQUESTS = ("status", "status again", "load", "load again")  # in this order, see first_requests


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
    root: Path,
    tree: Path,
    *,
    settle: float = 1.0,
    python_flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    on_ready: Callable[[], object] | None = None,
    cpu_ms: list[float] | None = None,
) -> tuple[float, int, str]:
    """Seconds to READY=1, idle RSS (KiB) after ``settle`` seconds, and the process's stderr;
    the CPU time it took to READY=1 is appended to ``cpu_ms``, and ``on_ready`` is called, the
    moment READY=1 arrives."""
    cpu_ms = [] if cpu_ms is None else cpu_ms
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / "notify.sock"))
    notify.settimeout(60)
    with tempfile.TemporaryFile("w+", dir=root) as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "agent", "serve"],
            env={**serve_env(root, tree), **(env or {})},
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            elapsed = time.perf_counter() - start
            cpu_ms.append(cpu_seconds(proc.pid) * 1000)
            if on_ready is not None:
                on_ready()
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


def upload_resource(api: DevApi, root: Path) -> dict[str, str]:
    """Upload the resource the first ``/load`` asks for through an agent of this tree, and load
    it once (its big part is then in the cache the measured agents share); the environment
    that gives those agents the dev-api and its credentials."""
    env = {
        "RESOURCE_API_URL": api.url,
        "AZAION_EMAIL": api.email,
        "AZAION_PASSWORD": api.password,
        "MODEL_CACHE_DIR": str(root / "shared-cache"),
        "LOADER_ALLOWED_GROUPS": "root",
    }
    source = root / RESOURCE_NAME
    source.write_bytes(os.urandom(RESOURCE_SIZE))
    (root / "uploader").mkdir()
    agent = AgentProcess(root / "uploader", agent_env(root / "uploader", **env)).start()
    try:
        boundary = "bench-startup-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="folder"\r\n\r\n'
                f"{RESOURCE_FOLDER}\r\n--{boundary}\r\nContent-Disposition: form-data; "
                f'name="file"; filename="{RESOURCE_NAME}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + source.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        reply = unix_request(agent.socket_path, "POST", f"/upload/{RESOURCE_NAME}", body, headers)
        if reply.status != 200:
            raise SystemExit(f"upload: {reply.status} {reply.body[:200]!r}")
        load_resource(agent.socket_path)
    finally:
        agent.stop()
    return env


def load_resource(socket_path: Path) -> None:
    body = json.dumps({"folder": RESOURCE_FOLDER}).encode()
    headers = {"Content-Type": "application/json"}
    reply = unix_request(socket_path, "POST", f"/load/{RESOURCE_NAME}", body, headers)
    if reply.status != 200 or len(reply.body) != RESOURCE_SIZE:
        raise SystemExit(f"/load: {reply.status}, {len(reply.body)} bytes")


def get_status(socket_path: Path) -> None:
    if unix_request(socket_path, "GET", "/status").status != 200:
        raise SystemExit("/status did not answer 200")


def first_requests(socket_path: Path) -> dict[str, float]:
    """Seconds each of the first requests took, one after the other, from READY=1 on."""
    seconds = {}
    for name in REQUESTS:
        start = time.perf_counter()
        (load_resource if name.startswith("load") else get_status)(socket_path)
        seconds[name] = time.perf_counter() - start
    return seconds


def cpu_seconds(pid: int) -> float:
    """CPU time of all of the process's threads so far (``schedstat``: nanoseconds, not ticks)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir()) / 1e9


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
    cpu: dict[str, list[float]] = {label: [] for label in trees}
    rss: dict[str, list[int]] = {label: [] for label in trees}
    firsts: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    imports: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    baseline = []
    print(f"load average before: {load_average()}")
    api = new_dev_api(root / "dev-api")
    try:
        for _ in range(args.runs):  # interleaved: drifting load hits every case alike
            baseline.append(python_start())
            for label, tree in trees.items():
                elapsed, idle, _ = one_run(root, tree, cpu_ms=cpu[label])
                ready[label].append(elapsed)
                rss[label].append(idle)
        with_api = upload_resource(api, root)
        for _ in range(args.runs):
            for label, tree in trees.items():
                one_run(
                    root,
                    tree,
                    settle=0,
                    env=with_api,
                    on_ready=lambda label=label: firsts[label].append(
                        first_requests(root / "loader.sock")
                    ),
                )
        for _ in range(args.runs):
            for label, tree in trees.items():
                *_, stderr = one_run(root, tree, settle=0, python_flags=("-X", "importtime"))
                imports[label].append(import_groups(stderr))
    finally:
        api.stop()
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
        print(
            f"  CPU time to READY=1 (median, all threads): {statistics.median(cpu[label]):.0f} ms"
        )
        print(f"  idle RSS (median): {statistics.median(rss[label]) / 1024:.1f} MiB")
        print("  first requests after READY=1 (median ms, one after the other): " + ", ".join(
            f"{name} {statistics.median(run[name] for run in firsts[label]) * 1000:.1f}"
            for name in REQUESTS))  # fmt: skip
    if "compared" in trees:
        ratios = [a / b for a, b in zip(ready["this tree"], ready["compared"], strict=True)]
        print(f"this tree / compared, start to READY=1: {statistics.median(ratios):.2f} "
              f"(median of per-run ratios)")  # fmt: skip
    for label in trees:
        report_imports(label, imports[label])
    ready_ms = statistics.median(ready["this tree"]) * 1000
    first_ms = {
        name: statistics.median(run[name] for run in firsts["this tree"]) * 1000
        for name in ("status", "load")
    }
    met = ready_ms <= GOAL_MS
    print(f"\ngoal (start to READY=1 <= {GOAL_MS} ms, median): {'met' if met else 'MISSED'} "
          f"({ready_ms:.0f} ms)")  # fmt: skip
    for name, ms in first_ms.items():
        first_met = ms <= FIRST_REQUEST_GOAL_MS
        met = met and first_met
        print(f"goal (first /{name} after READY=1 <= {FIRST_REQUEST_GOAL_MS} ms, median): "
              f"{'met' if first_met else 'MISSED'} ({ms:.1f} ms)")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
