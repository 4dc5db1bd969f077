"""Benchmark: 50 concurrent ``/load`` in bounded memory, ``/status`` fast meanwhile (issue 15).

    .venv/bin/python bench/bench_load_memory.py [--runs 5] [--loads 50] [--size-mb 50]
        [--compare DIR]

A dev-api and a real agent (``python -m agent serve``, logging at INFO as on a device) are
started here; a ``--size-mb`` resource is uploaded through the agent and loaded once (the cache
is warm from then on). Each run, interleaved with ``--compare``'s agent (another checkout, e.g.
``git archive <commit> | tar -x -C DIR``) when given:

1. **one load alone** (the baseline, measured in the same run): its wall time and the agent's
   peak RSS over it;
2. **``--loads`` concurrent loads** over the Unix socket, one aiohttp client reading 256 KiB at
   a time, each body hashed (SHA-256) and compared with the source's: all must be byte-exact.
   The agent's peak RSS is its ``VmHWM``, reset (``clear_refs``) just before; meanwhile a
   separate process asks ``/status`` every 5 ms, each on a new connection, as a local app
   would (its latencies are the agent's, not this busy process's).

Reported: medians of the runs: aggregate MB/s and its ratio to the single load, the agent's
idle RSS, its peak during one load and during the concurrent loads, the load pool's own peak
(``/metrics``, when the agent exposes it), the ``/status`` p50/p99/max, and the load average.
Goals: every body exact; agent peak RSS <= 128 MiB during the concurrent loads; ``/status`` p99
< 20 ms meanwhile (all probes of all runs). Exit status 1 if one is missed. Not a test: the
machine may be shared; read the medians with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from load_common import (
    FOLDER,
    Probe,
    machine,
    pid_of,
    quantile_ms,
    scratch,
    start_agent,
    upload,
)

from azaion_loader_dev.harness.agent import AgentProcess
from azaion_loader_dev.harness.devapi import new_dev_api
from azaion_loader_dev.harness.measure import reset_peak_rss, status_kib

MB = 1000 * 1000
RSS_GOAL_MIB = 128
STATUS_P99_GOAL_MS = 20.0
READ_SIZE = 256 * 1024
NAME = "model.bin"


def pool_peak_mib(agent: AgentProcess) -> float | None:
    """The load pool's peak from ``/metrics`` (None if this agent has no such metric)."""
    body = agent.request("GET", "/metrics").body.decode()
    for line in body.splitlines():
        if line.startswith("azaion_loader_load_buffer_peak_bytes "):
            return float(line.split()[1]) / (1 << 20)
    return None


# -- the loads ----------------------------------------------------------------------------------


async def load_one(session: aiohttp.ClientSession) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    async with session.post(f"http://localhost/load/{NAME}", json={"folder": FOLDER}) as answer:
        if answer.status != 200:
            raise SystemExit(f"/load answered {answer.status}: {await answer.text()}")
        async for piece in answer.content.iter_chunked(READ_SIZE):
            digest.update(piece)
            size += len(piece)
    return digest.hexdigest(), size


async def loads(agent: AgentProcess, count: int) -> tuple[float, list[tuple[str, int]]]:
    """``count`` concurrent loads; (seconds, each body's digest and size)."""
    connector = aiohttp.UnixConnector(path=str(agent.socket_path), limit=count)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.perf_counter()
        answers = await asyncio.gather(*(load_one(session) for _ in range(count)))
        return time.perf_counter() - began, answers


@dataclass
class TreeResult:
    label: str
    idle_mib: float = 0.0
    single_s: list[float] = field(default_factory=list)
    single_peak_mib: list[float] = field(default_factory=list)
    many_s: list[float] = field(default_factory=list)
    many_peak_mib: list[float] = field(default_factory=list)
    pool_peak_mib: list[float] = field(default_factory=list)
    status: list[float] = field(default_factory=list)
    inexact: int = 0


def one_run(agent: AgentProcess, result: TreeResult, args: argparse.Namespace, sha: str) -> None:
    pid, size = pid_of(agent), args.size_mb * MB
    reset_peak_rss(pid)
    seconds, answers = asyncio.run(loads(agent, 1))
    result.single_s.append(seconds)
    result.single_peak_mib.append(status_kib(pid, "VmHWM") / 1024)
    result.inexact += sum(answer != (sha, size) for answer in answers)
    reset_peak_rss(pid)
    probe = Probe(agent.socket_path, "/status")
    seconds, answers = asyncio.run(loads(agent, args.loads))
    result.status += probe.latencies()
    result.many_s.append(seconds)
    result.many_peak_mib.append(status_kib(pid, "VmHWM") / 1024)
    result.inexact += sum(answer != (sha, size) for answer in answers)
    pool = pool_peak_mib(agent)
    if pool is not None:
        result.pool_peak_mib.append(pool)


def report(results: list[TreeResult], args: argparse.Namespace) -> bool:
    ok = True
    size_mb = args.size_mb
    for result in results:
        single = size_mb / statistics.median(result.single_s)
        many = args.loads * size_mb / statistics.median(result.many_s)
        peak = statistics.median(result.many_peak_mib)
        worst = max(result.many_peak_mib)
        p99 = quantile_ms(result.status, 0.99)
        pool = (
            f", load pool peak {max(result.pool_peak_mib):.1f} MiB" if result.pool_peak_mib else ""
        )
        print(
            f"\n== {result.label}: {args.loads} concurrent /load of {size_mb} MB, median of "
            f"{len(result.many_s)} runs"
        )
        print(
            f"  one load alone: {single:.0f} MB/s, agent peak RSS "
            f"{statistics.median(result.single_peak_mib):.1f} MiB (idle {result.idle_mib:.1f})"
        )
        print(
            f"  {args.loads} at once: {many:.0f} MB/s aggregate ({many / single:.2f}x one "
            f"alone), agent peak RSS {peak:.1f} MiB median, {worst:.1f} max "
            f"(goal <= {RSS_GOAL_MIB}){pool}; byte-exact: "
            f"{args.loads * len(result.many_s) + len(result.single_s) - result.inexact} of "
            f"{args.loads * len(result.many_s) + len(result.single_s)}"
        )
        print(
            f"  /status meanwhile: p50 {quantile_ms(result.status, 0.5):.1f} ms, p99 {p99:.1f} "
            f"ms, max {1000 * max(result.status):.1f} ms over {len(result.status)} probes "
            f"(goal p99 < {STATUS_P99_GOAL_MS:.0f} ms)"
        )
        if result is results[0]:
            ok = result.inexact == 0 and worst <= RSS_GOAL_MIB and p99 < STATUS_P99_GOAL_MS
    if len(results) > 1:
        this, other = results
        ratios = [a / b for a, b in zip(this.many_peak_mib, other.many_peak_mib, strict=True)]
        speed = [b / a for a, b in zip(this.many_s, other.many_s, strict=True)]
        print(
            f"\nthis tree / compared: peak RSS {statistics.median(ratios):.2f}x, aggregate "
            f"throughput {statistics.median(speed):.2f}x (medians of per-run ratios)"
        )
    return ok


def bench(root: Path, args: argparse.Namespace) -> list[TreeResult]:
    api = new_dev_api(root / "dev-api")
    agents: dict[str, AgentProcess] = {}
    try:
        source = root / "source"
        data = os.urandom(args.size_mb * MB)
        source.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        del data
        trees: dict[str, Path | None] = {"this tree": None}
        if args.compare is not None:
            trees["compared"] = args.compare.resolve()
        results = []
        for index, (label, tree) in enumerate(trees.items()):
            agent = start_agent(root / f"agent-{index}", api, tree)
            agents[label] = agent
            if index == 0:
                upload(agent, source, NAME)
            asyncio.run(loads(agent, 1))  # the cache is warm from here on
            results.append(TreeResult(label, idle_mib=status_kib(pid_of(agent)) / 1024))
        for run in range(args.runs):
            print(f"  run {run + 1} of {args.runs}", file=sys.stderr, flush=True)
            for result in results:
                one_run(agents[result.label], result, args, sha)
    finally:
        for agent in agents.values():
            agent.stop()
        api.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loads", type=int, default=50)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--compare", type=Path, help="another checkout's agent, interleaved")
    args = parser.parse_args()
    print(machine())
    with scratch("blm") as root:
        results = bench(root, args)
    ok = report(results, args)
    print(f"\ngoals: {'met' if ok else 'MISSED'}; load average now {os.getloadavg()[0]:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
