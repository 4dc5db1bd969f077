"""Benchmark: the unlock against plain ``docker load`` and against the original approach.

Same run, same image (an incompressible layer, ``--size-mb``, default 320 MB), each approach
starting from an engine without the image:

    (a) plain      ``docker load -i plain.tar`` (the floor: no crypto at all)
    (b) original   decrypt the archive to a tar file, ``docker load -i`` it, delete it
    (c) unlock     ``UnlockManager`` (log in to dev-api, fetch the key, decrypt straight into
                   the engine's image load; no tar on disk)

Reports the median wall time of each over ``--runs`` interleaved runs, the ratios (c)/(a)
(goal <= 1.10) and (c)/(b) (goal < 1), and the bytes this process wrote to storage during (c)
(``write_bytes`` of ``/proc/self/io``; goal: a few MB at most) next to (b)'s.

    .venv/bin/python bench/bench_unlock.py [--size-mb 320] [--runs 5] [--keep-dir DIR]

It starts its own dockerd (as the tests do) and its own dev-api; needs root and docker.io.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from agent.archive import PayloadSplitter
from agent.images import ImageEngine
from agent.pack import pack_images
from agent.service import resource_api_client
from agent.settings import Settings
from agent.stream import decrypt_iter
from agent.unlock import READ_SIZE, UnlockManager
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api
from azaion_loader_dev.harness.dockerd import DockerDaemon, import_big_image
from azaion_loader_dev.harness.measure import io_counters

MB = 1000 * 1000
REF = "azaion/bench-app:1.0"


class Bench:
    def __init__(self, daemon: DockerDaemon, api: DevApi, work: Path) -> None:
        self.daemon = daemon
        self.client = daemon.client()
        self.api = api
        self.work = work
        self.plain_tar = work / "plain.tar"
        self.archive = work / "images.enc"
        self.image_id = ""
        self.unlock_writes: list[int] = []
        self.original_writes: list[int] = []

    def prepare(self, size: int) -> None:
        print(f"building a {size / MB:.0f} MB image ...", flush=True)
        self.image_id = import_big_image(self.client, REF, size)
        with ImageEngine.connect(self.daemon.host) as engine:
            with self.plain_tar.open("wb") as out:
                for piece in engine.save([REF]):
                    out.write(piece)
            result = pack_images(engine, [REF], self.archive, [self.api.key_fragment])
        print(
            f"plain tar {self.plain_tar.stat().st_size / MB:.1f} MB, "
            f"archive {result.archive_size / MB:.1f} MB",
            flush=True,
        )

    def remove_image(self) -> None:
        self.client.images.remove(self.image_id, force=True)

    def docker_load(self, tar: Path) -> None:
        subprocess.run(
            ["docker", "-H", self.daemon.host, "load", "-q", "-i", str(tar)],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def plain(self) -> None:
        self.docker_load(self.plain_tar)

    def original(self) -> None:
        before = io_counters()["write_bytes"]
        tar = self.work / "decrypted.tar"
        with self.archive.open("rb") as source, tar.open("wb") as out:
            pieces = iter(lambda: source.read(READ_SIZE), b"")
            splitter = PayloadSplitter(decrypt_iter(pieces, [self.api.key_fragment]))
            splitter.read_manifest()
            for piece in splitter.tar_chunks():
                out.write(piece)
        self.docker_load(tar)
        tar.unlink()
        self.original_writes.append(io_counters()["write_bytes"] - before)

    def unlock(self) -> None:
        state_dir = Path(tempfile.mkdtemp(dir=self.work, prefix="state"))
        settings = Settings(
            images_path=self.archive,
            loader_state_dir=state_dir,
            resource_api_url=self.api.url,
            docker_host=self.daemon.host,
            azaion_email=self.api.email,
            azaion_password=SecretStr(self.api.password),
        )
        before = io_counters()["write_bytes"]
        snapshot = asyncio.run(run_unlock(settings))
        self.unlock_writes.append(io_counters()["write_bytes"] - before)
        shutil.rmtree(state_dir)
        if snapshot["state"] != "ready":
            raise SystemExit(f"unlock failed: {snapshot['error']}")


async def run_unlock(settings: Settings) -> dict[str, object]:
    async with resource_api_client(settings) as api:
        manager = UnlockManager(settings, api)
        await manager.start()
        return (await manager.wait()).model_dump(mode="json")


def timed(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=320)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep-dir", type=Path, help="work directory (default: a temp dir)")
    args = parser.parse_args()

    work = args.keep_dir or Path(tempfile.mkdtemp(prefix="bench-unlock-"))
    work.mkdir(parents=True, exist_ok=True)
    daemon = DockerDaemon.start_new()
    api = new_dev_api(work / "dev-api", [])
    try:
        bench = Bench(daemon, api, work)
        bench.prepare(args.size_mb * MB)
        methods = {"a_plain": bench.plain, "b_original": bench.original, "c_unlock": bench.unlock}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for run in range(args.runs):
            for name, method in methods.items():  # interleaved, so drift hits all alike
                bench.remove_image()
                times[name].append(timed(method))
            print(f"run {run + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
        medians = {name: statistics.median(values) for name, values in times.items()}
        report = {
            "size_mb": args.size_mb,
            "runs": args.runs,
            "median_s": {name: round(value, 3) for name, value in medians.items()},
            "ratio_c_over_a": round(medians["c_unlock"] / medians["a_plain"], 3),
            "ratio_c_over_b": round(medians["c_unlock"] / medians["b_original"], 3),
            "unlock_write_bytes_median": statistics.median(bench.unlock_writes),
            "original_write_bytes_median": statistics.median(bench.original_writes),
        }
        print(json.dumps(report, indent=2))
    finally:
        api.stop()
        daemon.destroy()
        if args.keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
