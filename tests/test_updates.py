"""Updates on a real dockerd: a new signed archive put in place of the installed one while an
app runs on the installed release (agent/unlock/manager.py, ``request_update``).

Release 1 holds images app:1 and tool; release 2 changes app (app:2), drops tool and adds
extra. The update loads beside release 1 and switches the record only when release 2's images
are verified; then release 1's images that release 2 does not carry go, except the one the
app's container runs on, which stays (never forced) until a later check finds it unused. A
tampered release 3 fails as an update and leaves the device ready on release 2.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from docker.models.containers import Container

from agent.engine import Engine
from agent.errors import StorageError
from agent.unlock import read_record
from agent.unlock.pipeline import check_room
from tests.fixtures.dockerd import Dockerd
from tests.fixtures.release import Publisher
from tests.test_unlock import Rig, unlock

pytestmark = pytest.mark.docker


@dataclass
class Release:
    number: int
    images: dict[str, str]  # name -> image ID


class Releases:
    """Signed releases of named images, put in place of the rig's archive."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.publisher = Publisher(rig, "releases")
        self.repository = f"azaion/test-update-{secrets.token_hex(3)}"

    def release(self, number: int, names: list[str]) -> Release:
        refs = {name: f"{self.repository}-{name.replace(':', ':v')}" for name in names}
        staged = self.rig.root / f"release-{number}.enc"
        ids = self.publisher.pack(list(refs.values()), number, staged)
        staged.replace(self.rig.archive)  # put in place as a package would: a rename
        return Release(number, {name: ids[ref] for name, ref in refs.items()})


@pytest.fixture
def app_containers(rig: Rig) -> Iterator[list[Container]]:
    made: list[Container] = []
    yield made
    for container in made:
        container.remove(force=True)


async def test_release_1_to_2_while_an_app_runs_then_a_tampered_3(
    rig: Rig, app_containers: list[Container]
) -> None:
    releases = Releases(rig)
    one = releases.release(1, ["app:1", "tool:1"])
    assert (await unlock(rig.manager()))["release"] == 1
    app = rig.dockerd.client.containers.run(
        one.images["app:1"], ["/bin/busybox", "sleep", "600"], detach=True, network_mode="none"
    )
    app_containers.append(app)

    two = releases.release(2, ["app:2", "extra:1"])
    manager = rig.manager()
    result = await unlock(manager)  # boot: ready on 1 at once, then the update

    assert (result["state"], result["release"]) == ("ready", 2), result
    assert result["update"]["state"] == "ready" and result["update"]["release"] == 2
    held = rig.dockerd.image_ids()
    assert set(two.images.values()) <= held
    assert one.images["tool:1"] not in held  # dropped by release 2, used by nothing: gone
    assert one.images["app:1"] in held  # the app's container runs on it: left alone
    app.reload()
    assert app.status == "running" and app.image.id == one.images["app:1"]
    record = read_record(rig.state_dir)
    assert record is not None and record.release == 2
    assert record.pending_removal == (one.images["app:1"],)

    app_containers.remove(app)
    app.remove(force=True)  # the app moves on; the next check takes the old image
    manager.request_update()
    await manager.wait()
    assert one.images["app:1"] not in rig.dockerd.image_ids()
    record = read_record(rig.state_dir)
    assert record is not None and record.pending_removal == ()

    three = releases.release(3, ["app:3"])
    data = bytearray(rig.archive.read_bytes())
    data[len(data) // 2] ^= 0x01  # a flipped bit inside a chunk
    rig.archive.write_bytes(bytes(data))
    manager.request_update()
    status = await manager.wait()

    assert (status.state.value, status.release) == ("ready", 2)
    assert status.update is not None and status.update.state.value == "error"
    assert "tampered" in (status.update.error or "")
    line = manager.status_line()
    assert line.startswith("ready: 2 images loaded, release 2 signed by "), line
    assert "; update failed: the new images archive is tampered or corrupt" in line
    held = rig.dockerd.image_ids()
    assert set(two.images.values()) <= held and three.images["app:3"] not in held
    record = read_record(rig.state_dir)
    assert record is not None and record.release == 2


def test_the_engine_reports_its_data_root(dockerd: Dockerd) -> None:
    data_root = Engine(dockerd.host).data_root()
    assert data_root is not None and Path(data_root).is_dir()
    assert Path(data_root).resolve() == (dockerd.daemon.root / "data").resolve()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB file system (tmpfs) to stand for a nearly full data root."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_load_that_would_fill_the_disk_is_refused_early(small_disk: Path) -> None:
    check_room(str(small_disk), 4 * 1000 * 1000, "the images archive x")  # fits
    with pytest.raises(StorageError) as refused:
        check_room(str(small_disk), 20 * 1000 * 1000, "the images archive x")
    message = str(refused.value)
    assert f"data root {small_disk} has 17 MB free" in message
    assert "need about 22 MB" in message and "free some space first" in message
