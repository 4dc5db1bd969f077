"""The boot story end to end: the real agent process, a real dockerd, the real dev-api.

``pack-images`` (CLI) makes the archive; ``serve`` unlocks it by itself at start with STATUS=
following the stages; ``unlock --wait`` reports ready; a restart with the API down is ready from
the state directory alone.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.unlock import read_record
from tests.fixtures.agent import REPO, AgentProcess
from tests.fixtures.archive import publish, serve_fragment, unlock_settings
from tests.fixtures.devapi import DevApi
from tests.fixtures.dockerd import Dockerd, import_image
from tests.test_notify import NotifyListener

MakeAgent = Callable[..., AgentProcess]
T = TypeVar("T")
pytestmark = pytest.mark.docker


def publish_image(dockerd: Dockerd, dev_api: DevApi, ref: str, directory: Path) -> str:
    """An image of its own as ``ref``, published into ``directory / "images.enc"``: the device
    gets the archive, the API the fragment, and the engine forgets the image. Its ID."""
    image_id = import_image(dockerd.client, ref)
    directory.mkdir(exist_ok=True)
    publish(dockerd, dev_api, ref, image_id, directory)
    return image_id


def unlocked(agent: AgentProcess, context: str = "") -> subprocess.CompletedProcess[str]:
    """``azaion-loader unlock --wait``, which must end ready (exit 0)."""
    waited = agent.cli("unlock", "--wait")
    assert waited.returncode == 0, f"{context}{waited.stderr}{agent.log()[-3000:]}"
    return waited


def poll(agent: AgentProcess, probe: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    """``probe`` until it gives something (an observable state, with a deadline), or fail with
    the agent's last /unlock/status and its log."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        if time.monotonic() > deadline:
            status = agent.request("GET", "/unlock/status").json()
            pytest.fail(f"{what} within {timeout} s: {status}\n{agent.log()[-3000:]}")
        time.sleep(0.05)
    return found


@pytest.fixture
def packed_archive(dockerd: Dockerd, dev_api: DevApi, agent_root: Path) -> tuple[Path, str, str]:
    ref = f"azaion/boot-{secrets.token_hex(4)}:1.0"
    image_id = publish_image(dockerd, dev_api, ref, agent_root)
    return agent_root / "images.enc", ref, image_id


def test_boot_unlock_status_and_offline_restart(
    make_agent: MakeAgent,
    dockerd: Dockerd,
    dev_api: DevApi,
    packed_archive: tuple[Path, str, str],
    agent_root: Path,
) -> None:
    archive, _ref, image_id = packed_archive
    notify = NotifyListener(agent_root / "notify.sock")
    agent = make_agent(
        start=False,
        **unlock_settings(dockerd, dev_api, archive),
        NOTIFY_SOCKET=str(notify.path),
    )
    agent.start(wait=False)
    statuses = []
    while True:
        message = notify.until("STATUS")
        statuses.append(message["STATUS"])
        if "ready" in message["STATUS"] or "error" in message["STATUS"]:
            break
    assert statuses[0].startswith("serving; ")
    assert statuses[-1] == "serving; ready: 1 image loaded", statuses
    assert image_id in dockerd.image_ids()
    assert "ready" in unlocked(agent).stdout
    status = agent.cli("status")
    assert "images:        ready" in status.stdout
    assert dev_api.password not in agent.log()
    assert agent.stop() == 0

    # Next boot, no network: ready from the state directory, without the API.
    dev_api.stop()
    again = make_agent(start=False, **{**agent.env, "NOTIFY_SOCKET": ""})
    again.start()
    unlocked(again)
    assert again.request("GET", "/unlock/status").json()["state"] == "ready"
    notify.sock.close()


def test_unlock_wait_reports_a_wrong_key_as_an_error(
    make_agent: MakeAgent,
    dockerd: Dockerd,
    dev_api: DevApi,
    packed_archive: tuple[Path, str, str],
    agent_root: Path,
) -> None:
    archive, _, image_id = packed_archive
    other = agent_root / "other.key"
    subprocess.run(
        [sys.executable, "-m", "agent", "keygen", "--out", str(other)], cwd=REPO, check=True
    )
    serve_fragment(dev_api, other)
    agent = make_agent(
        RESOURCE_API_URL=dev_api.url,
        IMAGES_PATH=str(archive),
        DOCKER_HOST=dockerd.host,
    )
    # The agent has no credentials yet: the CLI's environment does not give it any.
    waited = agent.cli("unlock", "--wait", AZAION_PASSWORD=dev_api.password)
    assert waited.returncode == 1
    assert waited.stderr.splitlines()[-1].startswith(
        "azaion-loader: error: unlock failed: no credentials"
    ), waited.stderr
    login = agent.cli("login", "--email", dev_api.email, AZAION_PASSWORD=dev_api.password)
    assert login.returncode == 0, login.stderr
    waited = agent.cli("unlock", "--wait")
    assert waited.returncode == 1
    assert waited.stderr.splitlines()[-1].startswith(
        "azaion-loader: error: unlock failed: wrong key fragment"
    ), waited.stderr
    assert image_id not in dockerd.image_ids()


def wait_for_release(agent: AgentProcess, image_id: str) -> dict[str, Any]:
    """/unlock/status once the update that brings ``image_id`` has been recorded."""

    def ended() -> dict[str, Any] | None:
        status = agent.request("GET", "/unlock/status").json()
        update = status.get("update") or {}
        return dict(status) if update.get("state") in ("ready", "error") else None

    return poll(agent, ended, "no update")


def test_an_archive_put_in_place_while_serving_is_an_update_and_sighup_checks_again(
    make_agent: MakeAgent,
    dockerd: Dockerd,
    dev_api: DevApi,
    packed_archive: tuple[Path, str, str],
    agent_root: Path,
) -> None:
    """A rename into IMAGES_PATH's directory is noticed by itself; a replacement the directory
    watch cannot see (the archive is a link into another directory) by `systemctl reload`'s
    SIGHUP. Each time the device stays ready and the previous image goes."""
    first, _ref, first_id = packed_archive
    shipped = agent_root / "shipped"
    shipped.mkdir()
    link_dir = agent_root / "device"
    link_dir.mkdir()
    (link_dir / "images.enc").symlink_to(shipped / "images.enc")
    first.rename(shipped / "images.enc")
    agent = make_agent(**unlock_settings(dockerd, dev_api, link_dir / "images.enc"))
    unlocked(agent)
    assert first_id in dockerd.image_ids()

    def publish_next(name: str) -> str:
        ref = f"azaion/boot-{secrets.token_hex(4)}:{name}"
        return publish_image(dockerd, dev_api, ref, agent_root / f"staging-{name}")

    second_id = publish_next("2")
    (agent_root / "staging-2" / "images.enc").rename(shipped / "images.enc")  # unseen by the watch
    agent.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    status = wait_for_release(agent, second_id)
    assert status["state"] == "ready" and status["update"]["state"] == "ready", status
    assert second_id in dockerd.image_ids() and first_id not in dockerd.image_ids()
    assert "reload: checking" in agent.log()

    third_id = publish_next("3")
    os.unlink(link_dir / "images.enc")
    staged = link_dir / ".images.enc.new"
    (agent_root / "staging-3" / "images.enc").rename(staged)
    staged.rename(link_dir / "images.enc")  # renamed into place: the watch sees it

    def held() -> set[str]:  # one listing: images may go while it runs
        return set(dockerd.client.api.images(all=True, quiet=True))

    def swapped_and_ready() -> dict[str, Any] | None:
        """Release 3 in and release 2 gone, and then the update says ready."""
        swapped = third_id in held() and second_id not in held()
        status: dict[str, Any] = agent.request("GET", "/unlock/status").json()  # read after
        return status if swapped and status["update"]["state"] == "ready" else None

    status = poll(agent, swapped_and_ready, "the renamed archive was not loaded")
    assert status["state"] == "ready" and status["update"]["state"] == "ready", status


def test_a_power_cut_at_any_point_of_an_update_boots_ready_on_one_release(
    make_agent: MakeAgent,
    dockerd: Dockerd,
    dev_api: DevApi,
    packed_archive: tuple[Path, str, str],
    agent_root: Path,
) -> None:
    """SIGKILL at random points of successive updates (the rename that starts one until well
    after it ends); each restart must be ready, on the release before or the one after, never
    on neither, and then finish the update by itself."""
    archive, _ref, first_id = packed_archive
    settings = unlock_settings(dockerd, dev_api, archive)
    state_dir = agent_root / "state"
    settings["LOADER_STATE_DIR"] = str(state_dir)
    agent = make_agent(**settings)
    unlocked(agent)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    installed = first_id
    for step in range(5):
        ref = f"azaion/cut-{secrets.token_hex(4)}:{step}"
        staging = agent_root / f"cut-{step}"
        new_id = publish_image(dockerd, dev_api, ref, staging)
        cut_after = rng.uniform(0.0, 0.4)
        (staging / "images.enc").rename(archive)  # the watch starts the update
        time.sleep(cut_after)  # the power cut's moment, not a wait for anything
        agent.stop(signal.SIGKILL)

        agent = make_agent(**settings)  # the next boot
        unlocked(agent, f"seed {seed} step {step}: ")
        record = read_record(state_dir)
        assert record is not None, f"seed {seed} step {step}"
        on = [image.id for image in record.images]
        assert on in ([installed], [new_id]), f"seed {seed} step {step}: on {on}"
        assert set(on) <= set(dockerd.client.api.images(all=True, quiet=True))
        status = wait_for_release(agent, new_id) if on == [installed] else None
        if status is not None:  # booted on the release before: the update runs again
            assert status["update"]["state"] == "ready", f"seed {seed} step {step}: {status}"
        record = read_record(state_dir)
        assert record is not None and [image.id for image in record.images] == [new_id]
        installed = new_id
