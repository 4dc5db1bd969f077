"""Benchmark of resource loading (issue 4): ResourceStore from a warm cache and from dev-api.

    .venv/bin/python bench/bench_resources.py [--sizes-mib 100,1024] [--runs 5]

For each size, one resource is uploaded through ``ResourceStore`` to a dev-api started here,
then, in the same run and interleaved (medians of ``--runs``):

1. raw AES-256-GCM decrypt of the same amount in memory, 64 KiB records: the raw-primitive
   baseline of bench/bench_stream.py;
2. reading the plaintext file (page-cached): what any "load" costs at least;
3. dev-api's raw CDN download of the big part (aiohttp GET, bytes discarded);
4. ``ResourceStore.open`` + iterate, warm cache, steady state (the file was verified earlier in
   the same process, as in a running agent);
5. the same, first load after an agent restart (the cache file is hashed once);
6. the same, cold cache: download from dev-api's CDN, SHA-256, then decrypt.

Every load runs in a child process (``--child``), which reports its wall time and peak RSS
(``VmHWM``), so the RSS is that of a process doing nothing but the load.

Goals: warm steady-state load >= 0.7x the raw decrypt throughput; peak RSS < 100 MiB whatever
the size. Exit status 1 if one is missed. Not a test: the machine may be shared; use medians.

The same loads through a running agent's Unix socket (``/load``): bench/bench_load_socket.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.api_client import ResourceApiClient
from agent.resources import READ_SIZE, ResourceStore
from azaion_loader_dev.harness.measure import (
    MIB,
    RawDecrypt,
    cpu_seconds,
    make_plaintext,
    status_kib,
)

if TYPE_CHECKING:  # the parent's only: a measured child imports no more than a load needs
    from azaion_loader_dev.harness.devapi import DevApi

RAW_DECRYPT_MIB = 256
WARM_RATIO_GOAL = 0.7
RSS_GOAL_MIB = 100
FOLDER = "bench"


# -- the child: one load, timed, with its peak RSS ------------------------------------------------


async def child_load(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "read":
        return await asyncio.to_thread(read_file, Path(args.path))
    async with ResourceApiClient(args.url) as api:
        api.set_credentials(args.email, args.password)
        await api.login()
        if args.child == "cdn":
            return await timed_async(drain(api.iter_big_part(FOLDER, args.big_name)))
        store = ResourceStore(api, Path(args.cache))
        results = {}
        for label in args.labels.split(","):  # several loads, one process: a running agent
            results[label] = await timed_async(drain_resource(store, args.name))
        await store.close()
        return results


async def drain(chunks: AsyncIterator[bytes]) -> int:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
    return total


async def drain_resource(store: ResourceStore, name: str) -> int:
    resource_ = await store.open(FOLDER, name)
    try:
        total = await drain(resource_)
    finally:
        await resource_.aclose()
    assert total == resource_.size
    return total


async def timed_async(work: Any) -> dict[str, Any]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    size = await work
    return {"seconds": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu, "bytes": size}


def read_file(path: Path) -> dict[str, Any]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    total = 0
    with path.open("rb") as file:
        while block := file.read(READ_SIZE):
            total += len(block)
    return {"seconds": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu, "bytes": total}


def run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# -- the parent ------------------------------------------------------------------------------------


async def upload(api: DevApi, cache: Path, source: Path, name: str) -> tuple[float, str]:
    async def chunks() -> AsyncIterator[bytes]:
        with source.open("rb") as file:
            while block := await asyncio.to_thread(file.read, READ_SIZE):
                yield block

    async with ResourceApiClient(api.url) as client:
        client.set_credentials(api.email, api.password)
        store = ResourceStore(client, cache)
        start = time.perf_counter()
        result = await store.upload(FOLDER, name, chunks())
        return time.perf_counter() - start, result.big_sha256


def mib_s(size: int, seconds: float) -> float:
    return size / seconds / MIB


def bench_size(api: DevApi, root: Path, size_mib: int, runs: int) -> dict[str, Any]:
    size = size_mib * MIB
    name = f"model-{size_mib}"
    source = root / f"{name}.plain"
    make_plaintext(source, size)
    warm_cache = root / "warm-cache"
    upload_seconds, big_name = asyncio.run(upload(api, warm_cache, source, name))
    # "--flag=value": a generated password may start with "-", which argparse takes for a flag.
    common = [
        f"--url={api.url}",
        f"--email={api.email}",
        f"--password={api.password}",
        f"--name={name}",
    ]
    raw = RawDecrypt(RAW_DECRYPT_MIB * MIB)
    cases = ("raw", "read", "cdn", "warm", "restart", "cold")
    wall: dict[str, list[float]] = {case: [] for case in cases}  # MiB/s per run
    cpu: dict[str, list[float]] = {case: [] for case in cases}  # MiB per CPU second per run
    rss: dict[str, int] = {}

    def record(case: str, result: dict[str, Any], mib: float = size_mib) -> None:
        wall[case].append(mib / result["seconds"])
        cpu[case].append(mib / max(result["cpu"], 1e-9))

    for _ in range(runs):
        record("raw", raw.run(), raw.size / MIB)
        record("read", run_child("read", "--path", str(source)))
        record("cdn", run_child("cdn", *common, "--big-name", big_name))
        warm = run_child("load", *common, "--cache", str(warm_cache), "--labels", "restart,warm")
        record("restart", warm["restart"])
        record("warm", warm["warm"])
        rss["warm"] = max(rss.get("warm", 0), warm["maxrss_kib"])
        cold_cache = root / "cold-cache"
        shutil.rmtree(cold_cache, ignore_errors=True)
        cold = run_child("load", *common, "--cache", str(cold_cache), "--labels", "cold")
        record("cold", cold["cold"])
        rss["cold"] = max(rss.get("cold", 0), cold["maxrss_kib"])
        shutil.rmtree(cold_cache, ignore_errors=True)
    source.unlink()
    return {
        "size_mib": size_mib,
        "upload_mib_s": size_mib / upload_seconds,
        "wall": {case: statistics.median(values) for case, values in wall.items()},
        "cpu": {case: statistics.median(values) for case, values in cpu.items()},
        "warm_vs_raw_wall": statistics.median(
            w / r for w, r in zip(wall["warm"], wall["raw"], strict=True)
        ),
        "warm_vs_raw_cpu": statistics.median(
            w / r for w, r in zip(cpu["warm"], cpu["raw"], strict=True)
        ),
        "peak_rss_mib": {case: kib / 1024 for case, kib in rss.items()},
    }


LABELS = {
    "raw": "raw AES-GCM decrypt (memory)",
    "read": "read plaintext file",
    "cdn": "dev-api raw CDN download",
    "warm": "load, warm cache (steady)",
    "restart": "load, warm cache, 1st after restart",
    "cold": "load, cold cache (from dev-api)",
}


def report(results: list[dict[str, Any]]) -> bool:
    ok = True
    for result in results:
        print(f"\n== {result['size_mib']} MiB (upload {result['upload_mib_s']:.0f} MiB/s)")
        print(f"  {'':<38} {'MiB/s':>8} {'MiB/CPU-s':>10}")
        for case, label in LABELS.items():
            print(f"  {label:<38} {result['wall'][case]:8.0f} {result['cpu'][case]:10.0f}")
        wall, cpu = result["warm_vs_raw_wall"], result["warm_vs_raw_cpu"]
        print(f"  warm load / raw decrypt: {wall:.2f}x wall, {cpu:.2f}x CPU (goal >= 0.7x)")
        for case, mib in result["peak_rss_mib"].items():
            print(f"  peak RSS, {case} load process: {mib:.0f} MiB (goal < {RSS_GOAL_MIB} MiB)")
        ok = ok and max(wall, cpu) >= WARM_RATIO_GOAL
        ok = ok and all(mib < RSS_GOAL_MIB for mib in result["peak_rss_mib"].values())
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="100,1024")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", choices=("read", "cdn", "load"))
    for option in ("url", "email", "password", "name", "big-name", "cache", "labels", "path"):
        parser.add_argument(f"--{option}")
    args = parser.parse_args()
    if args.child:
        result = asyncio.run(child_load(args))
        result["maxrss_kib"] = status_kib("self", "VmHWM")
        print(json.dumps(result))
        return 0
    from azaion_loader_dev.harness.devapi import new_dev_api

    print(f"{os.cpu_count()} CPUs; READ_SIZE {READ_SIZE // 1024} KiB; runs {args.runs} (medians)")
    with tempfile.TemporaryDirectory(prefix="bench-resources-") as tmp:
        root = Path(tmp)
        api = new_dev_api(root / "dev-api")
        try:
            results = [
                bench_size(api, root, int(size), args.runs) for size in args.sizes_mib.split(",")
            ]
        finally:
            api.stop()
    ok = report(results)
    print("\nall goals met" if ok else "\na goal was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
