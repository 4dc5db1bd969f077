"""The unlock's state machine on the event loop: ``UnlockManager`` (drawn in ``agent.unlock``).

It runs the stages in order, backs off transient faults with the boot retry policy (the only
retry loop: the Resource API client is asked for one request per attempt), hands the blocking
work to a worker thread (``agent.unlock.threads``, ``agent.unlock.pipeline``) and keeps what
callers see (``agent.unlock.status``). The clock, the sleep, the jitter and the wall-clock time
come from its caller, with the real ones by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from loguru import logger

from agent import keys
from agent.engine import Engine
from agent.errors import DockerUnavailable, LoaderError, NotAuthenticated, NotFoundError, describe
from agent.retry import Clock, RetryPolicy, Sleep, retry_call
from agent.schemas import UnlockState, UnlockStatus
from agent.settings import Settings
from agent.unlock.pipeline import (
    LoadOutcome,
    Trust,
    already_loaded,
    load_archive,
    load_trust,
    verify_images,
)
from agent.unlock.record import UnlockRecord, read_record, write_record
from agent.unlock.status import Progress, UnlockStats, UnlockView, Waiting
from agent.unlock.threads import Throttle, call_soon, in_thread

if TYPE_CHECKING:
    from agent.api_client import ResourceApiClient

T = TypeVar("T")

PROGRESS_INTERVAL = 0.25  # seconds between progress notifications (at most 4 a second)
BOOT_RETRY_POLICY = RetryPolicy(base_delay=1.0, max_delay=30.0, max_attempts=None, max_total=None)
# One request per call of the Resource API client: the boot policy's loop is the only one, so
# each attempt the unlock shows is one real request.
SINGLE_ATTEMPT = RetryPolicy(max_attempts=1, max_total=None)
MB = 1000 * 1000


class UnlockManager:
    """One unlock workflow at a time; its state for ``/unlock/status`` and systemd STATUS=."""

    def __init__(
        self,
        settings: Settings,
        api: ResourceApiClient,
        *,
        engine_factory: Callable[[], Engine] | None = None,
        on_change: Callable[[], None] | None = None,
        retry_policy: RetryPolicy = BOOT_RETRY_POLICY,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._api = api
        self._engine_factory = engine_factory or (lambda: Engine(settings.docker_host))
        self._on_change = on_change
        self._policy = retry_policy
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._now = now
        self._view = UnlockView()
        self._task: asyncio.Task[None] | None = None
        self._cancel = threading.Event()
        self._stage_started = clock()
        self.stats = UnlockStats()

    # -- what callers see ----------------------------------------------------------------------

    @property
    def state(self) -> UnlockState:
        return self._view.state

    @property
    def stopping(self) -> bool:
        """Whether ``close`` has asked a running workflow (and its worker thread) to stop."""
        return self._cancel.is_set()

    def snapshot(self) -> UnlockStatus:
        """What ``/unlock/status`` answers (see ``UnlockView.snapshot``)."""
        return self._view.snapshot(self._clock())

    def status_line(self) -> str:
        """What systemd's STATUS= says of the unlock."""
        return self._view.status_line(self._clock())

    # -- control -------------------------------------------------------------------------------

    async def start(self) -> UnlockStatus:
        """Start the workflow unless it runs or is done; returns the snapshot at once.

        Raises ``NotFoundError`` when there is no archive and no record of loaded images.
        """
        if self._view.state is UnlockState.READY or self._running():
            return self.snapshot()
        if not self._settings.images_path.exists() and read_record(self._state_dir) is None:
            raise NotFoundError(
                f"there is no images archive at {self._settings.images_path} "
                "and no images were unlocked before"
            )
        self._view.error = None
        self._view.waiting = None
        self._view.progress = Progress()
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
        self._view.state = state
        if state not in (UnlockState.WAITING, UnlockState.READY, UnlockState.ERROR):
            self._view.progress.stage = state
            self._view.waiting = None
        self._notify()

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:
            logger.exception("unlock on_change callback failed")

    def _set_progress(self, bytes_done: int) -> None:
        if self._view.state is UnlockState.LOADING:
            self._view.progress.bytes_done = bytes_done
            self._notify()

    # -- the workflow --------------------------------------------------------------------------

    async def _run(self) -> None:
        started = self._clock()
        try:
            if not await self._stage(UnlockState.CHECKING, self._check_already_loaded):
                fragments = await self._fetch_fragments()
                outcome = await self._stage(UnlockState.LOADING, lambda: self._load(fragments))
                await self._stage(UnlockState.VERIFYING, lambda: self._verify(outcome))
        except asyncio.CancelledError:
            logger.info("unlock stopped during {}", self._view.progress.stage.value)
            self._view.error = None
            self._set_state(UnlockState.IDLE)
            raise
        except Exception as exc:
            self._view.error = describe(exc, subject="the images archive")
            # A bug gets its traceback; our own errors are already a clear sentence.
            log = logger if isinstance(exc, LoaderError) else logger.opt(exception=exc)
            log.error(
                "unlock failed during {}: {}", self._view.progress.stage.value, self._view.error
            )
            self._set_state(UnlockState.ERROR)
            return
        elapsed = self._clock() - started
        logger.info("unlock ready: {} image(s) in {:.2f} s", self._view.image_count, elapsed)
        self._set_state(UnlockState.READY)

    async def _stage(self, state: UnlockState, step: Callable[[], Awaitable[T]]) -> T:
        """Run one stage, retrying transient faults (state ``waiting`` in between)."""
        began = self._clock()

        async def attempt() -> T:
            self._stage_started = self._clock()
            self._set_state(state)
            return await step()

        try:
            result = await retry_call(
                attempt,
                self._policy,
                on_retry=self._on_retry,
                rng=self._rng,
                sleep=self._sleep,
                clock=self._clock,
            )
        finally:
            self.stats.stage_seconds[state] = self._clock() - began
        logger.info("unlock {} done in {:.2f} s", state.value, self.stats.stage_seconds[state])
        return result

    def _on_retry(self, attempt: int, delay: float, exc: BaseException) -> None:
        self.stats.retries.record("unlock", exc)
        waiting_for = "the Docker engine" if isinstance(exc, DockerUnavailable) else "network"
        self._view.waiting = Waiting(attempt + 1, self._clock() + delay, waiting_for, str(exc))
        self._set_state(UnlockState.WAITING)
        logger.warning(
            "unlock {}: {} ({})", self._view.progress.stage.value, self.status_line(), exc
        )

    async def _fetch_fragments(self) -> list[bytes]:
        if not self._api.has_credentials:
            raise NotAuthenticated(
                "no Resource API credentials are configured (azaion-loader login, "
                "AZAION_EMAIL/AZAION_PASSWORD, or POST /unlock with email and password)"
            )
        api = self._api
        await self._stage(UnlockState.AUTHENTICATING, lambda: api.login(policy=SINGLE_ATTEMPT))
        api_fragment: bytes = await self._stage(
            UnlockState.DOWNLOADING_KEY, lambda: api.get_key_fragment(policy=SINGLE_ATTEMPT)
        )
        fragments = [api_fragment]
        device_path = self._settings.loader_device_fragment_path
        if device_path is not None:
            fragments.append(await asyncio.to_thread(keys.read_fragment_file, device_path))
        return fragments

    async def _trust(self) -> Trust:
        settings = self._settings
        return await asyncio.to_thread(
            load_trust,
            settings.loader_publishers_dir,
            self._state_dir,
            settings.loader_allow_downgrade,
        )

    async def _check_already_loaded(self) -> bool:
        settings = self._settings
        trust = await self._trust()
        record = await in_thread(
            lambda: already_loaded(
                self._state_dir,
                settings.images_path,
                self._engine_factory,
                settings.api_version,
                trust,
            ),
            self._cancel,
        )
        if record is None:
            return False
        self._view.installed(record)
        return True

    async def _load(self, fragments: list[bytes]) -> LoadOutcome:
        archive, progress = self._settings.images_path, self._view.progress
        try:
            progress.bytes_total = archive.stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"there is no images archive at {archive}") from exc
        progress.bytes_done = 0
        self._notify()
        loop = asyncio.get_running_loop()
        throttle = Throttle(PROGRESS_INTERVAL, self._clock)

        def read(done: int) -> None:  # worker thread
            if throttle.due() or done >= progress.bytes_total:
                call_soon(loop, self._set_progress, done)

        def decrypted(size: int) -> None:  # worker thread; the loop only reads the sum
            self.stats.decrypted_bytes += size

        trust = await self._trust()
        outcome = await in_thread(
            lambda: load_archive(
                archive, fragments, self._engine_factory, self._cancel, read, decrypted, trust
            ),
            self._cancel,
        )
        self._set_progress(outcome.archive.size)
        elapsed = max(self._clock() - self._stage_started, 1e-6)
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
            unlocked_at=self._now().isoformat(timespec="seconds"),
            release=outcome.manifest.release,
            publisher=outcome.verified_by,
        )
        await asyncio.to_thread(write_record, self._state_dir, record)
        self._view.installed(record)

    async def _in_engine(self, use: Callable[[Engine], T]) -> T:
        """Connect, ``use`` the engine, disconnect: all in a worker thread."""

        def connected() -> T:
            with self._engine_factory() as engine:
                return use(engine)

        return await in_thread(connected, self._cancel)
