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
import dataclasses
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
    Installed,
    LoadOutcome,
    Trust,
    already_loaded,
    archive_changed,
    load_archive,
    load_trust,
    remove_images,
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
        self._view = UnlockView()  # the installed release and the unlock that brings it
        self._update = UnlockView()  # the last update's own progress, beside the installed one
        self._active = self._view  # the view the running workflow drives
        self._update_requested = False
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
        """What ``/unlock/status`` answers (see ``UnlockView.snapshot``), with the last update's
        progress or failure in ``update`` once one has run."""
        now = self._clock()
        snapshot = self._view.snapshot(now)
        if self._update.state is not UnlockState.IDLE:
            snapshot.update = self._update.update_snapshot(now)
        return snapshot

    def status_line(self) -> str:
        """What systemd's STATUS= says of the unlock (and of an update, while one runs or
        after one failed)."""
        now = self._clock()
        line = self._view.status_line(now)
        update = self._update
        if update.state is UnlockState.READY or update.state is UnlockState.IDLE:
            return line
        if update.state is UnlockState.ERROR:
            return f"{line}; update failed: {update.error}"
        return f"{line}; update {update.status_line(now)}"

    # -- control -------------------------------------------------------------------------------

    async def start(self) -> UnlockStatus:
        """Start the workflow unless it runs or is done; returns the snapshot at once.

        Raises ``NotFoundError`` when there is no archive and no record of loaded images.
        """
        if self._view.state is UnlockState.READY:
            self.request_update()  # a new archive may have been put in place
            return self.snapshot()
        if self._running():
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
        """Until ready or error, and any update queued behind it has run (at once when nothing
        runs)."""
        while True:
            task = self._task
            if task is not None and not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            elif self._update_requested:
                await asyncio.sleep(0)  # the queued check starts on the loop's next turn
            else:
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

    def request_update(self) -> None:
        """Look for a new archive at ``IMAGES_PATH`` (boot, ``POST /unlock``, ``SIGHUP``, the
        file put in place) and load it as an update while the installed images stay ready;
        also retries removing earlier releases' images that were in use. Runs after a workflow
        that is running now; at most one more is queued."""
        if self._running():
            self._update_requested = not self._cancel.is_set()  # not while stopping
            return
        self._update_requested = False
        if self._view.state is not UnlockState.READY or self._cancel.is_set():
            return  # the unlock proper reads whatever archive is there; or we are stopping
        self._cancel = threading.Event()
        self._task = asyncio.create_task(self._update_run(), name="update")

    def notice_archive(self) -> None:
        """The archive may have changed (``SIGHUP``, the file put in place): an update check
        when ready (or once the running workflow ends); a new attempt when the last unlock
        failed, or had nothing to unlock, and the automatic unlock is on."""
        if self._view.state is UnlockState.READY or self._running():
            self.request_update()
            return
        retry = self._view.state is UnlockState.ERROR or self._settings.loader_auto_unlock
        if retry and self._settings.images_path.exists():
            logger.info("unlock: {} was put in place; unlocking it", self._settings.images_path)
            task = asyncio.ensure_future(self.start())
            task.add_done_callback(_log_start_failure)

    def _after_run(self) -> None:
        """A queued update check starts once the workflow before it has ended."""
        if self._update_requested and self._view.state is UnlockState.READY:
            asyncio.get_running_loop().call_soon(self.request_update)

    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def _state_dir(self) -> Path:
        return self._settings.loader_state_dir

    # -- state changes -------------------------------------------------------------------------

    def _set_state(self, state: UnlockState) -> None:
        view = self._active
        view.state = state
        if state not in (UnlockState.WAITING, UnlockState.READY, UnlockState.ERROR):
            view.progress.stage = state
            view.waiting = None
        self._notify()

    def _notify(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:
            logger.exception("unlock on_change callback failed")

    def _set_progress(self, bytes_done: int) -> None:
        if self._active.state is UnlockState.LOADING:
            self._active.progress.bytes_done = bytes_done
            self._notify()

    # -- the workflow --------------------------------------------------------------------------

    async def _run(self) -> None:
        started = self._clock()
        try:
            installed = await self._stage(UnlockState.CHECKING, self._check_already_loaded)
            if installed is None:
                fragments = await self._fetch_fragments()
                outcome = await self._stage(UnlockState.LOADING, lambda: self._load(fragments))
                await self._stage(UnlockState.VERIFYING, lambda: self._verify(outcome))
            elif not installed.current or installed.record.pending_removal:
                self._update_requested = True  # ready on what is installed, then the update
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
        self._after_run()

    async def _update_run(self) -> None:
        """Load a new archive beside the installed images; switch the record to it only once
        its images are all verified, then remove what the previous release loaded and the new
        one does not carry. A failure leaves the installed release as it was, ready."""
        update, previous = UnlockView(), self._view.release
        try:
            changed = await asyncio.to_thread(
                archive_changed, self._state_dir, self._settings.images_path
            )
            if changed is None:  # nothing new: only images of earlier releases still to go
                await self._remove_pending()
                return
            logger.info(
                "update: {} is a new archive; loading it while release {} stays ready",
                self._settings.images_path,
                previous,
            )
            self._update, self._active = update, update
            self._update.progress = Progress()
            self.stats.stage_seconds.clear()
            fragments = await self._fetch_fragments()
            outcome = await self._stage(UnlockState.LOADING, lambda: self._load(fragments))
            await self._stage(UnlockState.VERIFYING, lambda: self._verify(outcome, changed))
            self._active = self._view
            await self._remove_pending()
            update.progress.stage = UnlockState.READY
            update.release = self._view.release
            self._set_update_state(update, UnlockState.READY)
            logger.info("update: release {} is installed and ready", self._view.release)
        except asyncio.CancelledError:
            update.error = None
            self._set_update_state(update, UnlockState.IDLE)
            raise
        except Exception as exc:
            update.error = describe(exc, subject="the new images archive")
            log = logger if isinstance(exc, LoaderError) else logger.opt(exception=exc)
            log.warning(
                "update failed during {}; still ready on release {}: {}",
                update.progress.stage.value,
                previous,
                update.error,
            )
            self._set_update_state(update, UnlockState.ERROR)
        finally:
            self._active = self._view
            self._after_run()

    def _set_update_state(self, update: UnlockView, state: UnlockState) -> None:
        update.state = state
        self._notify()

    async def _remove_pending(self) -> None:
        """Remove the images of earlier releases still listed in the record (those a container
        uses stay listed); the record is rewritten only if that changed."""
        record = await asyncio.to_thread(read_record, self._state_dir)
        if record is None or not record.pending_removal:
            return
        pending = record.pending_removal
        left = await self._in_engine(lambda engine: remove_images(engine, pending))
        if left != pending:
            kept = dataclasses.replace(record, pending_removal=left)
            await asyncio.to_thread(write_record, self._state_dir, kept)

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
        self._active.waiting = Waiting(attempt + 1, self._clock() + delay, waiting_for, str(exc))
        self._set_state(UnlockState.WAITING)
        logger.warning(
            "unlock {}: {} ({})", self._active.progress.stage.value, self.status_line(), exc
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

    async def _check_already_loaded(self) -> Installed | None:
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
            return None
        self._view.installed(record.record)
        return record

    async def _load(self, fragments: list[bytes]) -> LoadOutcome:
        archive, progress = self._settings.images_path, self._active.progress
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

    async def _verify(self, outcome: LoadOutcome, previous: UnlockRecord | None = None) -> None:
        """Every image present and tagged, then the record switched to them: the commit of an
        unlock or an update (a power cut before it leaves the previous record, after it the new
        one). Images the previous release had and this one does not are listed for removal."""
        images, api_version = outcome.manifest.images, self._settings.api_version
        await self._in_engine(lambda engine: verify_images(engine, images, api_version))
        carried = {image.id for image in images}
        dropped = [] if previous is None else [i.id for i in previous.images]
        dropped += [] if previous is None else list(previous.pending_removal)
        record = UnlockRecord(
            archive=outcome.archive,
            images=images,
            api_version=api_version,
            unlocked_at=self._now().isoformat(timespec="seconds"),
            release=outcome.manifest.release,
            publisher=outcome.verified_by,
            pending_removal=tuple(dict.fromkeys(i for i in dropped if i not in carried)),
        )
        await asyncio.to_thread(write_record, self._state_dir, record)
        self._view.installed(record)

    async def _in_engine(self, use: Callable[[Engine], T]) -> T:
        """Connect, ``use`` the engine, disconnect: all in a worker thread."""

        def connected() -> T:
            with self._engine_factory() as engine:
                return use(engine)

        return await in_thread(connected, self._cancel)


def _log_start_failure(task: asyncio.Future[UnlockStatus]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("unlock did not start: {}", task.exception())
