"""Load benchmark of the local API (issue 7): throughput, latency under an unlock, 50 loads.

    .venv/bin/python bench/bench_load.py [--runs 3] [--duration 5] [--connections 16]
        [--load-mb 50] [--loads 50] [--unlock-mb 1000] [--skip-unlock] [--json FILE]

Everything is real and started here: the agent (``python -m agent serve``, logging at WARNING,
as a device would), a dev-api behind it, and for the unlock a private dockerd. Each part is
measured ``--runs`` times, interleaved; the report gives medians.

1. **Throughput**, idle agent: ``GET /health`` and ``GET /status`` over the Unix socket and over
   TCP with the same aiohttp client (``--connections`` keep-alive connections, closed loop,
   ``--duration`` s each): requests/s, p50, p99; the socket/TCP ratio. Over TCP also ``wrk``
   (Debian's, one thread), a generator that costs the 2-core machine far less than Python, so
   its figure is closer to what the agent itself can serve. The Python client shares the CPU
   with the agent: its figures are a floor.
2. **Responsiveness during an unlock**: an open-loop probe (``--probe-rate`` requests/s, each
   timed from when it was due, so a stalled event loop cannot hide) of ``/status`` over the
   socket while the agent decrypts a ``--unlock-mb`` archive into the engine at full speed, from
   the moment the state is ``loading`` until it is not (or ``--duration``). Baseline: the same
   probe on the same agent just before. Goal: p99 < 20 ms while loading.
4. **The peer check** (access by peer identity, ``agent.peers``): the same agent with the
   check and without it (started through ``bench/agent_without_peer_check.py``, which switches
   it off before serving), interleaved: ``GET /health`` p99 over keep-alive connections, and
   ``POST /unlock`` (refused or answered at once: nothing to unlock) with a **new connection
   for every request**, so each one pays the kernel lookup (``SO_PEERCRED`` on the socket,
   ``sock_diag`` on TCP). Goal: the check adds <= 0.5 ms to the p99 of each.
3. **50 concurrent /load** of a ``--load-mb`` resource over the socket: every body is
   byte-exact (SHA-256 of the stream equals the source's); the agent's RSS is sampled every
   20 ms (and its ``VmHWM``) against its RSS just before; the aggregate throughput against one
   load alone (warm cache), and a cold run where all 50 share one CDN download. Goal: all
   exact; the agent's peak RSS grows by less than 256 MiB.

Exit status 1 if a goal is missed. Not a test: this machine may be shared; use the medians.
Needs root and docker.io for part 2 (``--skip-unlock`` leaves it out).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from azaion_loader_dev.harness.agent import AgentProcess, agent_env, short_tmpdir
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api
from azaion_loader_dev.harness.measure import status_kib

MIB = 1 << 20
MB = 1000 * 1000
P99_GOAL_MS = 20.0
RSS_GROWTH_GOAL_MIB = 256
RSS_SAMPLE_S = 0.02
PEER_CHECK_GOAL_MS = 0.5
IMAGE_REF = "azaion/bench-load:1.0"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
NO_PEER_CHECK = Path(__file__).resolve().parent / "agent_without_peer_check.py"


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.seconds)
        return {
            "requests": len(ordered),
            "errors": self.errors,
            "rps": round(len(ordered) / self.elapsed, 1) if self.elapsed else 0.0,
            "p50_ms": round(_percentile(ordered, 50) * 1000, 2),
            "p99_ms": round(_percentile(ordered, 99) * 1000, 2),
            "max_ms": round((ordered[-1] if ordered else 0.0) * 1000, 2),
        }


def _percentile(ordered: list[float], pct: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))
    return ordered[index]


def session_for(
    agent: AgentProcess, transport: str, limit: int, force_close: bool = False
) -> tuple[aiohttp.ClientSession, str]:
    """A client session over the socket or TCP; ``force_close``: a new connection per request."""
    if transport == "unix":
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
            path=str(agent.socket_path), limit=limit, force_close=force_close
        )
        base = "http://localhost"
    else:
        connector = aiohttp.TCPConnector(limit=limit, force_close=force_close)
        base = f"http://127.0.0.1:{agent.port}"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    return aiohttp.ClientSession(connector=connector, timeout=timeout), base


async def closed_loop(
    agent: AgentProcess, transport: str, path: str, connections: int, duration: float
) -> Latencies:
    """``connections`` workers, each sending the next request when the last one is answered."""
    result = Latencies()
    session, base = session_for(agent, transport, connections)
    async with session:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get(base + path) as response:
                    await response.read()
                    if response.status != 200:
                        result.errors += 1
                        continue
                result.seconds.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        result.elapsed = time.perf_counter() - began
    return result


async def open_loop(
    agent: AgentProcess,
    path: str,
    rate: float,
    duration: float,
    keep_going: Callable[[], Awaitable[bool]] | None = None,
) -> Latencies:
    """A request every 1/``rate`` s over the socket, each timed from when it was due."""
    result = Latencies()
    session, base = session_for(agent, "unix", 64)
    interval = 1 / rate
    async with session:

        async def one(due: float) -> None:
            async with session.get(base + path) as response:
                await response.read()
                if response.status != 200:
                    result.errors += 1
                    return
            result.seconds.append(time.perf_counter() - due)

        tasks = []
        began = time.perf_counter()
        due = began
        checked = began
        while due < began + duration:
            now = time.perf_counter()
            if keep_going is not None and now - checked > 0.2:
                checked = now
                if not await keep_going():
                    break
            if now < due:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(due)))
            due += interval
        await asyncio.gather(*tasks)
        result.elapsed = time.perf_counter() - began
    return result


def wrk(agent: AgentProcess, path: str, connections: int, duration: float) -> dict[str, float]:
    """``wrk`` over TCP: requests/s and its latency percentiles."""
    out = subprocess.run(
        [WRK, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
         f"http://127.0.0.1:{agent.port}{path}"],
        capture_output=True, text=True, check=True, timeout=duration + 60,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _wrk_ms(latency["50"]),
        "p99_ms": _wrk_ms(latency["99"]),
        "errors": int(errors.group(1)) if errors else 0,
    }


def _wrk_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 3)


# -- the pieces ----------------------------------------------------------------------------------


@dataclass
class Setup:
    work: Path
    api: DevApi
    archive: Path | None = None
    docker_host: str | None = None
    source_sha256: str = ""
    load_size: int = 0


def start_agent(setup: Setup, argv: list[str] | None = None, **env: str) -> AgentProcess:
    root = short_tmpdir("bl-")
    settings = agent_env(root, RESOURCE_API_URL=setup.api.url, LOADER_LOG_LEVEL="WARNING", **env)
    agent = AgentProcess(root, settings)
    if argv is not None:
        agent.argv = argv
    agent.start()
    login = agent.request(
        "POST", "/login", {"email": setup.api.email, "password": setup.api.password}
    )
    if login.status != 200:
        raise SystemExit(f"login failed: {login.body!r}")
    return agent


def stop_agent(agent: AgentProcess) -> None:
    agent.stop()
    shutil.rmtree(agent.root, ignore_errors=True)


async def throughput(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    agent = start_agent(setup)
    try:
        results: dict[str, Any] = {}
        await closed_loop(agent, "unix", "/health", args.connections, 0.5)  # warm-up, dropped
        for path in ("/health", "/status"):
            for transport in ("unix", "tcp"):
                run = await closed_loop(agent, transport, path, args.connections, args.duration)
                results[f"{transport} {path}"] = run.summary()
            results[f"wrk {path}"] = wrk(agent, path, args.connections, args.duration)
        return results
    finally:
        stop_agent(agent)


async def per_connection(
    agent: AgentProcess, transport: str, method: str, path: str, duration: float
) -> Latencies:
    """One request per new connection, back to back, for ``duration`` s."""
    result = Latencies()
    session, base = session_for(agent, transport, 1, force_close=True)
    async with session:
        began = time.perf_counter()
        while time.perf_counter() - began < duration:
            started = time.perf_counter()
            async with session.request(method, base + path, json={}) as response:
                await response.read()
            result.seconds.append(time.perf_counter() - started)
        result.elapsed = time.perf_counter() - began
    return result


async def peer_check(setup: Setup, args: argparse.Namespace, run: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    order = ("on", "off") if run % 2 == 0 else ("off", "on")  # neither always goes first
    for variant in order:
        argv = None if variant == "on" else [sys.executable, str(NO_PEER_CHECK), "serve"]
        agent = start_agent(setup, argv=argv)
        try:
            await closed_loop(agent, "unix", "/health", args.connections, 0.5)  # warm-up
            for transport in ("unix", "tcp"):
                keep = await closed_loop(agent, transport, "/health", args.connections,
                                         args.duration)  # fmt: skip
                fresh = await per_connection(agent, transport, "POST", "/unlock", args.duration)
                results[f"{variant} {transport} /health"] = keep.summary()
                results[f"{variant} {transport} POST /unlock new connection"] = fresh.summary()
        finally:
            stop_agent(agent)
    return results


async def during_unlock(setup: Setup, daemon: Any, args: argparse.Namespace) -> dict[str, Any]:
    client = daemon.client()
    for image in client.images.list(IMAGE_REF):
        client.images.remove(image.id, force=True)
    assert setup.archive is not None and setup.docker_host is not None
    agent = start_agent(setup, IMAGES_PATH=str(setup.archive), DOCKER_HOST=setup.docker_host)
    try:
        idle = await open_loop(agent, "/status", args.probe_rate, args.duration)
        reply = agent.request("POST", "/unlock")
        if reply.status not in (200, 202):
            raise SystemExit(f"unlock did not start: {reply.body!r}")
        while (state := unlock_state(agent)) != "loading":
            if state in ("ready", "error"):
                raise SystemExit(f"the unlock never reached loading: {state}")
            await asyncio.sleep(0.01)

        async def loading() -> bool:  # in a thread: the probe's loop must not stall
            return await asyncio.to_thread(unlock_state, agent) == "loading"

        busy = await open_loop(agent, "/status", args.probe_rate, args.duration, loading)
        while unlock_state(agent) not in ("ready", "error"):
            await asyncio.sleep(0.1)
        snapshot = agent.request("GET", "/unlock/status").json()
        if snapshot["state"] != "ready":
            raise SystemExit(f"unlock failed: {snapshot['error']}")
        return {
            "idle": idle.summary(),
            "loading": busy.summary(),
            "window_s": round(busy.elapsed, 2),
            "p99_ratio": round(busy.summary()["p99_ms"] / max(idle.summary()["p99_ms"], 1e-3), 2),
        }
    finally:
        stop_agent(agent)


def unlock_state(agent: AgentProcess) -> str:
    return str(agent.request("GET", "/unlock/status").json()["state"])


async def load_one(session: aiohttp.ClientSession, name: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    async with session.post(f"http://localhost/load/{name}", json={"folder": "bench"}) as answer:
        if answer.status != 200:
            raise SystemExit(f"/load answered {answer.status}: {await answer.text()}")
        async for chunk in answer.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def concurrent_loads(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    agent = start_agent(setup)
    assert agent.proc is not None
    pid = agent.proc.pid
    session = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(agent.socket_path), limit=args.loads),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
    )
    results: dict[str, Any] = {}
    try:
        async with session:
            await load_one(session, "model.bin")  # cold: fills the cache
            began = time.perf_counter()
            exact = await load_one(session, "model.bin")
            results["single_warm_s"] = round(time.perf_counter() - began, 3)
            assert exact == (setup.source_sha256, setup.load_size)
            for variant in ("warm", "cold"):
                if variant == "cold":
                    for cached in Path(agent.env["MODEL_CACHE_DIR"]).rglob("*"):
                        if cached.is_file():
                            cached.unlink()
                results[variant] = await _many_loads(session, pid, setup, args.loads)
        results["aggregate_over_single"] = round(
            results["warm"]["aggregate_mb_s"] / (setup.load_size / MB / results["single_warm_s"]),
            2,
        )
        results["vm_hwm_mib"] = round(status_kib(pid, "VmHWM") / 1024, 1)
        return results
    finally:
        stop_agent(agent)


async def _many_loads(
    session: aiohttp.ClientSession, pid: int, setup: Setup, count: int
) -> dict[str, Any]:
    before = status_kib(pid)
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, status_kib(pid))
            await asyncio.sleep(RSS_SAMPLE_S)

    sampler = asyncio.create_task(sample())
    began = time.perf_counter()
    answers = await asyncio.gather(*(load_one(session, "model.bin") for _ in range(count)))
    elapsed = time.perf_counter() - began
    done.set()
    await sampler
    exact = sum(answer == (setup.source_sha256, setup.load_size) for answer in answers)
    return {
        "exact": exact,
        "of": count,
        "seconds": round(elapsed, 2),
        "aggregate_mb_s": round(count * setup.load_size / MB / elapsed, 1),
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_growth_mib": round((peak - before) / 1024, 1),
    }


# -- preparing -----------------------------------------------------------------------------------


def prepare_resource(setup: Setup, size: int) -> None:
    source = setup.work / "model.bin"
    digest = hashlib.sha256()
    with source.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MIB))
            digest.update(block)
            out.write(block)
            left -= len(block)
    setup.source_sha256, setup.load_size = digest.hexdigest(), size
    agent = start_agent(setup)
    try:
        up = agent.cli("upload", str(source), "--folder", "bench")
        if up.returncode != 0:
            raise SystemExit(f"upload failed: {up.stderr}")
    finally:
        stop_agent(agent)
        source.unlink()


def prepare_archive(setup: Setup, size: int) -> Any:
    from agent.images import ImageEngine
    from agent.pack import pack_images
    from azaion_loader_dev.harness.dockerd import DockerDaemon, import_big_image

    daemon = DockerDaemon.start_new()
    print(f"building a {size / MB:.0f} MB image and its archive ...", flush=True)
    import_big_image(daemon.client(), IMAGE_REF, size)
    setup.archive = setup.work / "images.enc"
    with ImageEngine.connect(daemon.host) as engine:
        pack_images(engine, [IMAGE_REF], setup.archive, [setup.api.key_fragment])
    setup.docker_host = daemon.host
    return daemon


# -- report --------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], *keys: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in keys:
            value = value[key]
        values.append(float(value))
    return round(statistics.median(values), 2)


def peer_check_summary(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    summary: dict[str, Any] = {}
    ok = True
    for transport in ("unix", "tcp"):
        for what in ("/health", "POST /unlock new connection"):
            on = median_of(runs, f"on {transport} {what}", "p99_ms")
            off = median_of(runs, f"off {transport} {what}", "p99_ms")
            summary[f"{transport} {what}"] = {
                "p99_on_ms": on,
                "p99_off_ms": off,
                "added_ms": round(on - off, 3),
            }
            if on - off > PEER_CHECK_GOAL_MS:
                ok = False
    return summary, ok


def report(
    results: dict[str, list[dict[str, Any]]], args: argparse.Namespace
) -> tuple[dict[str, Any], bool]:
    ok = True
    summary: dict[str, Any] = {"runs": args.runs, "connections": args.connections}
    if args.only_peer_check:
        summary["peer_check"], ok = peer_check_summary(results["peer_check"])
        return summary, ok
    tp = results["throughput"]
    summary["throughput"] = {
        name: {key: median_of(tp, name, key) for key in tp[0][name] if key != "requests"}
        for name in tp[0]
    }
    summary["throughput"]["socket_over_tcp_rps"] = {
        path: round(median_of(tp, f"unix {path}", "rps") / median_of(tp, f"tcp {path}", "rps"), 2)
        for path in ("/health", "/status")
    }
    if results.get("unlock"):
        un = results["unlock"]
        summary["during_unlock"] = {
            "probe_rate": args.probe_rate,
            "idle_p99_ms": median_of(un, "idle", "p99_ms"),
            "loading_p50_ms": median_of(un, "loading", "p50_ms"),
            "loading_p99_ms": median_of(un, "loading", "p99_ms"),
            "loading_max_ms": median_of(un, "loading", "max_ms"),
            "window_s": median_of(un, "window_s"),
            "p99_ratio": median_of(un, "p99_ratio"),
        }
        if summary["during_unlock"]["loading_p99_ms"] >= P99_GOAL_MS:
            ok = False
    summary["peer_check"], peer_ok = peer_check_summary(results["peer_check"])
    ok = ok and peer_ok
    ld = results["loads"]
    summary["loads"] = {
        "load_mb": args.load_mb,
        "concurrent": args.loads,
        "single_warm_s": median_of(ld, "single_warm_s"),
        "aggregate_over_single": median_of(ld, "aggregate_over_single"),
        "vm_hwm_mib": median_of(ld, "vm_hwm_mib"),
    }
    for variant in ("warm", "cold"):
        summary["loads"][variant] = {
            key: median_of(ld, variant, key)
            for key in (
                "seconds",
                "aggregate_mb_s",
                "rss_before_mib",
                "rss_peak_mib",
                "rss_growth_mib",
            )
        }
        exact = min(run[variant]["exact"] for run in ld)
        summary["loads"][variant]["exact_min"] = f"{exact}/{args.loads}"
        if (
            exact != args.loads
            or summary["loads"][variant]["rss_growth_mib"] >= RSS_GROWTH_GOAL_MIB
        ):
            ok = False
    return summary, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--probe-rate", type=float, default=200.0)
    parser.add_argument("--load-mb", type=int, default=50)
    parser.add_argument("--loads", type=int, default=50)
    parser.add_argument("--unlock-mb", type=int, default=1000)
    parser.add_argument("--skip-unlock", action="store_true")
    parser.add_argument("--only-peer-check", action="store_true", help="part 4 alone")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    setup = Setup(work=work, api=new_dev_api(work / "dev-api", []))
    daemon = None
    results: dict[str, list[dict[str, Any]]] = {
        "throughput": [],
        "unlock": [],
        "loads": [],
        "peer_check": [],
    }
    try:
        prepare_resource(setup, args.load_mb * MB)
        if not (args.skip_unlock or args.only_peer_check):
            daemon = prepare_archive(setup, args.unlock_mb * MB)
        for run in range(args.runs):
            if not args.only_peer_check:
                results["throughput"].append(asyncio.run(throughput(setup, args)))
            results["peer_check"].append(asyncio.run(peer_check(setup, args, run)))
            if daemon is not None:
                results["unlock"].append(asyncio.run(during_unlock(setup, daemon, args)))
            if not args.only_peer_check:
                results["loads"].append(asyncio.run(concurrent_loads(setup, args)))
            print(f"run {run + 1}/{args.runs} done", flush=True)
        summary, ok = report(results, args)
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    finally:
        setup.api.stop()
        if daemon is not None:
            daemon.destroy()
        shutil.rmtree(work, ignore_errors=True)
    if not ok:
        print("a goal was missed (p99 during unlock, exact loads, RSS growth, or the peer check)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
