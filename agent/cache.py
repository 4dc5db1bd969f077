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
writes through a ``Partial`` and asks ``make_room`` first: within the bound (below), and the
cache's file system must hold what is still missing plus ``FREE_SPACE_RESERVE``
(``check_free_space``), else ``CacheError`` (507) says how much is free and how much is needed.

The cache is bounded (``max_bytes``, setting ``LOADER_CACHE_MAX_BYTES``; by default a quarter of
its file system, ``default_max_bytes``). What it holds is counted from the files: complete parts,
partial files (a download in flight counts for its whole size, reserved when it starts), never
the spools of uploads (transient). Two things take space back:

- Eviction, least recently used first, of parts no load reads (``hold``) and no download writes
  (``make_room`` .. ``done_writing``), until the cache is within its bound: before a download
  starts, after a part is put in place, and when a load lets go of a part while the cache is
  over its bound. A part bigger than the whole bound is loaded all the same (the load must
  work) and is the first to go once nobody reads it: it is never kept. Parts in use are never
  evicted, so while loads read them the cache may stay over its bound (the free-space check,
  507, remains the hard limit).
- Orphans: ``record_use`` says which big part a resource (folder/name) uses now, at every load
  and upload. A part that no resource uses any more (its resource was re-uploaded, here or by
  another device) is removed at once, or when the last load reading it ends. Never from the CDN.

Which part each resource uses, when each part was last used (a counter, not the clock: devices
may boot with no RTC) and which parts are orphans survive restarts in ``.index.json`` in the
cache dir, written atomically but not synced (``agent.durable``; a lost or torn index is rebuilt)
in a worker thread when what the cache holds
changes (a part in or out, a resource's part, an orphan; changes during a write are written
together after it), and at close. A load of a part already cached changes only the order of
use: that is written with the next change (a power cut may lose it: harmless, the order only
picks victims). A cache that holds nothing has no index file (removed at once).
It is read with bounds; one that cannot be read is rebuilt from the files (their access or
modification time as the LRU order). The files on disk always decide what exists and how big
it is; the index only orders them and links them to resources.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from loguru import logger

from agent.defaults import NAME_MAX_LENGTH
from agent.durable import write_atomically
from agent.errors import CacheError, InvalidName
from agent.logs import quote

SAFE_COMPONENT = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{NAME_MAX_LENGTH - 1}}}")
HASH_READ_SIZE = 1024 * 1024
FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free for the system (at most 5% of the disk)
DEFAULT_SHARE = 4  # without LOADER_CACHE_MAX_BYTES: a quarter of the cache's file system
INDEX_NAME = ".index.json"  # hidden: never a folder's name (SAFE_COMPONENT)
INDEX_VERSION = 1
INDEX_MAX_BYTES = 8 * 1024 * 1024  # an index file larger than this is not read: rebuilt
INDEX_MAX_ENTRIES = 65536  # parts or resources an index may list; more: rebuilt
MAX_PARTS = 16384  # parts kept at most (past it, the least recently used go, as over the bound)
MAX_REFS = 16384  # resources remembered at most (those whose part is gone are forgotten first)
CLOCK_MAX = 1 << 62


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


@dataclass
class _Part:
    """One big part the cache holds: complete (``size`` bytes) or only its partial file."""

    used: int  # the index's clock at its last use: the larger, the more recent
    size: int = 0  # the complete file's length (0 while only the partial file exists)
    complete: bool = False
    orphan: bool = False  # no resource uses it any more: removed once nobody reads it


@dataclass(frozen=True)
class CacheUsage:
    """What ``/status`` and ``/metrics`` show of the cache."""

    used_bytes: int  # complete parts and partial files on disk
    max_bytes: int
    parts: int  # complete parts
    evictions: int  # parts evicted (least recently used) since the agent started
    orphans_removed: int  # parts removed since the agent started because nothing uses them


class BigPartCache:
    """Verified big parts on disk, within a bound; see the module docstring."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes or default_max_bytes(root)
        self.evictions = 0
        self.orphans_removed = 0
        self._verified: dict[Path, _Stamp] = {}
        self._parts: dict[Path, _Part] = {}  # changed only through _put, _set and _pop
        # Kept as the parts change, so that a load costs the same however many are cached.
        self._complete_bytes = 0
        self._complete_count = 0
        self._incomplete: set[Path] = set()  # parts with only a partial file (few)
        self._orphans: set[Path] = set()
        self._refs: dict[tuple[str, str], str] = {}  # (folder, name) -> big part's name
        self._clock = 0
        self._readers: collections.Counter[Path] = collections.Counter()
        self._writing: dict[Path, int] = {}  # downloads in flight: the part's whole size
        # The index on disk: ``_version`` counts the changes, ``_written`` is the one on disk
        # (a write of an older version that comes late is skipped: ``_store_index``).
        self._version = 0
        self._written = 0
        self._index_lock = threading.Lock()
        self._closed = False
        self._flushing: asyncio.Task[None] | None = None
        self._write_failed = False
        self._sweep_abandoned_uploads()
        self._load_index()
        self._remove_orphans()

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
            self._note_gone(path)  # removed behind the cache's back, if it was there
            return False
        if stamp.size == size and self._verified.get(path) == stamp:
            return True
        if stamp.size == size and await self._hash_matches(path, sha256):
            self._verified[path] = stamp
            self._note_complete(path, stamp.size)  # put there behind the cache's back
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
        self._note_gone(path)

    def _note_gone(self, path: Path) -> None:
        """The complete file at ``path`` is no more (a partial one may still be there)."""
        part = self._parts.get(path)
        if part is not None and part.complete:
            self._set(path, part, complete=False, size=0)
            if path not in self._writing and not Partial.path_of(path).exists():
                self._pop(path)
            self._changed()

    def open(self, path: Path) -> io.BufferedReader:
        """The complete part at ``path`` open for reading; not evicted until it is closed."""
        raw = _HeldFile(path)
        raw.release = self.hold(path)
        return io.BufferedReader(raw)

    def hold(self, path: Path) -> Callable[[], None]:
        """Count a load reading the part at ``path`` (complete or partial): it is neither
        evicted nor removed as an orphan until the returned release is called (once is
        enough; more calls do nothing)."""
        self._readers[path] += 1
        held = True

        def release() -> None:
            nonlocal held
            if not held:
                return
            held = False
            self._readers[path] -= 1
            if self._readers[path] <= 0:
                del self._readers[path]
                self._sweep()

        return release

    def partial_path(self, path: Path) -> Path:
        """Where the part at ``path`` is while it downloads (unverified: only a load following
        that download reads it, and hands out only what authenticates)."""
        return Partial.path_of(path)

    def partial(self, path: Path) -> Partial:
        """The partial file of the part at ``path`` while it downloads (its folder created)."""
        self._directory(path.parent.name)
        return Partial(path)

    def make_room(self, partial: Partial, size: int) -> None:
        """Before a download of ``size`` bytes into ``partial`` starts: count it as in flight
        (its whole size, until ``done_writing``), evict what the bound asks, then check that
        the disk holds what is missing (``check_free_space``)."""
        path = partial.target
        self._writing[path] = size
        if path not in self._parts:
            self._put(path, _Part(used=self._tick()))
        if size > self.max_bytes:
            logger.warning(
                "big part {} ({} bytes) is larger than the whole model cache ({} bytes, "
                "LOADER_CACHE_MAX_BYTES): it is loaded, and not kept",
                quote(f"{path.parent.name}/{path.name}"),
                size,
                self.max_bytes,
            )
        self._changed()
        self._evict()
        self.check_free_space(path, size - partial.size)

    def done_writing(self, path: Path) -> None:
        """The download of the part at ``path`` is over (complete, stopped or failed)."""
        self._writing.pop(path, None)
        part = self._parts.get(path)
        if part is not None and not part.complete and not Partial.path_of(path).exists():
            self._pop(path)
            self._changed()
        self._sweep()

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
        stamp = _Stamp.of(path)
        self._verified[path] = stamp
        self._note_complete(path, stamp.size)
        self._evict(keep=path)  # an upload still sends it to the CDN: not this time
        return path

    def _note_complete(self, path: Path, size: int) -> None:
        part = self._parts.get(path)
        if part is None:
            part = self._put(path, _Part(used=self._tick()))
        if not part.complete or part.size != size:
            self._set(path, part, complete=True, size=size)
            self._changed()

    def _put(self, path: Path, part: _Part) -> _Part:
        self._parts[path] = part
        self._count(path, part, 1)
        return part

    def _set(self, path: Path, part: _Part, **changes: Any) -> None:
        self._count(path, part, -1)
        for name, value in changes.items():
            setattr(part, name, value)
        self._count(path, part, 1)

    def _pop(self, path: Path) -> _Part:
        part = self._parts.pop(path)
        self._count(path, part, -1)
        return part

    def _count(self, path: Path, part: _Part, sign: int) -> None:
        if part.complete:
            self._complete_bytes += sign * part.size
            self._complete_count += sign
        elif sign > 0:
            self._incomplete.add(path)
        else:
            self._incomplete.discard(path)
            if not self._incomplete:  # a set keeps its size: iterating it would not be free
                self._incomplete = set()
        if part.orphan and sign > 0:
            self._orphans.add(path)
        elif part.orphan:
            self._orphans.discard(path)
            if not self._orphans:
                self._orphans = set()

    # -- use, orphans and the bound ----------------------------------------------------------

    def record_use(self, folder: str, name: str, big_name: str) -> None:
        """The resource ``folder/name`` uses the big part ``big_name`` now (a load opens it, or
        an upload put it in place): that part is the most recently used, and the part the
        resource used before, if no other resource uses it, is an orphan: removed now, or
        once the last load reading it ends."""
        path = self.path(folder, big_name)
        key = (folder, check_component(name, "name"))
        before = self._refs.pop(key, None)
        self._refs[key] = big_name  # last in the dict: the most recently recorded
        changed = before != big_name
        part = self._parts.get(path)
        if part is not None:
            part.used = self._tick()
            if part.orphan:
                changed = True
                self._set(path, part, orphan=False)
        if before is not None and before != big_name and not self._in_use_by_any(folder, before):
            stale_path = self.root / folder / before
            stale = self._parts.get(stale_path)
            if stale is not None:
                self._set(stale_path, stale, orphan=True)
        self._trim_refs()
        if changed:  # else only the order of use changed: written with the next change
            self._changed()
        self._sweep()

    def _in_use_by_any(self, folder: str, big_name: str) -> bool:
        return any(f == folder and b == big_name for (f, _), b in self._refs.items())

    def _trim_refs(self) -> None:
        """At most ``MAX_REFS`` resources: those whose part is gone go first, then the
        least recently recorded."""
        if len(self._refs) <= MAX_REFS:
            return
        for key, big_name in list(self._refs.items()):
            if len(self._refs) <= MAX_REFS:
                return
            if self.root / key[0] / big_name not in self._parts:
                del self._refs[key]
        while len(self._refs) > MAX_REFS:
            del self._refs[next(iter(self._refs))]

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """The bound (None: ``default_max_bytes``); the cache is brought within it now."""
        self.max_bytes = max_bytes or default_max_bytes(self.root)
        self._sweep()

    def usage(self) -> CacheUsage:
        return CacheUsage(
            used_bytes=self._used(reserved=False),
            max_bytes=self.max_bytes,
            parts=self._complete_count,
            evictions=self.evictions,
            orphans_removed=self.orphans_removed,
        )

    def _used(self, *, reserved: bool) -> int:
        partial = (
            self._bytes_of(path, self._parts[path], reserved=reserved) for path in self._incomplete
        )
        return self._complete_bytes + sum(partial)

    def _bytes_of(self, path: Path, part: _Part, *, reserved: bool) -> int:
        """A part's bytes on disk; a download in flight counts for its whole size if
        ``reserved`` (what it is about to write is spoken for)."""
        if part.complete:
            return part.size
        have = _size_of(Partial.path_of(path))
        return max(have, self._writing.get(path, 0)) if reserved else have

    def _in_use(self, path: Path) -> bool:
        return path in self._readers or path in self._writing

    def _sweep(self) -> None:
        self._remove_orphans()
        self._evict()

    def _remove_orphans(self) -> None:
        for path in [path for path in self._orphans if not self._in_use(path)]:
            self._remove(path, "no resource uses it any more")
            self.orphans_removed += 1

    def _evict(self, keep: Path | None = None) -> None:
        """Evict parts nobody uses, least recently used first (one larger than the whole
        bound before any other), until the cache is within its bound and ``MAX_PARTS``."""
        over = self._used(reserved=True) - self.max_bytes
        too_many = len(self._parts) - MAX_PARTS
        if over <= 0 and too_many <= 0:
            return
        sizes = {
            path: self._bytes_of(path, part, reserved=True) for path, part in self._parts.items()
        }
        candidates = sorted(
            (path for path in self._parts if path != keep and not self._in_use(path)),
            key=lambda path: (sizes[path] <= self.max_bytes, self._parts[path].used),
        )
        for path in candidates:
            if over <= 0 and too_many <= 0:
                return
            if not sizes[path] and not self._parts[path].complete:  # its partial file is gone
                self._pop(path)
                too_many -= 1
                continue
            self._remove(path, f"least recently used; the cache was {over} bytes over its bound")
            self.evictions += 1
            over -= sizes[path]
            too_many -= 1

    def _remove(self, path: Path, why: str) -> None:
        part = self._pop(path)
        size = self._bytes_of(path, part, reserved=False)
        self._verified.pop(path, None)
        for file in (path, Partial.path_of(path)):
            try:
                file.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("cannot remove {} from the model cache: {}", file.name, exc.strerror)
        logger.info(
            "model cache: removed big part {} ({} bytes): {}",
            quote(f"{path.parent.name}/{path.name}"),
            size,
            why,
        )
        self._changed()

    def _tick(self) -> int:
        """The clock of use, one step on; the index is written with the next change."""
        self._clock = min(self._clock + 1, CLOCK_MAX)
        self._version += 1
        return self._clock

    # -- the index -------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _load_index(self) -> None:
        """The parts on disk, ordered and linked to their resources by the index (rebuilt
        from the files' times if it cannot be read)."""
        complete, partial = _scan(self.root)
        rebuilt = False
        try:
            clock, used, orphans, refs = _parse_index(self.index_path)
        except (FileNotFoundError, NotADirectoryError):  # a new cache, or none at all
            clock, used, orphans, refs = 0, {}, set(), {}
        except (OSError, ValueError, RecursionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            logger.warning("model cache index unreadable ({}): rebuilt from the files", reason)
            clock, used, orphans, refs = 0, {}, set(), {}
            rebuilt = True
        self._clock = clock
        found = {**partial, **complete}
        # Files the index does not know (written after its last write): the most recent.
        unknown = sorted(
            (path for path in found if self._key(path) not in used),
            key=lambda path: max(found[path].st_atime_ns, found[path].st_mtime_ns),
        )
        for path in [*(path for path in found if self._key(path) in used), *unknown]:
            key = self._key(path)
            st = complete.get(path)
            self._put(
                path,
                _Part(
                    used=used[key] if key in used else self._tick(),
                    size=0 if st is None else st.st_size,
                    complete=st is not None,
                    orphan=key in orphans,
                ),
            )
        self._refs = {
            key: big for key, big in refs.items() if self.root / key[0] / big in self._parts
        }
        if rebuilt or unknown or len(used) != len(self._parts):
            self._changed()

    @staticmethod
    def _key(path: Path) -> tuple[str, str]:
        return path.parent.name, path.name

    def _encode_index(self) -> bytes | None:
        """The index as written (None when the cache holds nothing: no file at all)."""
        if not self._parts:
            return None
        parts = [[*self._key(path), part.used, part.orphan] for path, part in self._parts.items()]
        refs = [
            [folder, name, big]
            for (folder, name), big in self._refs.items()
            if self.root / folder / big in self._parts
        ]
        document = {"version": INDEX_VERSION, "clock": self._clock, "parts": parts, "refs": refs}
        return json.dumps(document, separators=(",", ":")).encode()

    def _changed(self) -> None:
        """What the cache holds changed: the index is written now, in a worker thread, if a
        loop runs (else at the next change or at ``close``); changes meanwhile are written
        together once that write ends. A cache that holds nothing has no index file, at once."""
        self._version += 1
        if not self._parts:
            self._store_index(self._version, None)  # an unlink (it may wait for a write)
            return
        if self._flushing is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flushing = loop.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            while self._version > self._written:
                version, data = self._version, self._encode_index()
                writing = asyncio.ensure_future(asyncio.to_thread(self._store_index, version, data))
                try:
                    stored = await asyncio.shield(writing)
                except asyncio.CancelledError:
                    await asyncio.wait((writing,))  # no write of the index outlives close()
                    raise
                if not stored:
                    return  # (said once in the journal) tried again at the next change
        finally:
            self._flushing = None

    def _store_index(self, version: int, data: bytes | None) -> bool:
        """Write ``data`` (None: remove the file) as the index's ``version``, unless a later
        one is on disk already (any thread); False if it could not be written."""
        with self._index_lock:
            if version <= self._written:
                return True
            try:
                if data is None:
                    self.index_path.unlink(missing_ok=True)
                else:
                    # Not synced: after a crash a lost or torn index is rebuilt from the files.
                    write_atomically(self.index_path, data, durable=False)
            except OSError as exc:
                if not self._write_failed:
                    logger.warning("cannot write the model cache index: {}", exc.strerror)
                self._write_failed = True
                return False
            self._written, self._write_failed = version, False
            return True

    async def close(self) -> None:
        """Write what changed since the index was last written (later changes are left to
        the next start, which finds the files as they are)."""
        self._closed = True
        flushing = self._flushing
        if flushing is not None:
            flushing.cancel()
            await asyncio.gather(flushing, return_exceptions=True)
        if self._version > self._written:
            await asyncio.to_thread(self._store_index, self._version, self._encode_index())

    # -- housekeeping ----------------------------------------------------------------------

    def _sweep_abandoned_uploads(self) -> None:
        """Spools of uploads a crash interrupted are of no use to anyone."""
        with contextlib.suppress(OSError):
            for leftover in self.root.glob("*/.upload-*.tmp"):
                leftover.unlink(missing_ok=True)


class _HeldFile(io.FileIO):
    """A complete part open for reading; closing it lets the cache evict it again."""

    release: Callable[[], None] | None = None

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")

    def close(self) -> None:
        try:
            super().close()
        finally:
            release, self.release = self.release, None
            if release is not None:
                release()


def default_max_bytes(root: Path) -> int:
    """``1 / DEFAULT_SHARE`` of the file system the cache is on (of the nearest directory
    that exists, if the cache's does not yet)."""
    for directory in (root, *root.parents):
        try:
            fs = os.statvfs(directory)
        except OSError:
            continue
        return max(1, fs.f_blocks * fs.f_frsize // DEFAULT_SHARE)
    return 1


def _scan(root: Path) -> tuple[dict[Path, os.stat_result], dict[Path, os.stat_result]]:
    """The complete parts and the partial files (by their part's path) under ``root``; what
    is not a plain file under a safe name is not the cache's and is left alone."""
    complete: dict[Path, os.stat_result] = {}
    partial: dict[Path, os.stat_result] = {}
    try:
        folders = [entry for entry in os.scandir(root) if _safe(entry.name)]
    except OSError:
        return complete, partial
    for folder in folders:
        with contextlib.suppress(OSError):
            if not folder.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(folder.path):
                if not entry.is_file(follow_symlinks=False):
                    continue
                name = entry.name
                if _safe(name):
                    complete[root / folder.name / name] = entry.stat(follow_symlinks=False)
                elif name.startswith(".") and name.endswith(".part") and _safe(name[1:-5]):
                    target = root / folder.name / name[1:-5]
                    partial[target] = entry.stat(follow_symlinks=False)
    return complete, partial


def _safe(name: str) -> bool:
    return bool(SAFE_COMPONENT.fullmatch(name)) and ".." not in name


def _parse_index(
    path: Path,
) -> tuple[int, dict[tuple[str, str], int], set[tuple[str, str]], dict[tuple[str, str], str]]:
    """The index's clock, each part's last use, the orphans, and each resource's part.
    ``ValueError`` if it is not an index this agent wrote (too big, not JSON, out of bounds)."""
    with path.open("rb") as file:
        data = file.read(INDEX_MAX_BYTES + 1)
    if len(data) > INDEX_MAX_BYTES:
        raise ValueError(f"larger than {INDEX_MAX_BYTES} bytes")
    document: Any = json.loads(data)
    if not isinstance(document, dict) or document.get("version") != INDEX_VERSION:
        raise ValueError("not an index of a known version")
    clock, parts, refs = document.get("clock"), document.get("parts"), document.get("refs")
    if not _counter(clock) or not isinstance(parts, list) or not isinstance(refs, list):
        raise ValueError("clock, parts or refs missing")
    if len(parts) > INDEX_MAX_ENTRIES or len(refs) > INDEX_MAX_ENTRIES:
        raise ValueError("too many entries")
    used: dict[tuple[str, str], int] = {}
    orphans: set[tuple[str, str]] = set()
    for entry in parts:
        match entry:
            case [str(folder), str(name), int(last), bool(orphan)] if (
                _safe(folder) and _safe(name) and _counter(last) and last <= clock
            ):
                used[(folder, name)] = last
                if orphan:
                    orphans.add((folder, name))
            case _:
                raise ValueError("a part entry is malformed")
    linked: dict[tuple[str, str], str] = {}
    for entry in refs:
        match entry:
            case [str(folder), str(name), str(big)] if _safe(folder) and _safe(name) and _safe(big):
                linked[(folder, name)] = big
            case _:
                raise ValueError("a resource entry is malformed")
    return clock, used, orphans, linked


def _counter(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= CLOCK_MAX


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
