"""Benchmark: what a signed release costs at the unlock, and an update against a first unlock.

    .venv/bin/python bench/bench_release.py [--size-mb 200] [--runs 5]

Starts its own dockerd and dev-api. Two images of the same size: "old" and "new". Archives of
"new": unsigned, and signed as release 2 (``pack_images(..., sign_key=...)``); of "old": signed
as release 1. ``UnlockManager`` runs in this process (the unlock's code, without a server
around it), and each case is timed from ``start()``/``request_update()`` to the end:

1. first unlock of the unsigned archive, signatures not enforced (no key installed);
2. first unlock of the signed archive, the publisher key installed: the same work plus the
   SHA-256 of the ciphertext in the same pass and the Ed25519 check;
3. an update: release 1 ("old") installed and ready, the signed release 2 put in place (a
   rename), ``request_update()`` until it is installed and release 1's image removed.

Cases run interleaved, the image removed (or release 1 installed, untimed) before each, medians
of ``--runs``. Prints wall and process CPU seconds. Goal (issue 16): signed <= 1.05x unsigned
(median of per-run ratios); exit 1 if missed. The update's ratio to case 2 is reported (it adds
the check of the installed release and the removal of the old image).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import SecretStr

from agent import signing
from agent.images import ImageEngine
from agent.pack import pack_images
from agent.service import resource_api_client
from agent.settings import Settings
from agent.unlock import UnlockManager
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api
from azaion_loader_dev.harness.dockerd import DockerDaemon, import_big_image
from azaion_loader_dev.harness.measure import cpu_seconds

MB = 1000 * 1000
GOAL = 1.05
OLD, NEW = "azaion/bench-release:1", "azaion/bench-release:2"


class Bench:
    def __init__(self, daemon: DockerDaemon, api: DevApi, work: Path) -> None:
        self.daemon, self.api, self.work = daemon, api, work
        self.client = daemon.client()
        self.key = work / "publisher.key"
        self.trusted = work / "publishers.d"
        self.untrusted = work / "no-publishers.d"
        self.ids: dict[str, str] = {}
        self.device = work / "device" / "images.enc"

    def prepare(self, size: int) -> None:
        public = signing.write_key_pair(self.key, "bench")
        self.trusted.mkdir()
        self.untrusted.mkdir()
        (self.trusted / "bench.pub").write_text(public.to_line())
        self.device.parent.mkdir()
        key = signing.read_private_key(self.key)
        fragment = [self.api.key_fragment]
        with ImageEngine.connect(self.daemon.host) as engine:
            for ref in (OLD, NEW):
                print(f"building {ref}, {size / MB:.0f} MB ...", flush=True)
                self.ids[ref] = import_big_image(self.client, ref, size)
            pack_images(engine, [NEW], self.work / "unsigned.enc", fragment)
            pack_images(
                engine, [NEW], self.work / "signed-2.enc", fragment, sign_key=key, release=2
            )
            pack_images(
                engine, [OLD], self.work / "signed-1.enc", fragment, sign_key=key, release=1
            )
        for ref in (OLD, NEW):
            self.remove(ref)

    def remove(self, ref: str) -> None:
        held = {image.id for image in self.client.images.list(all=True)}
        if self.ids[ref] in held:
            self.client.images.remove(self.ids[ref], force=True)

    def put_in_place(self, name: str) -> None:
        staged = self.device.with_name(".images.enc.new")
        staged.unlink(missing_ok=True)
        os.link(self.work / name, staged)  # no copy: a rename of a link, as a package would
        staged.replace(self.device)
        staged.unlink(missing_ok=True)  # rename(2) leaves both names if they were one file

    def settings(self, state: Path, publishers: Path) -> Settings:
        return Settings(
            images_path=self.device,
            loader_state_dir=state,
            loader_publishers_dir=publishers,
            resource_api_url=self.api.url,
            docker_host=self.daemon.host,
            azaion_email=self.api.email,
            azaion_password=SecretStr(self.api.password),
        )

    def first_unlock(self, archive: str, publishers: Path) -> dict[str, float]:
        self.remove(NEW)
        self.put_in_place(archive)
        state = Path(tempfile.mkdtemp(dir=self.work, prefix="state"))
        try:
            return asyncio.run(timed_unlock(self.settings(state, publishers), None))
        finally:
            shutil.rmtree(state)

    def update(self) -> dict[str, float]:
        self.remove(NEW)
        self.remove(OLD)
        self.put_in_place("signed-1.enc")
        state = Path(tempfile.mkdtemp(dir=self.work, prefix="state"))
        try:
            settings = self.settings(state, self.trusted)
            return asyncio.run(timed_unlock(settings, lambda: self.put_in_place("signed-2.enc")))
        finally:
            shutil.rmtree(state)
            held = {image.id for image in self.client.images.list(all=True)}
            if self.ids[OLD] in held or self.ids[NEW] not in held:
                raise SystemExit("the update did not replace release 1 by release 2")


async def timed_unlock(settings: Settings, then: Callable[[], None] | None) -> dict[str, float]:
    """Unlock; with ``then``, the unlock is not timed: ``then()`` puts a new archive in place
    and the update it brings is."""
    async with resource_api_client(settings) as api:
        manager = UnlockManager(settings, api)

        async def unlocked() -> None:
            await manager.start()
            await manager.wait()

        if then is None:
            timing = await measure(unlocked)
        else:
            await unlocked()
            then()

            async def updated() -> None:
                manager.request_update()
                await manager.wait()

            timing = await measure(updated)
        snapshot = manager.snapshot()
        await manager.close()
    failed = snapshot.error or (snapshot.update.error if snapshot.update else None)
    if snapshot.state.value != "ready" or failed:
        raise SystemExit(f"unlock failed: {failed}")
    return timing


async def measure(step: Callable[[], Awaitable[None]]) -> dict[str, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    await step()
    return {"seconds": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-release-"))
    daemon = DockerDaemon.start_new()
    api = new_dev_api(work / "dev-api", [])
    load_before = os.getloadavg()[0]
    try:
        bench = Bench(daemon, api, work)
        bench.prepare(args.size_mb * MB)
        cases: dict[str, Callable[[], dict[str, float]]] = {
            "unsigned first unlock": lambda: bench.first_unlock("unsigned.enc", bench.untrusted),
            "signed first unlock": lambda: bench.first_unlock("signed-2.enc", bench.trusted),
            "update 1 -> 2 (signed)": bench.update,
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for run in range(args.runs):
            print(f"run {run + 1} of {args.runs}", flush=True)
            order = list(cases) if run % 2 == 0 else list(reversed(cases))
            for name in order:
                results[name].append(cases[name]())
    finally:
        api.stop()
        daemon.destroy()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.size_mb} MB image, medians of {args.runs} runs (load {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"  {'case':28} {'wall s':>8} {'CPU s':>8}")
    for name, timings in results.items():
        wall = statistics.median(t["seconds"] for t in timings)
        cpu = statistics.median(t["cpu"] for t in timings)
        print(f"  {name:28} {wall:8.3f} {cpu:8.3f}")
    unsigned, signed = results["unsigned first unlock"], results["signed first unlock"]
    update = results["update 1 -> 2 (signed)"]
    cost = statistics.median(
        s["seconds"] / u["seconds"] for s, u in zip(signed, unsigned, strict=True)
    )
    cpu_cost = statistics.median(s["cpu"] - u["cpu"] for s, u in zip(signed, unsigned, strict=True))
    ratio = statistics.median(
        u["seconds"] / s["seconds"] for u, s in zip(update, signed, strict=True)
    )
    print(f"  signed / unsigned: {cost:.3f}x wall (goal <= {GOAL}x); +{cpu_cost:.3f} CPU s")
    print(f"  update / signed first unlock: {ratio:.3f}x wall")
    met = cost <= GOAL
    print("goals:", "met" if met else "MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
