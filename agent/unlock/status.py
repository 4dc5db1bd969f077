"""What the unlock shows: the ``/unlock/status`` snapshot, the systemd STATUS= line, and the
numbers ``/metrics`` reads. The manager changes an ``UnlockView``; callers read it. The time
that a "next try in N s" counts down from is given by the caller (the manager's clock).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.retry import RetryCounts
from agent.schemas import UnlockProgress, UnlockState, UnlockStatus, UpdateStatus
from agent.unlock.record import UnlockRecord

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
    until: float  # the manager's clock at the next try
    waiting_for: str  # "network" or "the Docker engine"
    reason: str  # the fault, for the snapshot and the log


@dataclass
class UnlockView:
    """The unlock as callers see it: its state and what goes with the state."""

    state: UnlockState = UnlockState.IDLE
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    waiting: Waiting | None = None  # while a transient fault is backed off
    image_count: int = 0  # once ready
    release: int = 0  # of the installed images, once ready
    publisher: str | None = None  # the key id that signed them, if one did

    def installed(self, record: UnlockRecord) -> None:
        """What is ready: the record of the unlock that holds."""
        self.image_count = len(record.images)
        self.release = record.release
        self.publisher = record.publisher

    def snapshot(self, now: float) -> UnlockStatus:
        """What ``/unlock/status`` answers. The retry fields are set only while waiting, the
        image count only when ready."""
        progress = self.progress
        snapshot = UnlockStatus(
            state=self.state,
            error=self.error,
            progress=UnlockProgress(
                stage=progress.stage,
                bytes_done=progress.bytes_done,
                bytes_total=progress.bytes_total,
                percent=progress.percent,
            ),
            message=self.status_line(now),
        )
        if self.waiting is not None:
            snapshot.attempt = self.waiting.attempt
            snapshot.next_retry_in = round(max(0.0, self.waiting.until - now), 1)
            snapshot.retry_reason = self.waiting.reason
        if self.state is UnlockState.READY:
            snapshot.images = self.image_count
            snapshot.release = self.release
            snapshot.publisher = self.publisher
        return snapshot

    def update_snapshot(self, now: float) -> UpdateStatus:
        """This view as an update's: its stage and progress, or how it ended."""
        whole = self.snapshot(now)
        return UpdateStatus(
            state=whole.state,
            error=whole.error,
            progress=whole.progress,
            message=whole.message,
            release=self.release if self.state is UnlockState.READY else None,
        )

    def status_line(self, now: float) -> str:
        state = self.state
        if state is UnlockState.READY:
            plural = "" if self.image_count == 1 else "s"
            signed = (
                f", release {self.release} signed by {self.publisher}" if self.publisher else ""
            )
            return f"ready: {self.image_count} image{plural} loaded{signed}"
        if state is UnlockState.ERROR:
            return f"error: {self.error}"
        if state is UnlockState.WAITING and self.waiting is not None:
            seconds = max(0, round(self.waiting.until - now))
            return (
                f"waiting for {self.waiting.waiting_for}, next try in {seconds} s "
                f"(attempt {self.waiting.attempt})"
            )
        if state is UnlockState.LOADING and self.progress.bytes_total:
            return f"loading images: {self.progress.percent:.0f}%"
        return STAGE_LABELS.get(state, str(state))
