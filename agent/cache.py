"""BigPartCache: big parts (ciphertext only) kept on disk under ``MODEL_CACHE_DIR``.

Layout: ``<root>/<folder>/<name>`` for a complete, verified part; ``.<name>.part`` while it
downloads (kept across restarts, so a download resumes where it stopped); ``.upload-*.tmp``
while an upload encrypts into it. Files appear under their final name only by rename.

A part is intact when its length and SHA-256 match what the small part records. Hashing a large
file on every load would halve the load speed, so a verified file's identity (inode, size,
mtime, ctime) is remembered in memory: any write to the file changes its ctime, and the file is
hashed again. What this cannot see (a bit flip behind the file system's back) the stream format
still catches, chunk by chunk, and ``forget`` drops the file.

While a part downloads, its partial file is read by the loads that follow the download
(``partial_path``; ``agent.download``): they hand out only what authenticates, and the file is
moved to its final name only once its SHA-256 matches.

This module is the disk only: who downloads, resumes and retries is ``agent.download``, which
writes through a ``Partial`` and asks ``check_free_space`` first: the cache's file system must
hold what is still missing plus ``FREE_SPACE_RESERVE``, else ``CacheError`` (507) says how much
is free and how much is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from agent.defaults import NAME_MAX_LENGTH
from agent.errors import CacheError, InvalidName

SAFE_COMPONENT = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{NAME_MAX_LENGTH - 1}}}")
HASH_READ_SIZE = 1024 * 1024
FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free for the system (at most 5% of the disk)


@contextlib.contextmanager
def writing_to(directory: Path) -> Iterator[None]:
    """Turn the OS errors of writing cache files into ``CacheError`` (they are not upstream's
    fault, nor the caller's, and must not surface as an unexplained internal error)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CacheError(f"cannot write to the model cache in {directory}: {reason}") from exc


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
            self._file.close()  # no fsync needed: see BigPartCache.commit_partial

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self._file.close()
        self.path.unlink(missing_ok=True)


class BigPartCache:
    """Verified big parts on disk; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._verified: dict[Path, _Stamp] = {}
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

    # -- reading, and the files of downloads -----------------------------------------------

    async def is_intact(self, path: Path, size: int, sha256: bytes) -> bool:
        """Whether the part at ``path`` has the recorded length and SHA-256 (a file that has
        not changed since it was last verified is not hashed again); a corrupt one is dropped."""
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

    def partial_path(self, path: Path) -> Path:
        """Where the part at ``path`` is while it downloads (unverified: only a load following
        that download reads it, and hands out only what authenticates)."""
        return Partial.path_of(path)

    def partial(self, path: Path) -> Partial:
        """The partial file of the part at ``path`` while it downloads (its folder created)."""
        self._directory(path.parent.name)
        return Partial(path)

    def check_free_space(self, path: Path, missing: int) -> None:
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

    def commit_partial(self, partial: Partial) -> Path:
        """Move a complete partial file, checked against its record, into place."""
        # No fsync: after a crash nothing is trusted unhashed (the stamps live in memory), so
        # a file the crash left incomplete is caught and fetched again.
        return self._install(partial.path, partial.target)

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
        return self._install(spool.path, self.path(folder, name))

    def _install(self, source: Path, path: Path) -> Path:
        with writing_to(path.parent):
            os.replace(source, path)
        self._verified[path] = _Stamp.of(path)
        return path

    # -- housekeeping ----------------------------------------------------------------------

    def _sweep_abandoned_uploads(self) -> None:
        """Spools of uploads a crash interrupted are of no use to anyone."""
        with contextlib.suppress(OSError):
            for leftover in self.root.glob("*/.upload-*.tmp"):
                leftover.unlink(missing_ok=True)


class Partial:
    """A big part being downloaded into ``.<name>.part`` beside ``target``, hashed as it is
    written (in the worker thread), so the check at the end need not read it again. A file
    left by an earlier run is hashed once."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = self.path_of(target)
        self.what = f"big part {target.parent.name}/{target.name}"
        self._hasher = hashlib.sha256()
        self._hashed = 0

    @staticmethod
    def path_of(target: Path) -> Path:
        return target.with_name(f".{target.name}.part")

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

    async def write(self, batch: list[bytes]) -> None:
        """Append ``batch`` in a worker thread; cancelled meanwhile, wait for the thread to
        finish the write before giving up, so no write to the file outlives its download."""
        write = asyncio.ensure_future(asyncio.to_thread(self.append, batch))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            while not write.done():  # however often cancelled: the thread's write is short
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait((write,))
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
