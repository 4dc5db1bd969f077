"""A power cut at random points of an update, on a real systemd (issue 16, "Proof").

A booted machine runs the packaged agent on release 1 of a signed archive, its publisher's key
in ``/etc/azaion-loader/publishers.d/``. Each cut puts release n+1 at ``IMAGES_PATH`` by rename
(the app image changed, one image dropped, one added, one carried unchanged), runs ``systemctl
reload azaion-loader`` and, at a point of the update chosen by a seeded random from what
``/unlock/status`` shows, ``systemctl kill --signal=KILL azaion-loader`` (every process of the
unit). systemd restarts it (``Restart=on-failure``); it must come up ready on release n or n+1,
never on neither, with that release's images in the engine and tagged; then the update must
finish by itself on n+1 and the images n+1 dropped must be gone.

The network is down (dev-api answers 503 to everything) from just before each kill until the
restarted agent has been checked: it must come up ready with no network, as after any boot, and
an update it resumes cannot move it on while its release is looked at. Then the network is back.

``LOADER_TEST_POWERCUT_SEED=N`` replays the points of a run (the seed is printed, and named in
every failure).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import signing
from agent.images import ImageEngine
from agent.pack import pack_images
from agent.unlock import read_record
from tests.fixtures.devapi import DevApi
from tests.fixtures.dockerd import Dockerd, import_big_image, import_image
from tests.system.machine import Machine, wait_for
from tests.system.test_system import (
    AGENT,
    API_VERSION,
    START_TIMEOUT,
    UNLOCK_TIMEOUT,
    http_get,
    provision,
    show,
    status_text,
    wait_running,
)

pytestmark = pytest.mark.system

SEED_VARIABLE = "LOADER_TEST_POWERCUT_SEED"
CUTS = 5
# Big enough that the update's load shows a few progress steps (the agent reports at most four
# a second), small enough that publishing and loading five releases stays quick.
APP_SIZE = 128 * 1024 * 1024
IMAGES_PATH = "/opt/azaion/images.enc"
STATE_DIR = "/var/lib/azaion-loader"
# Points of an update, in the order it passes them; a cut waits until the update is at or past
# its point, then kills.
RELOAD, LOADING, VERIFYING, SWITCHED = "right after the reload", "loading", "verifying", "switched"
POINTS = (RELOAD, LOADING, VERIFYING, SWITCHED)

NewMachine = Callable[..., Machine]


@dataclass(frozen=True)
class Release:
    number: int
    archive: Path
    images: dict[str, str]  # ref -> image ID


class Publisher:
    """Signed releases: release n holds app:vn (big), tool-n (small, dropped by n+1) and
    common (the same image in every release)."""

    def __init__(self, dockerd: Dockerd, dev_api: DevApi, directory: Path) -> None:
        self.dockerd, self.dev_api, self.directory = dockerd, dev_api, directory
        self.key = directory / "publisher.key"
        self.public = signing.write_key_pair(self.key, "powercut-releases")
        self.repository = f"azaion/powercut-{secrets.token_hex(3)}"
        self.common = f"{self.repository}-common:1"
        import_image(dockerd.client, self.common)

    def release(self, number: int) -> Release:
        client = self.dockerd.client
        app, tool = f"{self.repository}-app:v{number}", f"{self.repository}-tool{number}:1"
        new = {app: import_big_image(client, app, APP_SIZE), tool: import_image(client, tool)}
        images = {**new, self.common: str(client.images.get(self.common).id)}
        archive = self.directory / f"release-{number}.enc"
        with ImageEngine.connect(self.dockerd.host) as engine:
            pack_images(
                engine,
                list(images),
                archive,
                [self.dev_api.key_fragment],
                sign_key=signing.read_private_key(self.key),
                release=number,
            )
        for image_id in new.values():  # the device has to load them from the archive
            client.images.remove(image_id, force=True)
        return Release(number, archive, images)


def unlock_status(port: int) -> dict[str, Any]:
    code, body = http_get(port, "/unlock/status")
    assert code == 200, body
    status: dict[str, Any] = json.loads(body)
    return status


def put_in_place(machine: Machine, release: Release) -> None:
    """What a package does: the new archive written beside the old one, renamed over it."""
    target = machine.root / IMAGES_PATH.lstrip("/")
    staged = target.with_name(f".{target.name}.new")
    shutil.copyfile(release.archive, staged)
    staged.chmod(0o644)
    os.replace(staged, target)


def reached(point: str, percent: float, after: int) -> Callable[[dict[str, Any]], bool]:
    """Whether a status shows the update to release ``after`` at or past ``point``."""
    order = {"loading": 1, "verifying": 2}

    def at_or_past(status: dict[str, Any]) -> bool:
        if status.get("release") == after:
            return True  # switched: the record names the new release
        if point == SWITCHED:
            return False
        update = status.get("update") or {}
        stage = order.get(update.get("state", ""), 0)
        if update.get("state") == "ready" and update.get("release") == after:
            return True
        if point == VERIFYING:
            return stage >= order["verifying"]
        return stage > order["loading"] or (
            stage == order["loading"] and update["progress"]["percent"] >= percent
        )

    return at_or_past


def plan(rng: random.Random) -> list[tuple[str, float]]:
    """Each point once (loading more often when there are more cuts), in a random order; a
    loading cut at a random percentage."""
    points = [*POINTS, *[LOADING] * (CUTS - len(POINTS))]
    rng.shuffle(points)
    return [
        (point, round(rng.uniform(0.0, 100.0), 1) if point == LOADING else 0.0) for point in points
    ]


def image_ids(dockerd: Dockerd) -> set[str]:
    """The engine's image IDs in one request (``Dockerd.image_ids`` inspects each image it
    lists, and the agent may remove one in between)."""
    return set(dockerd.client.api.images(all=True, quiet=True))


def assert_installed(machine: Machine, dockerd: Dockerd, release: Release, where: str) -> None:
    """The record names ``release`` and the engine holds its images, each tagged API_VERSION."""
    record = read_record(machine.root / STATE_DIR.lstrip("/"))
    assert record is not None, where
    assert record.release == release.number, f"{where}: the record is of release {record.release}"
    assert {image.id for image in record.images} == set(release.images.values()), where
    held = image_ids(dockerd)
    for ref, image_id in release.images.items():
        assert image_id in held, f"{where}: {ref} of release {release.number} is not in the engine"
        tagged = f"{ref.rsplit(':', 1)[0]}:{API_VERSION}"
        assert str(dockerd.client.images.get(tagged).id) == image_id, f"{where}: {tagged}"


def test_a_power_cut_at_random_points_of_an_update_boots_ready_on_one_release(
    new_machine: NewMachine, dockerd: Dockerd, dev_api: DevApi, tmp_path: Path
) -> None:
    seed = int(os.environ.get(SEED_VARIABLE) or random.randrange(1 << 30))
    rng = random.Random(seed)
    cuts = plan(rng)
    print(f"power cuts: {SEED_VARIABLE}={seed}: {cuts}")
    publisher = Publisher(dockerd, dev_api, tmp_path)
    installed = publisher.release(1)
    machine = new_machine()
    port = provision(machine, dockerd, dev_api, installed.archive)
    machine.write("/etc/azaion-loader/publishers.d/releases.pub", publisher.public.to_line())
    machine.boot()
    wait_running(machine)
    ready = f"ready: 3 images loaded, release {{}} signed by {publisher.public.name}"
    wait_for(lambda: unlock_status(port)["state"] == "ready", UNLOCK_TIMEOUT, "release 1")
    assert ready.format(1) in status_text(machine), status_text(machine)
    assert_installed(machine, dockerd, installed, "release 1")

    for step, (point, percent) in enumerate(cuts):
        began = time.monotonic()
        at = f"{point} >= {percent}%" if point == LOADING else point
        where = f"{SEED_VARIABLE}={seed}, cut {step + 1} ({at})"
        new = publisher.release(installed.number + 1)
        print(f"cut {step + 1}: published in {time.monotonic() - began:.1f} s")
        before = show(machine, AGENT, "MainPID", "NRestarts")

        put_in_place(machine, new)  # the watch starts the update; the reload asks again
        with ThreadPoolExecutor(1) as pool:
            reload = pool.submit(machine.run, ["systemctl", "reload", AGENT], check=False)
            if point == RELOAD:
                at_cut = {"reload": reload.result().returncode}
            else:  # watched from the rename on: the reload may still be on its way
                at_cut = wait_until(port, point, percent, new, where)
            dev_api.faults(status=503, count=None)  # the network goes down with the power
            machine.run(["systemctl", "kill", "--signal=KILL", AGENT])
        print(f"{where}: killed after {seen(at_cut)}")

        came_back = came_back_ready(machine, port, before, where)
        assert came_back["release"] in (installed.number, new.number), f"{where}: {came_back}"
        on = installed if came_back["release"] == installed.number else new
        text = status_text(machine)
        assert ready.format(on.number) in text, f"{where}: {text}"
        assert_installed(machine, dockerd, on, f"{where}, back on release {on.number}")

        dev_api.clear_faults()
        finished = wait_updated(machine, dockerd, port, installed, new, where)
        assert_installed(machine, dockerd, new, f"{where}, after the update")
        assert ready.format(new.number) in status_text(machine), status_text(machine)
        print(
            f"cut {step + 1}: back on release {on.number}, then {finished['release']} "
            f"({time.monotonic() - began:.1f} s)"
        )
        installed = new


def seen(status: dict[str, Any]) -> str:
    """What a status showed of the installed release and the update, in a few words."""
    if "reload" in status:
        return f"the reload (exit status {status['reload']})"
    update = status.get("update") or {}
    progress = update.get("progress") or {}
    return (
        f"installed release {status.get('release')}, update {update.get('state')} "
        f"{progress.get('percent')}% (release {update.get('release')})"
    )


def wait_until(port: int, point: str, percent: float, new: Release, where: str) -> dict[str, Any]:
    """The first status that shows the update to ``new`` at or past the point."""
    at_or_past = reached(point, percent, new.number)
    trail: list[str] = []

    def check() -> dict[str, Any] | None:
        status = unlock_status(port)
        if not trail or trail[-1] != seen(status):
            trail.append(seen(status))
        assert (status.get("update") or {}).get("state") != "error", f"{where}: {status}"
        return status if at_or_past(status) else None

    try:
        return wait_for(check, UNLOCK_TIMEOUT, f"{where}: the update to reach the point")
    finally:
        print("  seen: " + "; ".join(trail[-20:]))


def came_back_ready(
    machine: Machine, port: int, before: dict[str, str], where: str
) -> dict[str, Any]:
    """systemd restarted the killed unit; its first status that is not a check is ready."""

    def restarted() -> bool:
        now = show(machine, AGENT, "MainPID", "NRestarts")
        restarts = int(now["NRestarts"]) - int(before["NRestarts"])
        return restarts > 0 and now["MainPID"] not in ("0", before["MainPID"])

    wait_for(restarted, START_TIMEOUT, f"{where}: systemd to restart the killed agent")
    wait_running(machine)

    def settled() -> dict[str, Any] | None:
        status = unlock_status(port)
        assert status["state"] in ("idle", "checking", "ready"), f"{where}: {status}"
        return status if status["state"] == "ready" else None

    return wait_for(settled, UNLOCK_TIMEOUT, f"{where}: the agent to come back ready")


def wait_updated(
    machine: Machine, dockerd: Dockerd, port: int, old: Release, new: Release, where: str
) -> dict[str, Any]:
    """The status once release ``new`` is installed and ``old``'s dropped images are gone."""
    dropped = {image_id for ref, image_id in old.images.items() if ref not in new.images}

    def updated() -> dict[str, Any] | None:
        status = unlock_status(port)
        update = status.get("update") or {}
        assert update.get("state") != "error", f"{where}: {status}"
        assert status["state"] == "ready", f"{where}: {status}"
        if status["release"] != new.number or update.get("state") not in (None, "ready"):
            return None
        record = read_record(machine.root / STATE_DIR.lstrip("/"))
        if record is None or record.pending_removal:
            return None
        return status if not dropped & image_ids(dockerd) else None

    return wait_for(updated, UNLOCK_TIMEOUT, f"{where}: the update to release {new.number}")
