"""Benchmark: a fleet of devices booting at once against one rate-limited Resource API.

Each simulated device is the real code in an asyncio task: ``ResourceApiClient`` (its own
session, so its own connections) and ``agent.retry.retry_call`` with ``BOOT_RETRY_POLICY`` as
the outer loop around single-attempt calls, as ``agent/unlock/manager.py`` does:
``login()``, then ``get_key_fragment()``. The devices start uniformly at random over
``--spread`` s (a fleet powering up) against one dev-api run with ``--rate-limit``
(429 with ``Retry-After`` beyond it). Time to key is from a device's start to its key fragment.

Two runs, same start times: with jitter (the production code as it is), and the baseline with
jitter switched off (an ``rng`` whose ``uniform(a, b)`` is ``b``: plain exponential backoff).
dev-api's ``/_dev/stats`` gives the API requests it saw each second, answered and attempted.

Then the CDN: the devices each download one big part (``--part-kib``) through the real resume
path (``BigPartDownloads`` into a ``BigPartCache`` of their own) from a dev-api without the
limit that drops ``--drop`` of the CDN's bodies half-way; every one must complete, byte-exact,
and the CDN must send at most 1.10x the bytes needed (dev-api counts what it wrote).

Goals: the API answers at most 1.1x its limit in every second after the first; every device
gets its key; the jittered p99 time to key beats the baseline's; every download completes with
bytes sent / bytes needed <= 1.10. Exit 1 if one is missed.

    .venv/bin/python bench/bench_fleet.py [--devices 1000] [--spread 10] [--rate-limit 50]
        [--part-kib 256] [--drop 0.05] [--seed 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from agent.api_client import ResourceApiClient
from agent.cache import BigPartCache
from agent.download import BigPartDownloads
from agent.retry import retry_call
from agent.unlock.manager import BOOT_RETRY_POLICY, SINGLE_ATTEMPT
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api

RUN_TIMEOUT = 150.0  # seconds a run may take before the devices still booting are given up
MAX_RATE_OVER_LIMIT = 1.1
MAX_BYTES_RATIO = 1.10
LAG_PERIOD = 0.05


class MaxRandom(random.Random):
    """Jitter switched off: every draw from a range is its top, so the backoff is plain
    exponential (``min(cap, base * 2**(n-1))``) and the pause ``max(that, Retry-After)``."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class FleetRun:
    name: str
    times: list[float] = field(default_factory=list)  # time to key of each device that got it
    attempts: list[int] = field(default_factory=list)  # API requests each device made
    failures: list[str] = field(default_factory=list)
    wall: float = 0.0
    attempted: list[int] = field(default_factory=list)  # API requests per second, from dev-api
    answered: list[int] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # event-loop lag samples, seconds

    def percentile(self, q: float) -> float:
        return percentile(self.times, q)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def watch_lag(samples: list[float], stop: asyncio.Event) -> None:
    """How late the loop wakes a task up: if it is late, the clients' times are too."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(LAG_PERIOD)
        samples.append(loop.time() - before - LAG_PERIOD)


async def at(start: float, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + start - time.monotonic()))


async def boot(api: DevApi, start: float, t0: float, rng: random.Random, run: FleetRun) -> None:
    """One device's boot: log in, then fetch the images key fragment, each by the boot policy's
    loop around single attempts (as ``UnlockManager._fetch_fragments``)."""
    await at(start, t0)
    began = time.monotonic()
    attempts = 0

    def counted(call: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        def attempt() -> Awaitable[Any]:
            nonlocal attempts
            attempts += 1
            return call()

        return attempt

    client = ResourceApiClient(api.url, rng=rng)
    client.set_credentials(api.email, api.password)
    try:
        await retry_call(
            counted(lambda: client.login(policy=SINGLE_ATTEMPT)), BOOT_RETRY_POLICY, rng=rng
        )
        fragment = await retry_call(
            counted(lambda: client.get_key_fragment(policy=SINGLE_ATTEMPT)),
            BOOT_RETRY_POLICY,
            rng=rng,
        )
    except Exception as exc:  # a device that failed is a result, not the end of the bench
        run.failures.append(f"{type(exc).__name__}: {exc}")
        return
    finally:
        await client.close()
    if fragment != api.key_fragment:
        run.failures.append("wrong key fragment")
        return
    run.times.append(time.monotonic() - began)
    run.attempts.append(attempts)


async def fleet(api: DevApi, run: FleetRun, starts: list[float], rngs: list[random.Random]) -> None:
    stop = asyncio.Event()
    lag = asyncio.create_task(watch_lag(run.lag, stop))
    api.clear_stats()
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(boot(api, start, t0, rng, run))
        for start, rng in zip(starts, rngs, strict=True)
    ]
    _, pending = await asyncio.wait(tasks, timeout=RUN_TIMEOUT)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    run.failures += [f"still booting after {RUN_TIMEOUT:.0f} s"] * len(pending)
    run.wall = time.monotonic() - t0
    stop.set()
    await lag
    rates = api.stats()["api_per_second"]
    run.attempted, run.answered = rates["attempted"], rates["answered"]


# -- the CDN -----------------------------------------------------------------------------------


@dataclass
class CdnRun:
    devices: int
    size: int
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    requests: int = 0
    times: list[float] = field(default_factory=list)
    wall: float = 0.0
    lag: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_sent / (self.devices * self.size)


async def download(
    api: DevApi,
    where: Path,
    part: tuple[str, str, int, bytes],
    start: float,
    t0: float,
    run: CdnRun,
) -> None:
    folder, name, size, digest = part
    await at(start, t0)
    began = time.monotonic()
    rng = random.Random()
    async with ResourceApiClient(api.url, rng=rng) as client:
        client.set_credentials(api.email, api.password)
        downloads = BigPartDownloads(client, BigPartCache(where))
        try:
            await retry_call(
                lambda: client.login(policy=SINGLE_ATTEMPT), BOOT_RETRY_POLICY, rng=rng
            )
            path = await downloads.fetch(folder, name, size, digest, what=f"big part {name}")
            data = await asyncio.to_thread(path.read_bytes)
        except Exception as exc:
            run.failures.append(f"{type(exc).__name__}: {exc}")
            return
        finally:
            await downloads.close()
    if hashlib.sha256(data).digest() != digest:
        run.failures.append("the downloaded part differs")
        return
    run.completed += 1
    run.times.append(time.monotonic() - began)


async def cdn(api: DevApi, work: Path, run: CdnRun, starts: list[float], drop: float) -> None:
    body = os.urandom(run.size)
    digest = hashlib.sha256(body).digest()
    folder, name = "fleet", digest.hex()
    source = work / "part.bin"
    source.write_bytes(body)
    async with ResourceApiClient(api.url) as uploader:
        await uploader.login(api.email, api.password)
        await uploader.put_big_part(folder, name, source, run.size)
    api.clear_stats()
    api.faults(drop_mid_body=True, path="/cdn/", method="GET", count=None, probability=drop)
    stop = asyncio.Event()
    lag = asyncio.create_task(watch_lag(run.lag, stop))
    t0 = time.monotonic()
    part = (folder, name, run.size, digest)
    tasks = [
        download(api, work / f"device-{index}", part, start, t0, run)
        for index, start in enumerate(starts)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), RUN_TIMEOUT)
    except TimeoutError:
        run.failures.append(f"downloads still running after {RUN_TIMEOUT:.0f} s")
    run.wall = time.monotonic() - t0
    stop.set()
    await lag
    api.clear_faults()
    stats = api.stats()
    key = f"GET /cdn/{folder}/{name}"
    run.bytes_sent = stats["bytes_sent"].get(key, 0)
    run.requests = stats["requests"].get(key, 0)


# -- the report --------------------------------------------------------------------------------


def peak(values: list[int], first: int = 1) -> int:
    return max(values[first:], default=0)


def fleet_rows(runs: list[FleetRun], limit: float, spread: float) -> list[str]:
    after_boot = int(spread) + 1
    rows = [
        f"{'run':<12} {'ok':>6} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'req/dev':>7} "
        f"{'answered peak':>13} {'attempted peak':>14} {f'attempted >{after_boot}s':>14} "
        f"{'wall s':>7} {'lag p99 ms':>10}"
    ]
    for run in runs:
        rows.append(
            f"{run.name:<12} {len(run.times):>6} {run.percentile(0.50):>7.2f} "
            f"{run.percentile(0.99):>7.2f} {max(run.times, default=float('nan')):>7.2f} "
            f"{statistics.fmean(run.attempts or [0]):>7.2f} "
            f"{peak(run.answered):>13} {peak(run.attempted):>14} "
            f"{peak(run.attempted, after_boot):>14} {run.wall:>7.1f} "
            f"{percentile(run.lag, 0.99) * 1000:>10.1f}"
        )
    rows.append(f"(peaks: API requests in one second, after the first; limit {limit:g}/s)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=10.0, help="boots start within this")
    parser.add_argument("--rate-limit", type=float, default=50.0, help="API requests a second")
    parser.add_argument("--part-kib", type=int, default=256, help="size of the CDN's big part")
    parser.add_argument("--drop", type=float, default=0.05, help="share of CDN bodies dropped")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-cdn", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    logger.remove()  # the clients' retry warnings would be thousands of lines
    # A socket per device and the dev-api's side of each: more than the usual 1024 files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8 * args.devices)), hard))

    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    seeds = random.Random(args.seed)
    starts = [seeds.uniform(0.0, args.spread) for _ in range(args.devices)]
    print(f"load average before: {os.getloadavg()}", flush=True)
    limited = new_dev_api(work / "limited-api", ["--rate-limit", f"{args.rate_limit:g}"])
    runs: list[FleetRun] = []
    cdn_run = CdnRun(args.devices, args.part_kib * 1024)
    try:
        for name, rng_class in (("jitter", random.Random), ("no jitter", MaxRandom)):
            run = FleetRun(name)
            rngs: list[random.Random] = [
                rng_class(args.seed * 100_000 + i) for i in range(len(starts))
            ]
            print(f"fleet run: {name} ({args.devices} devices) ...", flush=True)
            asyncio.run(fleet(limited, run, starts, rngs))
            runs.append(run)
            print(f"  done in {run.wall:.1f} s; load average {os.getloadavg()}", flush=True)
        if not args.skip_cdn:
            plain = new_dev_api(work / "cdn-api", [])
            try:
                print(f"CDN run: {args.devices} downloads, {args.drop:.0%} dropped ...", flush=True)
                asyncio.run(cdn(plain, work, cdn_run, starts, args.drop))
                print(f"  done in {cdn_run.wall:.1f} s; load average {os.getloadavg()}", flush=True)
            finally:
                plain.stop()
    finally:
        limited.stop()
        shutil.rmtree(work, ignore_errors=True)
    return report(args, runs, cdn_run)


def report(args: argparse.Namespace, runs: list[FleetRun], cdn_run: CdnRun) -> int:
    jitter, baseline = runs
    limit = args.rate_limit
    print()
    print("\n".join(fleet_rows(runs, limit, args.spread)))
    goals = {
        f"every device gets its key ({args.devices})": all(
            len(run.times) == args.devices for run in runs
        ),
        f"API answers <= {MAX_RATE_OVER_LIMIT}x {limit:g}/s after the first second (jitter)": (
            peak(jitter.answered) <= MAX_RATE_OVER_LIMIT * limit
        ),
        "p99 time to key with jitter < without": jitter.percentile(0.99)
        < baseline.percentile(0.99),
    }
    for run in runs:
        for failure in sorted(set(run.failures))[:5]:
            print(f"  {run.name}: {run.failures.count(failure)} x {failure}")
    figures: dict[str, Any] = {
        "load_average_after": os.getloadavg(),
        "fleet": {
            run.name: {
                "devices_with_key": len(run.times),
                "p50_s": run.percentile(0.5),
                "p99_s": run.percentile(0.99),
                "requests_per_device": statistics.fmean(run.attempts or [0]),
                "answered_peak_after_first_second": peak(run.answered),
                "attempted_peak_after_first_second": peak(run.attempted),
                "attempted_peak_after_boot_window": peak(run.attempted, int(args.spread) + 1),
                "answered_per_second": run.answered,
                "attempted_per_second": run.attempted,
                "loop_lag_p99_ms": percentile(run.lag, 0.99) * 1000,
                "loop_lag_max_ms": max(run.lag, default=0.0) * 1000,
            }
            for run in runs
        },
    }
    if not args.skip_cdn:
        print()
        print(
            f"CDN: {cdn_run.completed}/{cdn_run.devices} downloads of {cdn_run.size // 1024} KiB "
            f"complete in {cdn_run.wall:.1f} s, {cdn_run.requests} requests; bytes sent / needed "
            f"{cdn_run.bytes_sent} / {cdn_run.devices * cdn_run.size} = {cdn_run.ratio:.4f}; "
            f"time to part p50 {percentile(cdn_run.times, 0.5):.2f} s, "
            f"p99 {percentile(cdn_run.times, 0.99):.2f} s; "
            f"loop lag p99 {percentile(cdn_run.lag, 0.99) * 1000:.1f} ms"
        )
        for failure in sorted(set(cdn_run.failures))[:5]:
            print(f"  CDN: {cdn_run.failures.count(failure)} x {failure}")
        goals[f"every download completes, {args.drop:.0%} of bodies dropped"] = (
            cdn_run.completed == cdn_run.devices
        )
        goals[f"CDN bytes sent / needed <= {MAX_BYTES_RATIO}"] = cdn_run.ratio <= MAX_BYTES_RATIO
        figures["cdn"] = {
            "completed": cdn_run.completed,
            "bytes_sent": cdn_run.bytes_sent,
            "bytes_needed": cdn_run.devices * cdn_run.size,
            "requests": cdn_run.requests,
            "bytes_ratio": cdn_run.ratio,
        }
    print(f"load average after: {os.getloadavg()}")
    print()
    for goal, met in goals.items():
        print(f"{'met   ' if met else 'MISSED'}  {goal}")
    figures["goals"] = goals
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
