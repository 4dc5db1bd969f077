"""BigPartDownloads: a big part from the CDN into the cache, once however many callers ask.

``fetch`` (the path once the part is intact) and ``open`` (the part open for reading, while
it downloads) are single-flight per part: concurrent loads of one part share one check of the
cache and at most one download. A caller that goes away (client disconnected) does not stop the
others' download; the last one to go does (its partial file stays, to be resumed), unless all
the bytes are on disk already. A download being stopped is not shared: a caller that comes
meanwhile waits for it to end and starts afresh.

A cold load does not wait for the end: ``open`` hands it the partial file as a ``GrowingFile``
once the first bytes (the big part's key fragment) are there, and the load reads on as the
download writes. The download announces each batch it has written (``Progress``, about 1 MiB:
the loads wake once per batch, not per TCP segment) and writes a batch, hashing it in the same
worker-thread pass, while the next one arrives. A load hands out only chunks that authenticate
(the stream format, as for a cached file); the SHA-256 check still decides, at the end, whether
the file goes into the cache under its name, so a warm load never reads an unverified file, and
a load's last read waits for that check: it ends with the part in the cache, or with the
download's error instead of its last chunk. A
load that meets bytes that do not authenticate marks the download (``forget``): stopped, its
partial file is dropped rather than resumed. A download that fails for good cuts every load
following it off with its error; one that starts afresh (416, or content that did not match)
has its loads reopen the new file once it holds what they need.

A download is resumed with a range from where its partial file ends, in one retry loop
(``agent.retry``, by the client's policy). A pass that brings nothing, whether the CDN could
not be reached or answered with an error (counted as ``cdn`` in ``stats.retries``) or its body
broke off (``cdn_resume``), counts against the policy; a pass that brings bytes starts it
afresh, so a long download over a flaky link goes on as long as it makes progress. One
``TransferGuard`` covers the whole download, across resumptions: a CDN that drips bytes or
never ends is cut off (504), and no retry undoes that. A 416 (the partial copy and the CDN
disagree) drops the partial file and starts over once, and so does content whose length or
SHA-256 differs from the small part's record; the second time it is a 502. Before it starts,
the cache makes room for it within its bound and its file system must have room for what is
missing (``BigPartCache.make_room``); while it runs, and while loads read the part, the cache
does not evict it.
A download that fails for good drops its partial file.

``stats`` counts hits (an intact part on disk), misses (a download was needed) and the
download's retries, for ``/metrics``. Measured by ``bench/bench_load_cold.py``.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from agent.api_client import ResourceApiClient
from agent.cache import BigPartCache, Partial
from agent.errors import BodyInterrupted, RangeNotSatisfiable, TransferTooSlow, UpstreamError
from agent.retry import TRANSIENT_ERRORS, RetryCounts
from agent.transport import TransferGuard

WRITE_BATCH = 1024 * 1024
FLUSH_AFTER = 0.05  # seconds the bytes received may wait for a full batch before a write


@dataclass
class DownloadStats:
    """What ``/metrics`` reads: one cache hit or miss per check of a part (concurrent loads of
    one part share one), and the retries of downloads (``cdn``, ``cdn_resume``)."""

    hits: int = 0
    misses: int = 0
    retries: RetryCounts = field(default_factory=RetryCounts)


@dataclass(frozen=True)
class _Source:
    """Where one download's bytes come from (the CDN, all passes watched by one guard), and
    where its progress is announced to the loads that follow it."""

    api: ResourceApiClient
    folder: str
    name: str
    guard: TransferGuard
    progress: Progress

    def chunks(self, offset: int) -> AsyncIterator[bytes]:
        return self.guard.watch(self.api.iter_big_part(self.folder, self.name, offset=offset))


class Progress:
    """How far one download's partial file is on disk, for the loads that follow it.

    ``written`` bytes of generation ``generation`` are on disk (announced by the download after
    each batch it writes, so its followers wake once per batch, not per TCP segment); a drop of
    the partial file (416, content that did not match) starts a new generation. ``changed`` is
    set at every announcement and at the end of the download (then replaced by a fresh one).
    """

    def __init__(self) -> None:
        self.written = 0
        self.generation = 0
        self.suspect = False  # a load found bytes in the partial file that do not authenticate
        self._changed = asyncio.Event()

    def announce(self, written: int) -> None:
        self.written = written
        self._wake()

    def restart(self) -> None:
        self.written = 0
        self.generation += 1
        self.suspect = False
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def changed(self) -> asyncio.Future[bool]:
        """Done at the next announcement (taken now: nothing between is missed)."""
        return asyncio.ensure_future(self._changed.wait())


@dataclass
class _Download:
    """One download in flight (or one check of the cache): its task, how far it is, and how
    many callers wait for it or follow it."""

    task: asyncio.Task[Path]
    progress: Progress
    size: int
    what: str
    followers: int = 0


async def _next_change(download: _Download, deadline: float) -> None:
    """Until the download announces progress or ends; ``TransferTooSlow`` if neither happens
    within ``deadline`` seconds (the download's own guard should have ended it by then)."""
    changed = download.progress.changed()
    try:
        done, _ = await asyncio.wait(
            (changed, download.task), timeout=deadline, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        changed.cancel()
    if not done:
        raise TransferTooSlow(
            f"the CDN download of the {download.what} made no progress within {deadline:.0f} s "
            f"(LOADER_UPSTREAM_DEADLINE)"
        )


class GrowingFile(io.FileIO):
    """The partial file of a download, read by a load while the download writes it.

    ``wait_for(end)`` returns once bytes up to ``end`` are on disk, or, for a range that
    reaches the end of the part, once the download is over (the part checked and in the
    cache); it raises the download's error if the download failed for good. Should the
    download drop its partial file and fetch the part afresh (a 416, content that did not
    match), the file is reopened on the new one once that holds the bytes asked for: the bytes
    read so far came from the old one, and each chunk is still authenticated at its position,
    so a mix that is not the resource is an error, never data. Each wait has the transfer's
    deadline. Closing it tells ``BigPartDownloads`` that this load no longer follows (the last
    to go stops the download, as with ``fetch``).
    """

    def __init__(
        self, path: Path, download: _Download, deadline: float, release: Callable[[], None]
    ) -> None:
        super().__init__(os.open(path, os.O_RDONLY | os.O_CLOEXEC), "rb", closefd=True)
        self._path = path
        self._download = download
        self._generation = download.progress.generation
        self._deadline = deadline
        self._release: Callable[[], None] | None = release

    def _available(self, end: int) -> bool:
        download = self._download
        if end < download.size and download.progress.written >= end:
            return True
        # The end of the part only once the download is over: the load ends with the part in
        # the cache (verified), or with the download's error instead of its last chunk.
        if download.task.done():
            if download.task.cancelled():
                raise UpstreamError(f"the download of the {download.what} was stopped")
            download.task.result()  # raises the download's error
            return True  # complete: the whole part is on disk
        return False

    async def wait_for(self, end: int) -> None:
        """Until bytes ``[0, end)`` of the part (or all of it) are on disk; see the class."""
        while True:
            if self._available(end) and self._on_current_file():
                return
            await _next_change(self._download, self._deadline)

    def _on_current_file(self) -> bool:
        """Whether this reads the download's current file, reopening it if it was replaced;
        False if the new one is not there yet (dropped again, or just being renamed)."""
        progress, task = self._download.progress, self._download.task
        if progress.generation == self._generation:
            return True
        path = task.result() if task.done() else self._path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            os.dup2(fd, self.fileno())
        finally:
            os.close(fd)
        self._generation = progress.generation
        return True

    def close(self) -> None:
        super().close()
        release, self._release = self._release, None
        if release is not None:
            release()


class BigPartDownloads:
    """Big parts fetched into ``cache`` through ``api``; see the module docstring."""

    def __init__(self, api: ResourceApiClient, cache: BigPartCache) -> None:
        self._api = api
        self._cache = cache
        self._inflight: dict[Path, _Download] = {}
        self.stats = DownloadStats()

    async def fetch(self, folder: str, name: str, size: int, sha256: bytes, *, what: str) -> Path:
        """The path of the intact part, downloading (or resuming) it if needed; one download
        per part however many callers ask at once. ``what`` names it in messages. The part is
        not held: the cache may evict it once this returns (``open`` holds it)."""
        path = self._cache.path(folder, name)
        download = await self._join(path, folder, name, size, sha256, what)
        try:
            # A caller that goes away (client disconnected) does not cancel the others'
            # download; the last one to go does.
            return await asyncio.shield(download.task)
        finally:
            self._leave(path, download)

    async def open(
        self, folder: str, name: str, size: int, sha256: bytes, *, what: str, ahead: int
    ) -> io.BufferedReader:
        """The part open for reading, from the cache if it is intact there, else while it
        downloads: then the file is a ``GrowingFile`` (its ``raw``) holding at least
        ``ahead`` bytes (or the whole part), and the load follows the download until it closes
        the file. One download per part however many callers ask at once."""
        path = self._cache.path(folder, name)
        for last_try in (False, True):
            download = await self._join(path, folder, name, size, sha256, what)
            try:
                growing = await self._follow(path, download, ahead)
            except BaseException:
                self._leave(path, download)
                raise
            if growing is not None:
                return io.BufferedReader(growing)
            self._leave(path, download)
            try:
                # Held open from here: a concurrent drop of the file cannot pull it away, and
                # the cache does not evict it until the load closes it.
                return self._cache.open(path)
            except FileNotFoundError:  # dropped between the check and now: again
                if last_try:
                    raise UpstreamError(f"the cached {what} keeps disappearing") from None
        raise AssertionError("unreachable")

    async def _follow(self, path: Path, download: _Download, ahead: int) -> GrowingFile | None:
        """A ``GrowingFile`` once the download has written ``ahead`` bytes; None if the task
        ended first with the part in the cache (its error if it failed). A part no longer
        than ``ahead`` is not followed: it is verified whole first, as it used to be."""
        progress, task = download.progress, download.task
        # Past the transfer's own deadline (its guard's verdict comes first, naming the CDN).
        deadline = self._api.limits.deadline + self._api.limits.window
        while True:
            if task.done():
                await asyncio.shield(task)  # its result, or its error
                return None
            if download.size > ahead and progress.written >= ahead:
                unhold = self._cache.hold(path)  # not evicted while this load reads it

                def release(unhold: Callable[[], None] = unhold) -> None:
                    unhold()
                    self._leave(path, download)

                try:
                    return GrowingFile(self._cache.partial_path(path), download, deadline, release)
                except FileNotFoundError:
                    unhold()  # dropped right now: the progress says what comes next
            await _next_change(download, deadline)

    async def _join(
        self, path: Path, folder: str, name: str, size: int, sha256: bytes, what: str
    ) -> _Download:
        """The download of ``path`` in flight, or a new one; counted as one more follower."""
        download = self._inflight.get(path)
        if download is not None and (download.task.cancelling() or download.progress.suspect):
            # Abandoned by its last caller and still winding down, or holding bytes a load
            # found bad: let it end (its own deadline bounds it; its last write lands, or its
            # check finds the bad bytes) and start afresh, rather than follow bytes that are
            # ending or known bad. A part it did verify after all is then a cache hit.
            await asyncio.wait((download.task,))  # (waiting does not cancel it again)
            download = self._inflight.get(path)
        if download is None:
            progress = Progress()
            source = _Source(self._api, folder, name, self._api.guard(what), progress)
            task = asyncio.create_task(self._ensure(path, size, sha256, source))
            download = _Download(task, progress, size, what)
            self._inflight[path] = download
            task.add_done_callback(lambda done: self._finished(path, done))
        download.followers += 1
        return download

    def forget(self, path: Path) -> None:
        """Bytes of the part at ``path`` did not authenticate: drop it from the cache, and
        drop the partial file of its download in flight should that download be stopped
        (not resumed: what it holds is bad). Carried on, it ends with the SHA-256 check."""
        self._cache.forget(path)
        download = self._inflight.get(path)
        if download is not None:
            download.progress.suspect = True

    def _leave(self, path: Path, download: _Download) -> None:
        """One caller less waits for or follows ``download``; the last one stops it, unless
        all its bytes are on disk and none was found bad (the check and the move into place
        are left: they finish)."""
        download.followers -= 1
        progress = download.progress
        finishing = progress.written >= download.size and not progress.suspect
        if not download.followers and not download.task.done() and not finishing:
            logger.info("nobody waits for big part {} any more: download stopped", path.name)
            download.task.cancel()

    def _finished(self, path: Path, task: asyncio.Task[Path]) -> None:
        download = self._inflight.get(path)
        if download is not None and download.task is task:
            del self._inflight[path]
        if not task.cancelled():
            task.exception()  # retrieved here, so a download nobody waits for logs no warning

    async def close(self) -> None:
        """Cancel downloads in flight (partial files stay, to be resumed next time); the
        cache writes its index."""
        tasks = [download.task for download in self._inflight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._cache.close()

    async def _ensure(self, path: Path, size: int, sha256: bytes, source: _Source) -> Path:
        if await self._cache.is_intact(path, size, sha256):
            self.stats.hits += 1
            return path
        self.stats.misses += 1
        partial = self._cache.partial(path)
        try:
            return await self._download_verified(partial, size, sha256, source)
        except asyncio.CancelledError:
            if source.progress.suspect:  # a load found bad bytes in it: not worth resuming
                partial.drop()
            raise  # shutdown or nobody waits: the partial file stays, to be resumed
        except BaseException:
            partial.drop()  # failed for good: nothing may pile up on the disk
            raise
        finally:
            self._cache.done_writing(path)

    async def _download_verified(
        self, partial: Partial, size: int, sha256: bytes, source: _Source
    ) -> Path:
        self._cache.make_room(partial, size)  # evicts what the bound asks; 507 if the disk is full
        source.progress.announce(partial.size)  # what an earlier run left is followed too
        for fresh_start in (False, True):
            if fresh_start:
                logger.warning("{} from the CDN did not match; refetching", partial.what)
                partial.drop()
                source.progress.restart()
            if await self._download(partial, size, source) and (
                await asyncio.to_thread(partial.sha256) == sha256
            ):
                return self._cache.commit_partial(partial)
        partial.drop()
        raise UpstreamError(
            f"the CDN served {partial.what} with content that does not match its record "
            f"(length or SHA-256), twice"
        )

    async def _download(self, partial: Partial, size: int, source: _Source) -> bool:
        """Fill ``partial`` to ``size`` bytes, resuming after breaks; False if the CDN refused
        to resume (the partial copy is then dropped)."""
        while (have := partial.size) < size:
            try:
                # The one retry loop. Only passes that bring nothing count against the policy:
                # a long download over a flaky link keeps going as long as it makes progress.
                await self._api.retrying_cdn(
                    lambda: self._one_pass(partial, size, source), self._count_retry
                )
            except RangeNotSatisfiable:
                partial.drop()
                source.progress.restart()
                return False
        return have == size

    def _count_retry(self, attempt: int, delay: float, exc: BaseException) -> None:
        operation = "cdn_resume" if isinstance(exc, BodyInterrupted) else "cdn"
        self.stats.retries.record(operation, exc)
        logger.warning("CDN attempt {} failed: {}; retrying in {:.1f} s", attempt, exc, delay)

    async def _one_pass(self, partial: Partial, size: int, source: _Source) -> None:
        """Append what one CDN answer brings; raise (to be retried) only if it brought nothing.
        The guard's verdict (``TransferTooSlow``) is final: it is no transient fault."""
        have = partial.size
        try:
            await self._append(partial, size, source)
        except TRANSIENT_ERRORS:
            if partial.size == have:
                raise
            return
        if partial.size == have:
            raise BodyInterrupted(f"the CDN sent no data for {partial.what} at offset {have}")

    async def _append(self, partial: Partial, size: int, source: _Source) -> None:
        """Append what one CDN answer brings from where ``partial`` ends; never past ``size``.
        Written (and hashed, in a worker thread) while the next chunks arrive (``_Appender``);
        each write is announced to the loads that follow the download."""
        received = partial.size
        appender = _Appender(partial, source.progress)
        stream = source.chunks(received)
        try:
            async for chunk in stream:
                if len(chunk) > size - received:
                    chunk = chunk[: size - received]
                received += len(chunk)
                await appender.add(chunk, received)
                if received >= size:
                    break
        finally:
            # Keep what arrived before a break: the next pass resumes after it.
            await appender.close()
            await _aclose(stream)


class _Appender:
    """A download's chunks appended to its partial file, one write at a time in a worker
    thread, while the next ones arrive; each write announced as soon as it is on disk.

    Chunks are gathered into writes of ``WRITE_BATCH`` bytes (the loads that follow wake once
    per write, not per TCP segment), but none waits longer than ``FLUSH_AFTER``: a CDN that
    pauses never leaves bytes it sent unseen by the loads that follow (they would wait for the
    pause to end, or time out). ``add`` waits while a full batch waits for the write before
    it, so memory stays bounded (two batches)."""

    def __init__(self, partial: Partial, progress: Progress) -> None:
        self._partial = partial
        self._progress = progress
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._received = 0  # the part's length once everything pending is written
        self._since = 0.0  # when the oldest pending chunk arrived
        self._closing = False
        self._writer: asyncio.Task[None] | None = None  # running, or failed (unobserved)
        self._timer: asyncio.TimerHandle | None = None

    async def add(self, chunk: bytes, received: int) -> None:
        """Queue ``chunk``, after which the part is ``received`` bytes long."""
        if not self._pending:
            self._since = asyncio.get_running_loop().time()
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        self._received = received
        if self._writer is not None and (self._writer.done() or self._pending_size >= WRITE_BATCH):
            await self._wait()  # its error, if it failed; or room, if a full batch waits
        self._kick()

    def _due(self) -> bool:
        if self._closing or self._pending_size >= WRITE_BATCH:
            return True
        return asyncio.get_running_loop().time() - self._since >= FLUSH_AFTER

    def _kick(self) -> None:
        """Start a write if one is due and none runs; else make sure one will be."""
        if self._writer is not None or not self._pending:
            return  # a running writer looks again when its write ends
        if self._due():
            self._writer = asyncio.create_task(self._write())
        elif self._timer is None:
            delay = FLUSH_AFTER - (asyncio.get_running_loop().time() - self._since)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    async def _write(self) -> None:
        while self._pending and self._due():
            # Taken out first: cancelled while its thread writes, it is not written twice.
            batch, end = self._pending, self._received
            self._pending, self._pending_size = [], 0
            self._since = asyncio.get_running_loop().time()
            await self._partial.write(batch)
            self._progress.announce(end)
        self._writer = None  # done well: nothing to observe
        self._kick()  # what is pending and not due yet gets its timer

    async def _wait(self) -> None:
        writer = self._writer
        if writer is not None:
            await _written(writer)
            if self._writer is writer:  # (a writer that ended well has cleared it already)
                self._writer = None

    async def close(self) -> None:
        """Until everything queued is on disk and announced (or a write's error)."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._wait()
        if self._pending:
            self._writer = asyncio.create_task(self._write())
            await self._wait()


async def _written(writing: asyncio.Task[None]) -> None:
    """Until ``writing`` (a ``Partial.write``) is done, however often cancelled meanwhile:
    nothing else may be appended to the file before it ends. Then its error, if it failed,
    or the cancellation, if there was one."""
    cancelled = False
    while not writing.done():
        try:
            await asyncio.wait((writing,))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    writing.result()


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
