"""The unlock workflow end to end: a real dockerd, the real dev-api, real archives.

Each test imports a tiny image of its own (distinct content, so distinct ID), packs it with
``pack_images``, removes it from the engine, and lets an ``UnlockManager`` bring it back.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent import keys
from agent.api_client import ResourceApiClient
from agent.archive import ArchiveManifest, ImageEntry, payload_head
from agent.durable import write_stream_atomically
from agent.engine import Engine
from agent.errors import NotFoundError
from agent.images import ImageEngine
from agent.pack import pack_images
from agent.retry import RetryPolicy
from agent.schemas import UnlockStatus
from agent.service import resource_api_client
from agent.settings import Settings
from agent.stream import encrypt_iter
from agent.unlock import (
    BOOT_RETRY_POLICY,
    RECORD_NAME,
    UnlockManager,
    UnlockState,
    held_back,
    read_record,
)
from tests.fixtures.devapi import DevApi
from tests.fixtures.dockerd import Dockerd, DockerDaemon, import_image

pytestmark = pytest.mark.docker

API_VERSION = "v-test"
FAST_RETRY = RetryPolicy(base_delay=0.05, max_delay=0.3, max_attempts=None, max_total=None)
DEADLINE = 60.0


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` on the loop until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Packed:
    archive: Path
    ref: str
    repository: str
    image_id: str


def pack_test_image(dockerd: Dockerd, directory: Path, fragments: list[bytes]) -> Packed:
    repository = f"azaion/test-unlock-{secrets.token_hex(4)}"
    ref = f"{repository}:1.0"
    image_id = import_image(dockerd.client, ref)
    archive = directory / "images.enc"
    with ImageEngine.connect(dockerd.host) as engine:
        pack_images(engine, [ref], archive, fragments)
    dockerd.client.images.remove(image_id, force=True)
    assert image_id not in dockerd.image_ids()
    return Packed(archive=archive, ref=ref, repository=repository, image_id=image_id)


class HighestJitter(random.Random):
    """Backoff jitter that always takes the top of its range: a fixed schedule, 1, 2, 4 s..."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Stepped:
    """Time for a manager: a clock that moves only when the manager sleeps (by the whole pause,
    at once), and a fixed wall-clock time. ``seen`` is what the manager showed at each pause."""

    WALL = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    def __init__(self, look: Callable[[], Awaitable[Any]]) -> None:
        self.now = 1000.0
        self.look = look
        self.seen: list[Any] = []

    def parameters(self) -> dict[str, Any]:
        return {
            "retry_policy": BOOT_RETRY_POLICY,
            "clock": lambda: self.now,
            "sleep": self.sleep,
            "rng": HighestJitter(),
            "now": lambda: self.WALL,
        }

    async def sleep(self, delay: float) -> None:
        self.seen.append(await self.look())
        self.now += delay


@dataclass
class Rig:
    """Everything one unlock test needs; ``manager()`` builds a fresh agent-side manager."""

    dockerd: Dockerd
    dev_api: DevApi
    root: Path
    docker_host: str
    clients: list[ResourceApiClient]
    managers: list[UnlockManager]

    @property
    def archive(self) -> Path:
        return self.root / "images.enc"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "images_path": self.archive,
            "loader_state_dir": self.state_dir,
            "resource_api_url": self.dev_api.url,
            "api_version": API_VERSION,
            "docker_host": self.docker_host,
            "azaion_email": self.dev_api.email,
            "azaion_password": self.dev_api.password,
            "loader_publishers_dir": self.root / "publishers.d",
            **overrides,
        }
        return Settings(**values)

    def manager(
        self,
        *,
        engine_factory: Callable[[], Engine] | None = None,
        states: list[str] | None = None,
        time_source: Stepped | None = None,
        **overrides: Any,
    ) -> UnlockManager:
        settings = self.settings(**overrides)
        api = resource_api_client(settings)  # as the service builds it, credentials and all
        self.clients.append(api)
        manager: UnlockManager

        def record() -> None:
            if states is not None and (not states or states[-1] != manager.state.value):
                states.append(manager.state.value)

        manager = UnlockManager(
            settings,
            api,
            engine_factory=engine_factory,
            on_change=record,
            **(time_source.parameters() if time_source else {"retry_policy": FAST_RETRY}),
        )
        self.managers.append(manager)
        return manager

    def pack(self, fragments: list[bytes] | None = None) -> Packed:
        return pack_test_image(self.dockerd, self.root, fragments or [self.dev_api.key_fragment])


async def rig_over(dockerd: Dockerd, api: DevApi, tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(dockerd, api, tmp_path, dockerd.host, [], [])
    yield made
    for manager in made.managers:
        await manager.close()
    for client in made.clients:
        await client.close()


@pytest.fixture
async def rig(dockerd: Dockerd, shared_dev_api: DevApi, tmp_path: Path) -> AsyncIterator[Rig]:
    async for made in rig_over(dockerd, shared_dev_api, tmp_path):
        yield made


@pytest.fixture
async def private_rig(dockerd: Dockerd, dev_api: DevApi, tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig with a dev-api of its own, for tests that stop it."""
    async for made in rig_over(dockerd, dev_api, tmp_path):
        yield made


def as_json(snapshot: UnlockStatus) -> dict[str, Any]:
    """A snapshot as /unlock/status answers it."""
    return snapshot.model_dump(mode="json", exclude_unset=True)


async def unlock(manager: UnlockManager) -> dict[str, Any]:
    await manager.start()
    return as_json(await asyncio.wait_for(manager.wait(), DEADLINE))


def tag_target(dockerd: Dockerd, ref: str) -> str:
    return str(dockerd.client.images.get(ref).id)


async def test_pack_then_unlock_end_to_end(rig: Rig) -> None:
    packed = rig.pack()
    states: list[str] = []
    manager = rig.manager(states=states)

    result = await unlock(manager)

    assert result["state"] == "ready", result
    assert result["error"] is None
    assert result["progress"]["percent"] == 100.0
    assert result["progress"]["bytes_done"] == packed.archive.stat().st_size
    assert manager.status_line() == "ready: 1 image loaded"
    assert states == [
        "checking",
        "authenticating",
        "downloading_key",
        "loading",
        "verifying",
        "ready",
    ]
    assert packed.image_id in rig.dockerd.image_ids()
    assert tag_target(rig.dockerd, packed.ref) == packed.image_id
    assert tag_target(rig.dockerd, f"{packed.repository}:{API_VERSION}") == packed.image_id
    record = read_record(rig.state_dir)
    assert record is not None
    assert [image.id for image in record.images] == [packed.image_id]
    assert record.archive.size == packed.archive.stat().st_size
    # The record holds no secret; the state dir holds nothing but the record.
    text = (rig.state_dir / RECORD_NAME).read_text()
    assert rig.dev_api.password not in text
    assert keys.encode_fragment(rig.dev_api.key_fragment) not in text
    assert [p.name for p in rig.state_dir.iterdir()] == [RECORD_NAME]


async def test_second_unlock_is_instant_and_offline(private_rig: Rig) -> None:
    rig = private_rig
    packed = rig.pack()
    assert (await unlock(rig.manager()))["state"] == "ready"
    rig.dev_api.stop()
    states: list[str] = []
    # A freshly booted agent, no network and no credentials at all.
    manager = rig.manager(states=states, azaion_email=None, azaion_password=None)

    started = time.monotonic()
    result = await unlock(manager)

    assert result["state"] == "ready", result
    assert states == ["checking", "ready"]
    assert time.monotonic() - started < 5
    assert tag_target(rig.dockerd, f"{packed.repository}:{API_VERSION}") == packed.image_id


async def test_recorded_images_gone_means_loading_again(rig: Rig) -> None:
    packed = rig.pack()
    assert (await unlock(rig.manager()))["state"] == "ready"
    rig.dockerd.client.images.remove(packed.image_id, force=True)
    states: list[str] = []

    result = await unlock(rig.manager(states=states))

    assert result["state"] == "ready", result
    assert "loading" in states
    assert packed.image_id in rig.dockerd.image_ids()


async def test_a_new_archive_is_loaded_even_when_the_old_one_was(rig: Rig) -> None:
    """At boot the installed images are ready at once; the new archive is then loaded as an
    update beside them, and the old release's image goes once the new one is recorded."""
    old = rig.pack()
    assert (await unlock(rig.manager()))["state"] == "ready"
    new = rig.pack()  # the publisher ships an update in place of the old archive
    states: list[str] = []

    result = await unlock(rig.manager(states=states))

    assert states == ["checking", "ready"]  # ready on what was installed, no load in between
    assert result["state"] == "ready", result
    assert result["update"]["state"] == "ready" and result["update"]["error"] is None
    assert new.image_id in rig.dockerd.image_ids()
    assert old.image_id not in rig.dockerd.image_ids()
    record = read_record(rig.state_dir)
    assert record is not None
    assert [image.id for image in record.images] == [new.image_id] != [old.image_id]
    assert record.pending_removal == ()


async def test_snapshot_before_any_unlock(rig: Rig) -> None:
    manager = rig.manager()
    assert as_json(manager.snapshot()) == {
        "state": "idle",
        "error": None,
        "progress": {"stage": "idle", "bytes_done": 0, "bytes_total": 0, "percent": 0.0},
        "message": "images locked",
    }
    assert (await manager.wait()).state == "idle"  # nothing runs: returns at once


class CountingEngines:
    """An engine factory that counts connections (the engines themselves are real)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.connections = 0

    def __call__(self) -> Engine:
        self.connections += 1
        return Engine(self.host)


async def test_wrong_fragment_fails_before_docker_then_a_fresh_attempt_works(rig: Rig) -> None:
    rig.pack([keys.generate_fragment()])
    engines = CountingEngines(rig.docker_host)
    manager = rig.manager(engine_factory=engines)
    before = rig.dockerd.image_ids()

    result = await unlock(manager)

    assert result["state"] == "error"
    assert result["error"].startswith("wrong key fragment")
    assert manager.status_line().startswith("error: wrong key fragment")
    assert engines.connections == 0  # nothing reached Docker
    assert rig.dockerd.image_ids() == before
    assert read_record(rig.state_dir) is None
    assert rig.dev_api.count("POST", "/login") == 1  # a permanent fault: no hammering

    packed = rig.pack()  # the publisher ships a good archive; the operator retries
    again = await unlock(manager)

    assert again["state"] == "ready", again
    assert packed.image_id in rig.dockerd.image_ids()


async def test_device_fragment_is_combined_with_the_api_fragment(rig: Rig) -> None:
    device_fragment = keys.generate_fragment()
    device_path = rig.root / "device.key"
    keys.write_fragment_file(device_path, device_fragment)
    packed = rig.pack([rig.dev_api.key_fragment, device_fragment])

    without = await unlock(rig.manager())
    assert without["state"] == "error"
    assert "wrong key fragment" in without["error"]

    result = await unlock(rig.manager(loader_device_fragment_path=device_path))
    assert result["state"] == "ready", result
    assert packed.image_id in rig.dockerd.image_ids()


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def cut_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (flip_middle_byte, "the images archive is tampered or corrupt"),
        (cut_tail, "the images archive is truncated"),
        (cut_half, "the images archive is truncated"),
    ],
)
async def test_damaged_archive_is_an_error_and_loads_nothing(
    rig: Rig, damage: Callable[[Path], None], expected: str
) -> None:
    packed = rig.pack()
    damage(packed.archive)
    before = rig.dockerd.image_ids()

    result = await unlock(rig.manager())

    assert result["state"] == "error"
    assert result["error"].startswith(expected), result["error"]
    assert rig.dockerd.image_ids() == before
    assert packed.image_id not in rig.dockerd.image_ids()
    assert read_record(rig.state_dir) is None


async def test_docker_load_error_is_reported_as_such(rig: Rig) -> None:
    manifest = ArchiveManifest(
        images=(ImageEntry("azaion/broken:1", "sha256:" + "c" * 64, "azaion/broken", True),)
    )
    payload = [payload_head(manifest), b"this is not a docker save tar" * 1000]
    write_stream_atomically(rig.archive, encrypt_iter(payload, [rig.dev_api.key_fragment]))

    result = await unlock(rig.manager())

    assert result["state"] == "error"
    assert result["error"].startswith("Docker load error: "), result["error"]
    assert read_record(rig.state_dir) is None


async def test_bad_credentials_end_in_error_without_retrying(rig: Rig) -> None:
    rig.pack()
    manager = rig.manager(azaion_password="not-the-password")

    result = await unlock(manager)

    assert result["state"] == "error"
    assert result["error"].startswith("bad credentials")
    assert "not-the-password" not in str(result)
    assert rig.dev_api.count("POST", "/login") == 1


async def test_credentials_come_from_the_client_only(rig: Rig) -> None:
    """The manager logs in with what its client holds; settings are the service's to apply."""
    rig.pack()
    settings = rig.settings()  # with the right credentials, which the client is not given
    async with ResourceApiClient(settings.resource_api_url) as api:
        manager = UnlockManager(settings, api, retry_policy=FAST_RETRY)

        result = await unlock(manager)

    assert result["state"] == "error"
    assert result["error"].startswith("no credentials: no Resource API credentials")
    assert rig.dev_api.count("POST", "/login") == 0


async def test_api_down_at_first_then_up(private_rig: Rig) -> None:
    rig = private_rig
    packed = rig.pack()
    rig.dev_api.stop()
    manager = rig.manager()
    await manager.start()

    await until(
        lambda: (
            manager.state is UnlockState.WAITING and as_json(manager.snapshot())["attempt"] >= 3
        ),
        "a few retries",
    )
    snapshot = as_json(manager.snapshot())
    assert snapshot["progress"]["stage"] == "authenticating"
    assert manager.status_line().startswith("waiting for network, next try in ")
    assert f"(attempt {snapshot['attempt']})" in manager.status_line()

    rig.dev_api.start()
    result = as_json(await asyncio.wait_for(manager.wait(), DEADLINE))

    assert result["state"] == "ready", result
    assert packed.image_id in rig.dockerd.image_ids()


@pytest.mark.parametrize("status", [503, 429])
async def test_api_errors_are_retried(rig: Rig, status: int) -> None:
    rig.pack()
    rig.dev_api.faults(status=status, path="/binary-split/key-fragment", count=3)

    result = await unlock(rig.manager())

    assert result["state"] == "ready", result
    assert rig.dev_api.count("GET", "/binary-split/key-fragment") == 4


async def test_each_attempt_shown_is_one_request_on_the_callers_clock(rig: Rig) -> None:
    """The boot policy is the only retry loop: when the manager shows "attempt N" of a stage,
    the Resource API has seen N-1 requests of it. Time comes from the caller: the backoff is
    a fixed schedule, nothing really waits, and the record carries the caller's time."""
    packed = rig.pack()
    rig.dev_api.faults(status=503, path="/login", count=2)
    rig.dev_api.faults(status=503, path="/binary-split/key-fragment", count=2)
    manager: UnlockManager

    async def look() -> tuple[str, str, float, int]:
        stage = manager.snapshot().progress.stage
        path = {"authenticating": "/login", "downloading_key": "/binary-split/key-fragment"}
        method = "POST" if stage == "authenticating" else "GET"
        served = await asyncio.to_thread(rig.dev_api.count, method, path[stage])
        snapshot = manager.snapshot()
        assert snapshot.next_retry_in is not None
        return stage, manager.status_line(), snapshot.next_retry_in, served

    stepped = Stepped(look)
    manager = rig.manager(time_source=stepped)

    result = await unlock(manager)

    assert result["state"] == "ready", result
    assert stepped.seen == [
        ("authenticating", "waiting for network, next try in 1 s (attempt 2)", 1.0, 1),
        ("authenticating", "waiting for network, next try in 2 s (attempt 3)", 2.0, 2),
        ("downloading_key", "waiting for network, next try in 1 s (attempt 2)", 1.0, 1),
        ("downloading_key", "waiting for network, next try in 2 s (attempt 3)", 2.0, 2),
    ]
    assert rig.dev_api.count("POST", "/login") == 3
    assert rig.dev_api.count("GET", "/binary-split/key-fragment") == 3
    stages = manager.stats.stage_seconds
    assert stages[UnlockState.AUTHENTICATING] == stages[UnlockState.DOWNLOADING_KEY] == 3.0
    assert stages[UnlockState.CHECKING] == stages[UnlockState.LOADING] == 0.0
    record = read_record(rig.state_dir)
    assert record is not None
    assert record.unlocked_at == "2030-01-02T03:04:05+00:00"
    assert [image.id for image in record.images] == [packed.image_id]


async def test_docker_engine_started_late(rig: Rig, late_dockerd: DockerDaemon) -> None:
    packed = rig.pack()
    rig.docker_host = late_dockerd.host
    manager = rig.manager()
    await manager.start()

    await until(
        lambda: (
            manager.state is UnlockState.WAITING and as_json(manager.snapshot())["attempt"] >= 2
        ),
        "retries while the engine is down",
    )
    assert as_json(manager.snapshot())["progress"]["stage"] == "loading"
    assert manager.status_line().startswith("waiting for the Docker engine, next try in ")

    late_dockerd.start()
    result = as_json(await asyncio.wait_for(manager.wait(), DEADLINE))

    assert result["state"] == "ready", result
    assert packed.image_id in {image.id for image in late_dockerd.client().images.list()}


async def test_concurrent_starts_run_one_workflow(rig: Rig) -> None:
    rig.pack()
    manager = rig.manager()

    first, second = await asyncio.gather(manager.start(), manager.start())
    result = as_json(await asyncio.wait_for(manager.wait(), DEADLINE))
    third = await manager.start()

    assert first.state == second.state == "checking"
    assert result["state"] == third.state == "ready"
    assert rig.dev_api.count("POST", "/login") == 1
    assert rig.dev_api.count("GET", "/binary-split/key-fragment") == 1


async def test_nothing_to_unlock_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFoundError, match="no images archive"):
        await rig.manager().start()


class PausingEngines:
    """Real engines whose load pauses after the first piece until the manager is stopping.

    Lets the test stop the workflow at a known point in the middle of ``docker load``.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.manager: UnlockManager | None = None
        self.first_piece_sent = threading.Event()

    def __call__(self) -> Engine:
        engines = self

        class Pausing(Engine):
            def load(self, chunks: Iterable[bytes]) -> list[str]:
                return super().load(engines.paused(chunks))

        return Pausing(self.host)

    def paused(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for index, piece in enumerate(chunks):
            yield piece
            if index == 0:
                self.first_piece_sent.set()
                deadline = time.monotonic() + DEADLINE
                while not (self.manager and self.manager.stopping):
                    assert time.monotonic() < deadline, "the test never stopped the unlock"
                    time.sleep(0.01)  # polling the stop flag from the worker thread


async def test_stop_during_loading_leaves_nothing_half_done(rig: Rig) -> None:
    packed = rig.pack()
    engines = PausingEngines(rig.docker_host)
    manager = rig.manager(engine_factory=engines)
    engines.manager = manager
    before = rig.dockerd.image_ids()
    await manager.start()
    await until(engines.first_piece_sent.is_set, "loading to be under way")
    assert as_json(manager.snapshot())["state"] == "loading"

    await asyncio.wait_for(manager.close(), DEADLINE)  # what SIGTERM does

    assert as_json(manager.snapshot())["state"] == "idle"
    assert rig.dockerd.image_ids() == before
    assert read_record(rig.state_dir) is None
    assert not [p for p in rig.state_dir.glob("*") if p.name != RECORD_NAME]
    # The next boot unlocks normally.
    result = await unlock(rig.manager())
    assert result["state"] == "ready", result
    assert packed.image_id in rig.dockerd.image_ids()


@pytest.mark.parametrize("sizes", [[], [5], [10, 10], [3] * 50, [100_000, 7]])
def test_held_back_releases_everything_only_at_a_clean_end(sizes: list[int]) -> None:
    pieces = [os.urandom(size) for size in sizes]
    assert b"".join(held_back(pieces, holdback=16)) == b"".join(pieces)

    def failing() -> Iterator[bytes]:
        yield from pieces
        raise ValueError("stream failed")

    released = bytearray()
    with pytest.raises(ValueError):
        for piece in held_back(failing(), holdback=16):
            released += piece
    everything = b"".join(pieces)
    assert everything.startswith(released)
    assert len(everything) - len(released) >= min(16, len(everything))
