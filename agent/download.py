"""BigPartDownloads: a big part from the CDN into the cache, once however many callers ask.

``fetch`` is single-flight per part: concurrent loads of one part share one check of the cache
and at most one download. A caller that goes away (client disconnected) does not stop the
others' download; the last one to go does (its partial file stays, to be resumed). A download
being stopped is not shared: a caller that comes meanwhile waits for it to end and starts
afresh.

A download is resumed with a range from where its partial file ends, in one retry loop
(``agent.retry``, by the client's policy). A pass that brings nothing, whether the CDN could
not be reached or answered with an error (counted as ``cdn`` in ``stats.retries``) or its body
broke off (``cdn_resume``), counts against the policy; a pass that brings bytes starts it
afresh, so a long download over a flaky link goes on as long as it makes progress. One
``TransferGuard`` covers the whole download, across resumptions: a CDN that drips bytes or
never ends is cut off (504), and no retry undoes that. A 416 (the partial copy and the CDN
disagree) drops the partial file and starts over once, and so does content whose length or
SHA-256 differs from the small part's record; the second time it is a 502. Before it starts,
the cache's file system must have room for what is missing (``BigPartCache.check_free_space``).
A download that fails for good drops its partial file.

``stats`` counts hits (an intact part on disk), misses (a download was needed) and the
download's retries, for ``/metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from agent.api_client import ResourceApiClient
from agent.cache import BigPartCache, Partial
from agent.errors import BodyInterrupted, RangeNotSatisfiable, UpstreamError
from agent.retry import TRANSIENT_ERRORS, RetryCounts
from agent.transport import TransferGuard

WRITE_BATCH = 1024 * 1024


@dataclass
class DownloadStats:
    """What ``/metrics`` reads: one cache hit or miss per check of a part (concurrent loads of
    one part share one), and the retries of downloads (``cdn``, ``cdn_resume``)."""

    hits: int = 0
    misses: int = 0
    retries: RetryCounts = field(default_factory=RetryCounts)


@dataclass(frozen=True)
class _Source:
    """Where one download's bytes come from: the CDN, all passes watched by one guard."""

    api: ResourceApiClient
    folder: str
    name: str
    guard: TransferGuard

    def chunks(self, offset: int) -> AsyncIterator[bytes]:
        return self.guard.watch(self.api.iter_big_part(self.folder, self.name, offset=offset))


class BigPartDownloads:
    """Big parts fetched into ``cache`` through ``api``; see the module docstring."""

    def __init__(self, api: ResourceApiClient, cache: BigPartCache) -> None:
        self._api = api
        self._cache = cache
        self._inflight: dict[Path, asyncio.Task[Path]] = {}
        self._waiting: dict[Path, int] = {}  # callers awaiting each download in flight
        self.stats = DownloadStats()

    async def fetch(self, folder: str, name: str, size: int, sha256: bytes, *, what: str) -> Path:
        """The path of the intact part, downloading (or resuming) it if needed; one download
        per part however many callers ask at once. ``what`` names it in messages."""
        path = self._cache.path(folder, name)
        task = self._inflight.get(path)
        if task is not None and task.cancelling():
            # Abandoned by its last caller and still winding down: let it finish (its last
            # write lands) and start afresh, rather than share a download that is ending.
            await asyncio.wait((task,))  # (waiting does not cancel it again)
            task = self._inflight.get(path)
        if task is None:
            source = _Source(self._api, folder, name, self._api.guard(what))
            task = asyncio.create_task(self._ensure(path, size, sha256, source))
            self._inflight[path] = task
            task.add_done_callback(lambda done: self._finished(path, done))
        self._waiting[path] = self._waiting.get(path, 0) + 1
        try:
            # A caller that goes away (client disconnected) does not cancel the others'
            # download; the last one to go does.
            return await asyncio.shield(task)
        finally:
            self._waiting[path] -= 1
            if not self._waiting[path]:
                del self._waiting[path]
                if not task.done():
                    logger.info("nobody waits for big part {} any more: download stopped", name)
                    task.cancel()

    def _finished(self, path: Path, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(path) is task:
            del self._inflight[path]
        if not task.cancelled():
            task.exception()  # retrieved here, so a download nobody waits for logs no warning

    async def close(self) -> None:
        """Cancel downloads in flight (partial files stay, to be resumed next time)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _ensure(self, path: Path, size: int, sha256: bytes, source: _Source) -> Path:
        if await self._cache.is_intact(path, size, sha256):
            self.stats.hits += 1
            return path
        self.stats.misses += 1
        partial = self._cache.partial(path)
        try:
            return await self._download_verified(partial, size, sha256, source)
        except asyncio.CancelledError:
            raise  # shutdown or nobody waits: the partial file stays, to be resumed
        except BaseException:
            partial.drop()  # failed for good: nothing may pile up on the disk
            raise

    async def _download_verified(
        self, partial: Partial, size: int, sha256: bytes, source: _Source
    ) -> Path:
        self._cache.check_free_space(partial.target, size - partial.size)
        for fresh_start in (False, True):
            if fresh_start:
                logger.warning("{} from the CDN did not match; refetching", partial.what)
                partial.drop()
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
        """Append what one CDN answer brings from where ``partial`` ends; never past ``size``."""
        received = partial.size
        pending: list[bytes] = []
        pending_size = 0
        stream = source.chunks(received)
        try:
            async for chunk in stream:
                if len(chunk) > size - received:
                    chunk = chunk[: size - received]
                pending.append(chunk)
                pending_size += len(chunk)
                received += len(chunk)
                if pending_size >= WRITE_BATCH:
                    # Taken out first: cancelled while its thread writes, it is not written twice.
                    batch, pending, pending_size = pending, [], 0
                    await partial.write(batch)
                if received >= size:
                    break
        finally:
            if pending:  # keep what arrived before a break: the next pass resumes after it
                await partial.write(pending)
            await _aclose(stream)


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
