"""Benchmark of a cold ``POST /load``: streamed while the big part downloads (issue 15, goal 2).

    .venv/bin/python bench/bench_load_cold.py [--size-mib 256] [--runs 5] [--cdn-rates 0,100]

A dev-api and a real agent (``python -m agent serve``, by ``azaion_loader_dev.harness``) are
started per CDN rate (``--cdn-rates``, MiB/s; 0: dev-api sends as fast as it can, over
loopback; else dev-api's ``--cdn-rate``, a field-like link). One resource is uploaded through
the agent's socket and one cold load checked byte for byte. Then, interleaved in each run (the
order rotates from run to run), medians of ``--runs``:

1. raw CDN download: dev-api's big part by an aiohttp GET in this process, bytes discarded;
2. raw decrypt: AES-256-GCM of as many bytes in memory, 64 KiB records (bench_stream.py's
   raw baseline);
3. cold ``/load`` over the socket: the cached big part (and any partial file) deleted first,
   so the agent downloads it; the client reads 1 MiB at a time and discards. Timed from the
   request to the last byte, and to the first byte of the body.

The figure is the median of per-run ratios cold / max(raw download, raw decrypt) (both sides
measured in the same run); goal <= 1.25x at every capped rate given (at the uncapped rate too
when no capped one is given), exit 1 if missed. Uncapped, over loopback, dev-api, the agent and
the client share this machine's cores and the agent's cold load is bound by its own CPU (the
SHA-256 of every byte alone costs about as much as the raw download's wall time): its figure
is printed, with each process's CPU seconds to show why, but not judged. Also printed:
time to the first byte against the raw download's time (what streaming gains over loading only
once the download is complete), and the CPU seconds of each process during the cold load
(agent, dev-api, client) next to the raw download's (dev-api, this process): on loopback the
three share this machine's cores, which says how far the ratio can go there. Not a test: the
machine may be shared; use medians, and read the load average printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from load_common import (
    cdn_download,
    check_one_load,
    drop_cached,
    machine,
    pid_of,
    scratch,
    socket_load,
    start_agent,
    upload,
)

from azaion_loader_dev.harness.agent import AgentProcess
from azaion_loader_dev.harness.devapi import new_dev_api
from azaion_loader_dev.harness.measure import (
    MIB,
    RawDecrypt,
    cpu_seconds,
    file_digest,
    make_plaintext,
)

GOAL = 1.25
NAME = "model"
CASES = ("cdn", "raw", "cold")


@dataclass
class Run:
    seconds: dict[str, float] = field(default_factory=dict)
    first_byte: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # "<case> <process>": CPU seconds


@dataclass
class RateResult:
    rate_mib: float
    size_mib: float
    runs: list[Run] = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0

    def median(self, case: str) -> float:
        return statistics.median(run.seconds[case] for run in self.runs)

    def ratio(self) -> float:
        return statistics.median(
            run.seconds["cold"] / max(run.seconds["cdn"], run.seconds["raw"]) for run in self.runs
        )

    def cpu(self, key: str) -> float:
        return statistics.median(run.cpu.get(key, 0.0) for run in self.runs)


def cold_load(socket_path: Path) -> tuple[float, float, int]:
    """``POST /load``: (seconds to the first body byte, seconds to the last, bytes)."""
    start = time.perf_counter()
    loaded = socket_load(socket_path, NAME)
    return loaded.first_byte - start, time.perf_counter() - start, loaded.size


def bench_rate(root: Path, rate_mib: float, size_mib: float, runs: int) -> RateResult:
    result = RateResult(rate_mib, size_mib, load_before=os.getloadavg()[0])
    extra = ["--cdn-rate", str(int(rate_mib * MIB))] if rate_mib else []
    where = root / f"rate-{rate_mib:g}"
    api = new_dev_api(where / "dev-api", extra)
    agent: AgentProcess | None = None
    source = where / "plain"
    try:
        agent = start_agent(where / "agent", api, LOADER_HTTP_PORT="0")
        size = int(size_mib * MIB)
        make_plaintext(source, size)
        uploaded = upload(agent, source, NAME)
        big_name = str(uploaded["big_sha256"])
        drop_cached(agent, big_name)
        check_one_load(agent, NAME, size, file_digest(source))  # cold: the cache was dropped
        raw = RawDecrypt(int(uploaded["big_size"]))
        assert api.process is not None
        pids = {"agent": pid_of(agent), "dev-api": api.process.pid, "client": "self"}

        def measured(run: Run, case: str) -> None:
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            if case == "cdn":
                run.seconds[case] = asyncio.run(cdn_download(api, big_name))["seconds"]
            elif case == "raw":
                run.seconds[case] = raw.run()["seconds"]
            else:
                drop_cached(agent, big_name)
                run.first_byte, run.seconds[case], count = cold_load(agent.socket_path)
                if count != size:
                    raise SystemExit(f"a cold /load sent {count} bytes, not {size}")
            for name, pid in pids.items():
                run.cpu[f"{case} {name}"] = cpu_seconds(pid) - before[name]

        for index in range(runs):
            print(f"  {rate_mib:g} MiB/s: run {index + 1} of {runs}", file=sys.stderr, flush=True)
            run = Run()
            for offset in range(len(CASES)):
                measured(run, CASES[(index + offset) % len(CASES)])
            result.runs.append(run)
    finally:
        if agent is not None:
            agent.stop()
        api.stop()
        source.unlink(missing_ok=True)
    result.load_after = os.getloadavg()[0]
    return result


def report(result: RateResult) -> bool:
    link = f"CDN capped at {result.rate_mib:g} MiB/s" if result.rate_mib else "CDN uncapped"
    mib = result.size_mib
    print(
        f"\n== {link}, {mib:g} MiB, median of {len(result.runs)} runs (load average "
        f"{result.load_before:.1f} before, {result.load_after:.1f} after)"
    )
    for case, label in (
        ("cdn", "raw CDN download (aiohttp GET)"),
        ("raw", "raw AES-GCM decrypt (memory)"),
        ("cold", "cold /load over the socket"),
    ):
        seconds = result.median(case)
        print(f"  {label:<34} {seconds:7.3f} s {mib / seconds:7.0f} MiB/s")
    first = statistics.median(run.first_byte for run in result.runs)
    first_share = statistics.median(run.first_byte / run.seconds["cdn"] for run in result.runs)
    print(
        f"  cold /load first body byte after {1000 * first:.1f} ms "
        f"({100 * first_share:.1f}% of the raw download's time)"
    )
    print(
        "  CPU seconds (median): "
        + "; ".join(
            f"{case}: "
            + ", ".join(
                f"{name} {result.cpu(f'{case} {name}'):.2f}"
                for name in ("agent", "dev-api", "client")
            )
            for case in ("cdn", "cold")
        )
    )
    agent_cpu = result.cpu("cold agent")
    print(f"  agent during the cold /load: {mib / max(agent_cpu, 1e-9):.0f} MiB per CPU-s")
    ratio = result.ratio()
    print(f"  cold /load / max(raw download, raw decrypt): {ratio:.2f}x (goal <= {GOAL}x)")
    return ratio <= GOAL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=256, help="resource size (256)")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument(
        "--cdn-rates", default="0,100", help="MiB/s, comma-separated; 0: uncapped (0,100)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (/tmp)")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.cdn_rates.split(",")]
    print(machine())
    with scratch("blc", args.dir) as root:
        results = [bench_rate(root, rate, args.size_mib, args.runs) for rate in rates]
    met = {result.rate_mib: report(result) for result in results}
    judged = [rate for rate in met if rate] or list(met)
    print(f"\njudged at: {', '.join(f'{rate:g} MiB/s' if rate else 'uncapped' for rate in judged)}")
    ok = all(met[rate] for rate in judged)
    print(f"\ngoals: {'met' if ok else 'MISSED'}; load average now {os.getloadavg()[0]:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
