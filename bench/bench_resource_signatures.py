"""Benchmark: what a publisher signature costs a resource's load, end to end.

    .venv/bin/python bench/bench_resource_signatures.py [--sizes-mib 1,64] [--loads 20] [--runs 5]

Starts its own dev-api and two devices' agents (``python -m agent serve``): one trusts no
publisher key (signatures not enforced), one trusts the publisher (every load checks the
resource's signature: the trusted keys looked at, the statement rebuilt from the small part and
the big part's record, Ed25519 verified). For each size, a resource is uploaded unsigned and
the same data signed (``azaion-loader upload --sign-key``: the two-step upload), each timed;
then each agent loads its own, warm from its cache, ``--loads`` times per run (at least 400
MiB's worth: the kernel counts CPU time in 10 ms ticks) over its Unix socket (the CLI's
client), interleaved. A third agent does the uploads. Per load: wall seconds and the agent's CPU
seconds (``/proc/PID/stat``); the ratio is the median over runs of signed / unsigned. The
signature's cost is fixed per load (~40 us of CPU), so it weighs most at the smallest size.

Goal (issue 16): a signed load <= 1.05x an unsigned one at every size (the agent's CPU per
load); exit 1 if missed. The upload's ratio is reported (one upload per case per run: noisier).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from agent import signing
from agent.localclient import AgentClient
from azaion_loader_dev.harness.agent import AgentProcess, agent_env, short_tmpdir
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api
from azaion_loader_dev.harness.measure import cpu_seconds

MIB = 1024 * 1024
GOAL = 1.05
FOLDER = "bench"


class Sink:
    """Where a load's bytes go: counted, not kept."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def start_agent(root: Path, api: DevApi, **env: str) -> AgentProcess:
    agent = AgentProcess(
        root, agent_env(root, RESOURCE_API_URL=api.url, LOADER_LOG_LEVEL="WARNING", **env)
    ).start()
    reply = agent.request("POST", "/login", {"email": api.email, "password": api.password})
    assert reply.status == 200, reply.body
    return agent


def upload(agent: AgentProcess, source: Path, name: str, *sign: str) -> float:
    started = time.perf_counter()
    done = agent.cli("upload", str(source), "--folder", FOLDER, "--name", name, *sign)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - started


def loads(agent: AgentProcess, name: str, size: int, times: int) -> tuple[float, float]:
    """Wall seconds and the agent's CPU seconds per load."""
    client = AgentClient(agent.socket_path, timeout=120)
    pid = agent.proc.pid if agent.proc else 0
    cpu, wall = cpu_seconds(pid), time.perf_counter()
    for _ in range(times):
        sink = Sink()
        client.load(FOLDER, name, sink)  # type: ignore[arg-type]
        assert sink.size == size, (sink.size, size)
    return (time.perf_counter() - wall) / times, (cpu_seconds(pid) - cpu) / times


def run(args: argparse.Namespace, api: DevApi, work: Path) -> bool:
    key = work / "publisher.key"
    signing.write_key_pair(key, "bench")
    trusted = work / "publishers.d"
    trusted.mkdir()
    shutil.copy(key.with_name("publisher.key.pub"), trusted / "publisher.pub")
    uploader = start_agent(short_tmpdir("bench-uploader-"), api)
    plain = start_agent(short_tmpdir("bench-plain-"), api)
    enforcing = start_agent(short_tmpdir("bench-signed-"), api, LOADER_PUBLISHERS_DIR=str(trusted))
    met = True
    try:
        for size_mib in args.sizes_mib:
            size = size_mib * MIB
            source = work / f"data-{size_mib}.bin"
            source.write_bytes(os.urandom(size))
            names = {"unsigned": f"unsigned-{size_mib}.bin", "signed": f"signed-{size_mib}.bin"}
            device = {"unsigned": plain, "signed": enforcing}
            sign = {"unsigned": (), "signed": ("--sign-key", str(key), "--release", "1")}
            uploads: dict[str, list[float]] = {"unsigned": [], "signed": []}
            timed: dict[str, list[tuple[float, float]]] = {"unsigned": [], "signed": []}
            for case in uploads:
                uploads[case].append(upload(uploader, source, names[case], *sign[case]))
                loads(device[case], names[case], size, 2)  # warm: the part is in its cache
            for run_index in range(args.runs):
                order = ["unsigned", "signed"] if run_index % 2 == 0 else ["signed", "unsigned"]
                for case in order:
                    uploads[case].append(upload(uploader, source, names[case], *sign[case]))
                for case in order:
                    loads(device[case], names[case], size, 1)  # the new upload, into the cache
                    times = max(args.loads, args.loads * 20 // size_mib)  # CPU ticks are 10 ms
                    timed[case].append(loads(device[case], names[case], size, times))
            pairs = list(zip(timed["signed"], timed["unsigned"], strict=True))
            wall = statistics.median(s[0] / u[0] for s, u in pairs)
            cpu = statistics.median(s[1] / u[1] for s, u in pairs)
            up = statistics.median(
                s / u for s, u in zip(uploads["signed"], uploads["unsigned"], strict=True)
            )
            ok = cpu <= GOAL
            met = met and ok
            unsigned_ms = statistics.median(u[0] for u in timed["unsigned"]) * 1000
            signed_ms = statistics.median(s[0] for s in timed["signed"]) * 1000
            cpu_ms = statistics.median(u[1] for u in timed["unsigned"]) * 1000
            print(
                f"{size_mib:>5} MiB  load: unsigned {unsigned_ms:7.2f} ms ({cpu_ms:.2f} ms agent "
                f"CPU), signed {signed_ms:7.2f} ms; signed/unsigned: agent CPU {cpu:.3f}x "
                f"[{'met' if ok else 'MISSED'}: <= {GOAL}x], wall {wall:.3f}x; upload "
                f"(CLI, whole) {up:.3f}x"
            )
    finally:
        for agent in (uploader, plain, enforcing):
            agent.stop()
            shutil.rmtree(agent.root, ignore_errors=True)
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes-mib", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64]
    )
    parser.add_argument("--loads", type=int, default=20, help="loads per case per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = short_tmpdir("bench-ressig-")
    try:
        api = new_dev_api(work / "dev-api")
        try:
            met = run(args, api, work)
        finally:
            api.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("goal met" if met else "goal MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
