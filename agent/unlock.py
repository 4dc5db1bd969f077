"""The unlock workflow: the encrypted images archive becomes images in the Docker engine.

    idle -> checking --(this archive already loaded, images present)--> ready   (no network)
               |
               v
         authenticating -> downloading_key -> loading -> verifying -> ready
               any stage --(permanent fault)--> error
               any stage --(transient fault)--> waiting --(backoff)--> the same stage again

``waiting`` is the state while a transient fault (network or Resource API down, 5xx, 429,
Docker engine not up) is being backed off; ``progress.stage`` then still names the stage that
will be retried. At boot the retries go on indefinitely.

``loading`` is one stream: archive file -> decryptor -> ``docker load`` (chunked HTTP body), in
a worker thread. Only authenticated plaintext is passed on, the manifest at the head of the
payload is read (so a wrong key fails) before the engine is contacted, and the last
``HOLDBACK`` bytes are released only once the whole stream has authenticated: Docker cannot
see the end of the tar, and so cannot finish a load, of an archive that later fails. A failed
or cancelled load drops the connection mid-body, and the engine keeps nothing of it.

A successful unlock is recorded (atomically) in ``LOADER_STATE_DIR/unlock.json``: the archive's
digest and the image IDs. At the next boot, the same archive with all those images present
goes straight to ready with no network.

``UnlockManager.stats`` keeps what ``/metrics`` reads beside the state: how long each stage of
the latest unlock took, the plaintext bytes decrypted from the archive, and the retries by cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loguru import logger

from agent import keys
from agent.archive import ArchiveManifest, ImageEntry, PayloadSplitter
from agent.durable import write_atomically
from agent.errors import (
    DockerUnavailable,
    LoaderError,
    NotAuthenticated,
    NotFoundError,
    UnlockCancelled,
    UnlockError,
    describe,
)
from agent.images import ImageEngine
from agent.retry import RetryCounts, RetryPolicy, retry_call
from agent.schemas import UnlockProgress, UnlockState, UnlockStatus
from agent.settings import Settings
from agent.stream import HEADER_SIZE, decrypt_iter

if TYPE_CHECKING:
    from agent.api_client import ResourceApiClient

T = TypeVar("T")

RECORD_NAME = "unlock.json"
RECORD_VERSION = 1
READ_SIZE = 1024 * 1024
HOLDBACK = 64 * 1024  # > the tar end-of-archive marker (1 KiB) with a wide margin
PROGRESS_INTERVAL = 0.25  # seconds between progress notifications (at most 4 a second)
BOOT_RETRY_POLICY = RetryPolicy(base_delay=1.0, max_delay=30.0, max_attempts=None, max_total=None)
CLOSE_TIMEOUT = 30.0
MB = 1000 * 1000


STAGE_LABELS = {
    UnlockState.IDLE: "images locked",
    UnlockState.CHECKING: "checking images",
    UnlockState.AUTHENTICATING: "logging in",
    UnlockState.DOWNLOADING_KEY: "downloading the key",
    UnlockState.LOADING: "loading images",
    UnlockState.VERIFYING: "verifying images",
}


@dataclass
class UnlockStats:
    """What ``/metrics`` reads of the unlocks since the agent started."""

    # Seconds each stage took in its latest run (waits between retries included), until it
    # finished, failed or was stopped.
    stage_seconds: dict[UnlockState, float] = field(default_factory=dict)
    decrypted_bytes: int = 0  # the archive's plaintext, added by the worker thread per piece
    retries: RetryCounts = field(default_factory=RetryCounts)


# ---------------------------------------------------------------------------------------------
# The state record


@dataclass(frozen=True)
class ArchiveIdentity:
    """Which archive: the SHA-256 of its stream header, and its size.

    The header holds the archive's random salt and a MAC over it under the archive's key, so it
    is unique per archive and cannot be reused with other content without the key. Digesting
    the header instead of the whole file keeps the boot-time check instant at any archive size
    (and the load free of a second hash over every byte).
    """

    header_sha256: str
    size: int

    @classmethod
    def of_header(cls, header: bytes, size: int) -> ArchiveIdentity:
        return cls(hashlib.sha256(header).hexdigest(), size)


@dataclass(frozen=True)
class UnlockRecord:
    """What survives a reboot: which archive was unlocked, and into which images."""

    archive: ArchiveIdentity
    images: tuple[ImageEntry, ...]
    api_version: str
    unlocked_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "archive": {
                "header_sha256": self.archive.header_sha256,
                "size": self.archive.size,
            },
            "images": [image.to_json() for image in self.images],
            "api_version": self.api_version,
            "unlocked_at": self.unlocked_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> UnlockRecord:
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise ValueError("unknown record version")
        archive = data["archive"]
        return cls(
            archive=ArchiveIdentity(
                header_sha256=str(archive["header_sha256"]), size=int(archive["size"])
            ),
            images=tuple(ImageEntry.from_json(item) for item in data["images"]),
            api_version=str(data["api_version"]),
            unlocked_at=str(data["unlocked_at"]),
        )


def record_path(state_dir: Path) -> Path:
    return state_dir / RECORD_NAME


def read_record(state_dir: Path) -> UnlockRecord | None:
    """The last successful unlock, or None (none yet, or unreadable: then we simply reload)."""
    path = record_path(state_dir)
    try:
        return UnlockRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, LoaderError) as exc:
        logger.warning("ignoring unreadable unlock record {}: {}", path, exc)
        return None


def write_record(state_dir: Path, record: UnlockRecord) -> None:
    """Durable and atomic: a crash leaves the old record or the new one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode("utf-8") + b"\n"
    write_atomically(record_path(state_dir), data)


def remove_stale_temp_files(state_dir: Path) -> None:
    """Temp files of a record write that a power cut interrupted; harmless, but tidy up."""
    for stale in state_dir.glob(f".{RECORD_NAME}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def archive_identity(path: Path) -> ArchiveIdentity:
    """The identity of the archive at ``path`` (reads only its header)."""
    with path.open("rb") as file:
        header = file.read(HEADER_SIZE)
        size = os.fstat(file.fileno()).st_size
    return ArchiveIdentity.of_header(header, size)


# ---------------------------------------------------------------------------------------------
# The blocking parts (worker thread)


@dataclass(frozen=True)
class LoadOutcome:
    manifest: ArchiveManifest
    archive: ArchiveIdentity
    loaded: list[str]


class ArchiveReader:
    """Reads the archive once: keeps its header (its identity), counts progress, and stops
    when cancelled."""

    def __init__(
        self, path: Path, cancel: threading.Event, progress: Callable[[int], None]
    ) -> None:
        self.path = path
        self._cancel = cancel
        self._progress = progress
        self._header = b""
        self.size = 0

    def chunks(self) -> Iterator[bytes]:
        with self.path.open("rb") as file:
            while block := file.read(READ_SIZE):
                if self._cancel.is_set():
                    raise UnlockCancelled("the unlock was stopped")
                if len(self._header) < HEADER_SIZE:
                    self._header += block[: HEADER_SIZE - len(self._header)]
                self.size += len(block)
                self._progress(self.size)
                yield block

    def identity(self) -> ArchiveIdentity:
        return ArchiveIdentity.of_header(self._header, self.size)


def held_back(pieces: Iterable[bytes], holdback: int = HOLDBACK) -> Iterator[bytes]:
    """Yield ``pieces`` but keep at least the last ``holdback`` bytes until the source ends
    cleanly (whole pieces are held, so nothing is copied).

    If the source raises (tampered or truncated stream), the tail is never released, so the
    consumer (docker load) never sees the end of the tar of a stream that did not verify.
    """
    pending: deque[bytes] = deque()
    pending_size = 0
    for piece in pieces:
        pending.append(piece)
        pending_size += len(piece)
        while pending and pending_size - len(pending[0]) >= holdback:
            pending_size -= len(pending[0])
            yield pending.popleft()
    yield from pending


def until_cancelled(pieces: Iterable[bytes], cancel: threading.Event) -> Iterator[bytes]:
    """Stop before handing on the next piece once ``cancel`` is set (the load is then aborted)."""
    for piece in pieces:
        if cancel.is_set():
            raise UnlockCancelled("the unlock was stopped")
        yield piece


def counted(pieces: Iterable[bytes], count: Callable[[int], None]) -> Iterator[bytes]:
    """Pass ``pieces`` on, telling ``count`` each one's size (once per piece, not per byte)."""
    for piece in pieces:
        count(len(piece))
        yield piece


def load_archive(
    path: Path,
    fragments: list[bytes],
    engine_factory: Callable[[], ImageEngine],
    cancel: threading.Event,
    progress: Callable[[int], None],
    decrypted: Callable[[int], None] = lambda size: None,
) -> LoadOutcome:
    """Decrypt ``path`` straight into the engine's image load. Blocking: run in a thread.

    ``progress`` is told the archive bytes read so far, ``decrypted`` each authenticated piece's
    size."""
    reader = ArchiveReader(path, cancel, progress)
    splitter = PayloadSplitter(counted(decrypt_iter(reader.chunks(), fragments), decrypted))
    manifest = splitter.read_manifest()  # wrong key or foreign file: fails before Docker
    with engine_factory() as engine:
        loaded = engine.load(until_cancelled(held_back(splitter.tar_chunks()), cancel))
    return LoadOutcome(manifest=manifest, archive=reader.identity(), loaded=loaded)


def verify_images(engine: ImageEngine, images: Iterable[ImageEntry], api_version: str) -> None:
    """Every image present; each ``api_tag`` image tagged ``repository:API_VERSION``."""
    images = list(images)
    missing = [image for image in images if image.id not in engine.present([image.id])]
    if missing:
        names = ", ".join(f"{image.ref} ({image.id[:19]})" for image in missing)
        raise UnlockError(f"images missing from the Docker engine after loading: {names}")
    for image in images:
        if image.api_tag and image.repository:
            wanted = f"{image.repository}:{api_version}"
            if wanted not in engine.repo_tags(image.id):
                engine.tag(image.id, image.repository, api_version)


def all_present(engine: ImageEngine, images: Iterable[ImageEntry]) -> bool:
    ids = [image.id for image in images]
    return engine.present(ids) == set(ids)


# ---------------------------------------------------------------------------------------------
# The manager (event loop side)


@dataclass
class Progress:
    stage: UnlockState = UnlockState.IDLE
    bytes_done: int = 0
    bytes_total: int = 0

    @property
    def percent(self) -> float:
        if self.bytes_total <= 0:
            return 0.0
        return round(min(100.0, 100.0 * self.bytes_done / self.bytes_total), 1)


@dataclass
class Waiting:
    attempt: int  # the attempt that comes next
    until: float  # monotonic time of the next try
    waiting_for: str  # "network" or "the Docker engine"
    reason: str  # the fault, for the snapshot and the log


class UnlockManager:
    """One unlock workflow at a time; its state for ``/unlock/status`` and systemd STATUS=."""

    def __init__(
        self,
        settings: Settings,
        api: ResourceApiClient,
        *,
        engine_factory: Callable[[], ImageEngine] | None = None,
        on_change: Callable[[], None] | None = None,
        retry_policy: RetryPolicy = BOOT_RETRY_POLICY,
    ) -> None:
        self._settings = settings
        self._api = api
        self._engine_factory = engine_factory or (lambda: ImageEngine.connect(settings.docker_host))
        self._on_change = on_change
        self._policy = retry_policy
        self._state = UnlockState.IDLE
        self._error: str | None = None
        self._progress = Progress()
        self._waiting: Waiting | None = None
        self._image_count = 0
        self._task: asyncio.Task[None] | None = None
        self._cancel = threading.Event()
        self._stage_started = time.monotonic()
        self.stats = UnlockStats()

    # -- what callers see ----------------------------------------------------------------------

    @property
    def state(self) -> UnlockState:
        return self._state

    @property
    def stopping(self) -> bool:
        """Whether ``close`` has asked a running workflow (and its worker thread) to stop."""
        return self._cancel.is_set()

    def snapshot(self) -> UnlockStatus:
        """What ``/unlock/status`` answers. The retry fields are set only while waiting, the
        image count only when ready."""
        progress = self._progress
        snapshot = UnlockStatus(
            state=self._state,
            error=self._error,
            progress=UnlockProgress(
                stage=progress.stage,
                bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total,
                percent=progress.percent,
            ),
            message=self.status_line(),
        )
        if self._waiting is not None:
            snapshot.attempt = self._waiting.attempt
            snapshot.next_retry_in = round(max(0.0, self._waiting.until - time.monotonic()), 1)
            snapshot.retry_reason = self._waiting.reason
        if self._state is UnlockState.READY:
            snapshot.images = self._image_count
        return snapshot

    def status_line(self) -> str:
        state = self._state
        if state is UnlockState.READY:
            plural = "" if self._image_count == 1 else "s"
            return f"ready: {self._image_count} image{plural} loaded"
        if state is UnlockState.ERROR:
            return f"error: {self._error}"
        if state is UnlockState.WAITING and self._waiting is not None:
            seconds = max(0, round(self._waiting.until - time.monotonic()))
            return (
                f"waiting for {self._waiting.waiting_for}, next try in {seconds} s "
                f"(attempt {self._waiting.attempt})"
            )
        if state is UnlockState.LOADING and self._progress.bytes_total:
            return f"loading images: {self._progress.percent:.0f}%"
        return STAGE_LABELS.get(state, str(state))

    # -- control -------------------------------------------------------------------------------

    async def start(self) -> UnlockStatus:
        """Start the workflow unless it runs or is done; returns the snapshot at once.

        Raises ``NotFoundError`` when there is no archive and no record of loaded images.
        """
        if self._state is UnlockState.READY or self._running():
            return self.snapshot()
        if not self._settings.images_path.exists() and read_record(self._state_dir) is None:
            raise NotFoundError(
                f"there is no images archive at {self._settings.images_path} "
                "and no images were unlocked before"
            )
        self._error = None
        self._waiting = None
        self._progress = Progress()
        self.stats.stage_seconds.clear()  # the stages of this unlock only
        self._cancel = threading.Event()
        self._task = asyncio.create_task(self._run(), name="unlock")
        self._set_state(UnlockState.CHECKING)
        return self.snapshot()

    async def wait(self) -> UnlockStatus:
        """Until ready or error (or at once when nothing runs)."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        return self.snapshot()

    async def close(self) -> None:
        """Stop a running workflow; the worker thread is stopped too, within a chunk."""
        task = self._task
        if task is None or task.done():
            return
        self._cancel.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def _state_dir(self) -> Path:
        return self._settings.loader_state_dir

    # -- state changes -------------------------------------------------------------------------

    def _set_state(self, state: UnlockState) -> None:
        self._state = state
        if state not in (UnlockState.WAITING, UnlockState.READY, UnlockState.ERROR):
            self._progress.stage = state
            self._waiting = None
        self._notify()

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:
            logger.exception("unlock on_change callback failed")

    def _set_progress(self, bytes_done: int) -> None:
        if self._state is UnlockState.LOADING:
            self._progress.bytes_done = bytes_done
            self._notify()

    # -- the workflow --------------------------------------------------------------------------

    async def _run(self) -> None:
        started = time.monotonic()
        try:
            if not await self._stage(UnlockState.CHECKING, self._check_already_loaded):
                fragments = await self._fetch_fragments()
                outcome = await self._stage(UnlockState.LOADING, lambda: self._load(fragments))
                await self._stage(UnlockState.VERIFYING, lambda: self._verify(outcome))
        except asyncio.CancelledError:
            logger.info("unlock stopped during {}", self._progress.stage.value)
            self._error = None
            self._set_state(UnlockState.IDLE)
            raise
        except Exception as exc:
            self._error = describe(exc, subject="the images archive")
            # A bug gets its traceback; our own errors are already a clear sentence.
            log = logger if isinstance(exc, LoaderError) else logger.opt(exception=exc)
            log.error("unlock failed during {}: {}", self._progress.stage.value, self._error)
            self._set_state(UnlockState.ERROR)
            return
        logger.info(
            "unlock ready: {} image(s) in {:.2f} s", self._image_count, time.monotonic() - started
        )
        self._set_state(UnlockState.READY)

    async def _stage(self, state: UnlockState, step: Callable[[], Awaitable[T]]) -> T:
        """Run one stage, retrying transient faults (state ``waiting`` in between)."""
        began = time.monotonic()

        async def attempt() -> T:
            self._stage_started = time.monotonic()
            self._set_state(state)
            return await step()

        try:
            result = await retry_call(attempt, self._policy, on_retry=self._on_retry)
        finally:
            self.stats.stage_seconds[state] = time.monotonic() - began
        logger.info("unlock {} done in {:.2f} s", state.value, self.stats.stage_seconds[state])
        return result

    def _on_retry(self, attempt: int, delay: float, exc: BaseException) -> None:
        self.stats.retries.record("unlock", exc)
        waiting_for = "the Docker engine" if isinstance(exc, DockerUnavailable) else "network"
        self._waiting = Waiting(attempt + 1, time.monotonic() + delay, waiting_for, str(exc))
        self._set_state(UnlockState.WAITING)
        logger.warning("unlock {}: {} ({})", self._progress.stage.value, self.status_line(), exc)

    async def _fetch_fragments(self) -> list[bytes]:
        if not self._api.has_credentials and self._settings.has_credentials:
            assert self._settings.azaion_email and self._settings.azaion_password
            self._api.set_credentials(
                self._settings.azaion_email, self._settings.azaion_password.get_secret_value()
            )
        if not self._api.has_credentials:
            raise NotAuthenticated(
                "no Resource API credentials are configured (azaion-loader login, "
                "AZAION_EMAIL/AZAION_PASSWORD, or POST /unlock with email and password)"
            )
        await self._stage(UnlockState.AUTHENTICATING, self._api.login)
        api_fragment: bytes = await self._stage(
            UnlockState.DOWNLOADING_KEY, self._api.get_key_fragment
        )
        fragments = [api_fragment]
        device_path = self._settings.loader_device_fragment_path
        if device_path is not None:
            fragments.append(await asyncio.to_thread(keys.read_fragment_file, device_path))
        return fragments

    async def _check_already_loaded(self) -> bool:
        remove_stale_temp_files(self._state_dir)
        record = read_record(self._state_dir)
        archive = self._settings.images_path
        if record is None:
            return False
        if (
            archive.exists()
            and await asyncio.to_thread(archive_identity, archive) != record.archive
        ):
            logger.info("unlock: {} is a new archive, loading it", archive)
            return False
        present = await self._in_engine(lambda engine: all_present(engine, record.images))
        if not present:
            if not archive.exists():
                raise NotFoundError(
                    f"the images archive {archive} is gone and the images it held are no "
                    "longer in the Docker engine"
                )
            logger.info("unlock: recorded images are missing from the Docker engine, reloading")
            return False
        api_version = self._settings.api_version
        await self._in_engine(lambda engine: verify_images(engine, record.images, api_version))
        self._image_count = len(record.images)
        logger.info("unlock: archive already loaded and all images present (no network needed)")
        return True

    async def _load(self, fragments: list[bytes]) -> LoadOutcome:
        archive = self._settings.images_path
        try:
            self._progress.bytes_total = archive.stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"there is no images archive at {archive}") from exc
        self._progress.bytes_done = 0
        self._notify()
        loop = asyncio.get_running_loop()
        throttle = _Throttle(PROGRESS_INTERVAL)

        def progress(done: int) -> None:  # worker thread
            if throttle.due() or done >= self._progress.bytes_total:
                with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                    loop.call_soon_threadsafe(self._set_progress, done)

        def decrypted(size: int) -> None:  # worker thread; the loop only reads the sum
            self.stats.decrypted_bytes += size

        outcome = await self._in_thread(
            lambda: load_archive(
                archive, fragments, self._engine_factory, self._cancel, progress, decrypted
            )
        )
        self._set_progress(outcome.archive.size)
        elapsed = max(time.monotonic() - self._stage_started, 1e-6)
        logger.info(
            "unlock: loaded {} ({:.1f} MB, {:.1f} MB/s): {}",
            archive,
            outcome.archive.size / MB,
            outcome.archive.size / MB / elapsed,
            ", ".join(outcome.loaded) or "no names reported",
        )
        return outcome

    async def _verify(self, outcome: LoadOutcome) -> None:
        images, api_version = outcome.manifest.images, self._settings.api_version
        await self._in_engine(lambda engine: verify_images(engine, images, api_version))
        record = UnlockRecord(
            archive=outcome.archive,
            images=images,
            api_version=api_version,
            unlocked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        await asyncio.to_thread(write_record, self._state_dir, record)
        self._image_count = len(images)

    async def _in_engine(self, use: Callable[[ImageEngine], T]) -> T:
        """Connect, ``use`` the engine, disconnect: all in a worker thread."""

        def connected() -> T:
            with self._engine_factory() as engine:
                return use(engine)

        return await self._in_thread(connected)

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a daemon thread; if we are cancelled, stop it and wait for it.

        A daemon thread (not the default executor) so a stuck engine cannot hold up exit.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result = fn()
            except BaseException as exc:
                _call_soon(loop, settle, None, exc)
            else:
                _call_soon(loop, settle, result, None)

        threading.Thread(target=work, name="unlock-worker", daemon=True).start()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._cancel.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(future), CLOSE_TIMEOUT)
            raise


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


class _Throttle:
    """True at most once per ``interval`` seconds (thread-local use only)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._interval
        return True
