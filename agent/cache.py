"""BigPartCache: big parts (ciphertext only) kept on disk under ``MODEL_CACHE_DIR``.

Layout: ``<root>/<folder>/<name>`` for a complete, verified part; ``.<name>.part`` while it
downloads (kept across restarts, so a download resumes where it stopped); ``.upload-*.tmp``
while an upload encrypts into it. Files appear under their final name only by rename.

A part is intact when its length and SHA-256 match what the small part records. Hashing a large
file on every load would halve the load speed, so a verified file's identity (inode, size,
mtime, ctime) is remembered in memory: any write to the file changes its ctime, and the file is
hashed again. What this cannot see (a bit flip behind the file system's back) the stream format
still catches, chunk by chunk, and ``forget`` drops the file.

Concurrent requests for one part share one download (``fetch`` is single-flight per part).
A download stops when the last caller waiting for it has gone (its partial file stays, to be
resumed); one that fails for good drops its partial file. Before a download starts, the free
space of the cache's file system must hold what is still missing plus ``FREE_SPACE_RESERVE``,
else ``CacheError`` (507) says how much is free and how much is needed.

``stats`` counts hits (an intact part on disk), misses (a download was needed) and the resumed
downloads' retries, for ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from agent.defaults import NAME_MAX_LENGTH
from agent.errors import (
    CacheError,
    InvalidName,
    RangeNotSatisfiable,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from agent.retry import RetryCounts, RetryPolicy, Sleep, retry_call

SAFE_COMPONENT = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{NAME_MAX_LENGTH - 1}}}")
HASH_READ_SIZE = 1024 * 1024
WRITE_BATCH = 1024 * 1024
FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free for the system (at most 5% of the disk)

Downloader = Callable[[int], AsyncIterator[bytes]]
"""Yields a part's bytes from the given offset on (the CDN, through the API client)."""


@contextlib.contextmanager
def writing_to(directory: Path) -> Iterator[None]:
    """Turn the OS errors of writing cache files into ``CacheError`` (they are not upstream's
    fault, nor the caller's, and must not surface as an unexplained internal error)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CacheError(f"cannot write to the model cache in {directory}: {reason}") from exc


@dataclass
class CacheStats:
    """What ``/metrics`` reads of the cache: one hit or miss per check of a part (concurrent
    loads of one part share one), and the retries of downloads that broke off."""

    hits: int = 0
    misses: int = 0
    retries: RetryCounts = field(default_factory=RetryCounts)


def check_component(value: str, kind: str) -> str:
    """Refuse anything that is not one plain path component (no traversal, no hidden files)."""
    if not SAFE_COMPONENT.fullmatch(value) or ".." in value:
        raise InvalidName(f"the {kind} is not a safe name")
    return value


@dataclass(frozen=True)
class _Stamp:
    """What identifies one version of a file without reading it."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> _Stamp:
        st = path.stat()
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Spool:
    """A hidden temporary file that ciphertext is written to, hashed on the way (worker thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        with writing_to(path.parent):
            self._file = path.open("xb")

    def write(self, data: bytes) -> None:
        with writing_to(self.path.parent):
            self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> bytes:
        return self._hash.digest()

    def finish(self) -> None:
        with writing_to(self.path.parent):
            self._file.close()  # no fsync needed: see BigPartCache._ensure

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self._file.close()
        self.path.unlink(missing_ok=True)


class BigPartCache:
    """Verified big parts on disk, fetched once however many ask; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        policy: RetryPolicy | None = None,
        resumable: tuple[type[BaseException], ...] = (UpstreamUnavailable, UpstreamTimeout),
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``resumable``: errors of a download that broke off (the rest is asked for with a
        range); ``policy``: how long to keep trying when resuming brings nothing."""
        self.root = root
        self._policy = policy or RetryPolicy()
        self._resumable = resumable
        self._sleep = sleep
        self._verified: dict[Path, _Stamp] = {}
        self._inflight: dict[Path, asyncio.Task[Path]] = {}
        self._waiting: dict[Path, int] = {}  # callers awaiting each download in flight
        self.stats = CacheStats()
        self._sweep_abandoned_uploads()

    def path(self, folder: str, name: str) -> Path:
        return self.root / check_component(folder, "folder") / check_component(name, "name")

    def _directory(self, folder: str) -> Path:
        """The folder's directory, created on first use (the root too, both private)."""
        directory = self.root / check_component(folder, "folder")
        with writing_to(self.root):
            for level in (self.root, directory):
                level.mkdir(mode=0o700, parents=True, exist_ok=True)
        return directory

    # -- reading ---------------------------------------------------------------------------

    async def fetch(
        self, folder: str, name: str, size: int, sha256: bytes, download: Downloader
    ) -> Path:
        """The path of the intact part, downloading (or resuming) it if needed; one download
        per part however many callers ask at once."""
        path = self.path(folder, name)
        task = self._inflight.get(path)
        if task is not None and task.cancelling():
            # Abandoned by its last caller and still winding down: let it finish (its last
            # write lands) and start afresh, rather than share a download that is ending.
            await asyncio.wait((task,))  # (waiting does not cancel it again)
            task = self._inflight.get(path)
        if task is None:
            task = asyncio.create_task(self._ensure(path, size, sha256, download))
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

    async def _ensure(self, path: Path, size: int, sha256: bytes, download: Downloader) -> Path:
        if await self._is_intact(path, size, sha256):
            self.stats.hits += 1
            return path
        self.stats.misses += 1
        self._directory(path.parent.name)
        partial = _Partial(path.with_name(f".{path.name}.part"))
        try:
            return await self._download_verified(path, partial, size, sha256, download)
        except asyncio.CancelledError:
            raise  # shutdown or nobody waits: the partial file stays, to be resumed
        except BaseException:
            partial.drop()  # failed for good: nothing may pile up on the disk
            raise

    async def _download_verified(
        self, path: Path, partial: _Partial, size: int, sha256: bytes, download: Downloader
    ) -> Path:
        self._check_free_space(path, size - partial.size)
        for fresh_start in (False, True):
            if fresh_start:
                logger.warning("big part {} from the CDN did not match; refetching", path.name)
                partial.drop()
            if await self._download(partial, size, download) and (
                await asyncio.to_thread(partial.sha256) == sha256
            ):
                # No fsync: after a crash nothing is trusted unhashed (the stamps live in
                # memory), so a file the crash left incomplete is caught and fetched again.
                with writing_to(path.parent):
                    os.replace(partial.path, path)
                self._verified[path] = _Stamp.of(path)
                return path
        partial.drop()
        raise UpstreamError(
            f"the CDN served big part {path.parent.name}/{path.name} with content that does not "
            f"match its record (length or SHA-256), twice"
        )

    def _check_free_space(self, path: Path, missing: int) -> None:
        """Refuse early (507, with the numbers) a download the disk cannot hold."""
        try:
            fs = os.statvfs(path.parent)
        except OSError as exc:
            raise CacheError(f"cannot check free space in {self.root}: {exc.strerror}") from exc
        free = fs.f_bavail * fs.f_frsize
        reserve = min(FREE_SPACE_RESERVE, fs.f_blocks * fs.f_frsize // 20)
        if missing + reserve > free:
            raise CacheError(
                f"the model cache in {self.root} has {free} bytes free; {path.parent.name}/"
                f"{path.name} needs {missing} more (and {reserve} stay free)"
            )

    async def _is_intact(self, path: Path, size: int, sha256: bytes) -> bool:
        try:
            stamp = _Stamp.of(path)
        except FileNotFoundError:
            return False
        if stamp.size == size and self._verified.get(path) == stamp:
            return True
        if stamp.size == size and await self._hash_matches(path, sha256):
            self._verified[path] = stamp
            return True
        logger.warning("cached big part {} is corrupt; dropping it", path.name)
        self.forget(path)
        return False

    async def _hash_matches(self, path: Path, sha256: bytes) -> bool:
        return await asyncio.to_thread(_sha256_of, path) == sha256

    def forget(self, path: Path) -> None:
        """Drop a cached part (found corrupt); the next fetch downloads it again."""
        self._verified.pop(path, None)
        path.unlink(missing_ok=True)

    async def _download(self, partial: _Partial, size: int, download: Downloader) -> bool:
        """Fill ``partial`` to ``size`` bytes, resuming after breaks; False if the CDN refused
        to resume (the partial copy is then dropped)."""
        while (have := partial.size) < size:
            try:
                # Only passes that bring nothing count against the policy: a long download over
                # a flaky link keeps going as long as it makes progress.
                await retry_call(
                    lambda: self._one_pass(partial, size, download),
                    self._policy,
                    retryable=self._resumable,
                    on_retry=self._count_resumption,
                    sleep=self._sleep,
                )
            except RangeNotSatisfiable:
                partial.drop()
                return False
        return have == size

    def _count_resumption(self, attempt: int, delay: float, exc: BaseException) -> None:
        self.stats.retries.record("cdn_resume", exc)

    async def _one_pass(self, partial: _Partial, size: int, download: Downloader) -> None:
        """Append what one CDN answer brings; raise only if it brought nothing."""
        have = partial.size
        try:
            await self._append(partial, size, download)
        except self._resumable:
            if partial.size == have:
                raise
            return
        if partial.size == have:
            raise UpstreamUnavailable(f"the CDN sent no data for {partial.what} at offset {have}")

    async def _append(self, partial: _Partial, size: int, download: Downloader) -> None:
        """Append what one CDN answer brings from where ``partial`` ends; never past ``size``."""
        received = partial.size
        pending: list[bytes] = []
        pending_size = 0
        stream = download(received)
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
                    await _write_through_cancel(partial, batch)
                if received >= size:
                    break
        finally:
            if pending:  # keep what arrived before a break: the next pass resumes after it
                await _write_through_cancel(partial, pending)
            await _aclose(stream)

    # -- writing (uploads) -----------------------------------------------------------------

    @contextlib.contextmanager
    def spool(self, folder: str) -> Iterator[Spool]:
        """A temporary file in ``folder`` for an upload's big part; dropped unless committed."""
        spool = Spool(self._directory(folder) / f".upload-{secrets.token_hex(8)}.tmp")
        try:
            yield spool
        finally:
            if spool.path.exists():
                spool.discard()

    def commit(self, spool: Spool, folder: str, name: str) -> Path:
        """Move a finished spool into place under ``name``; it counts as verified."""
        path = self.path(folder, name)
        with writing_to(path.parent):
            os.replace(spool.path, path)
        self._verified[path] = _Stamp.of(path)
        return path

    # -- housekeeping ----------------------------------------------------------------------

    def _sweep_abandoned_uploads(self) -> None:
        """Spools of uploads a crash interrupted are of no use to anyone."""
        with contextlib.suppress(OSError):
            for leftover in self.root.glob("*/.upload-*.tmp"):
                leftover.unlink(missing_ok=True)

    async def close(self) -> None:
        """Cancel downloads in flight (partial files stay, to be resumed next time)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Partial:
    """A big part being downloaded, hashed as it is written (in the worker thread), so the
    check at the end need not read it again. A file left by an earlier run is hashed once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.what = f"big part {path.parent.name}/{path.name[1 : -len('.part')]}"
        self._hasher = hashlib.sha256()
        self._hashed = 0

    @property
    def size(self) -> int:
        return _size_of(self.path)

    def append(self, chunks: list[bytes]) -> None:
        self._catch_up()
        try:
            with writing_to(self.path.parent), self.path.open("ab") as file:
                for chunk in chunks:
                    file.write(chunk)
                    self._hasher.update(chunk)
                    self._hashed += len(chunk)
        except CacheError:
            self.drop()  # a disk that is full is better off without a partial copy
            raise

    def sha256(self) -> bytes:
        self._catch_up()
        return self._hasher.digest()

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)
        self._hasher, self._hashed = hashlib.sha256(), 0

    def _catch_up(self) -> None:
        if self._hashed != self.size:  # bytes this object did not write: hash the file anew
            self._hasher, self._hashed = _hash_file(self.path)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def _write_through_cancel(partial: _Partial, batch: list[bytes]) -> None:
    """Append ``batch`` in a worker thread; cancelled meanwhile, wait for the thread to finish
    the write before giving up, so no write to the partial file outlives its download."""
    write = asyncio.ensure_future(asyncio.to_thread(partial.append, batch))
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        while not write.done():  # however often cancelled: the thread's write is short
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((write,))
        raise


async def _aclose(stream: AsyncIterator[bytes]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def _sha256_of(path: Path) -> bytes:
    return _hash_file(path)[0].digest()


def _hash_file(path: Path) -> tuple[hashlib._Hash, int]:
    """A SHA-256 hasher fed with the file, and how many bytes that was (0 if it is gone)."""
    digest, size = hashlib.sha256(), 0
    with contextlib.suppress(FileNotFoundError), path.open("rb") as file:
        while block := file.read(HASH_READ_SIZE):
            digest.update(block)
            size += len(block)
    return digest, size
