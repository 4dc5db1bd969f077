"""The blocking parts of the unlock, run in a worker thread: whether the recorded unlock still
holds (``already_loaded``), the load of the archive into Docker, and the check of its images.

The load is one stream:

    ArchiveReader -> decrypt_iter -> PayloadSplitter -> held_back -> until_cancelled -> load

where ``load`` is ``agent.engine.Engine.load``: the pieces go to the engine's ``POST
/images/load`` as a chunked body, each written with one ``sendmsg`` from this same thread.

Only authenticated plaintext is passed on; the manifest at the head of the payload is read (so
a wrong key fails) before the engine is contacted; the last ``HOLDBACK`` bytes are released only
once the whole stream has authenticated, so Docker never sees the end of the tar of an archive
that later fails; and a stop is noticed between pieces. A failed or cancelled load drops the
connection mid-body, and the engine keeps nothing of it.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from agent.archive import ArchiveManifest, ImageEntry, PayloadSplitter
from agent.engine import Engine
from agent.errors import NotFoundError, UnlockCancelled, UnlockError
from agent.stream import HEADER_SIZE, decrypt_iter
from agent.unlock.record import (
    ArchiveIdentity,
    archive_identity,
    read_record,
    remove_stale_temp_files,
)

READ_SIZE = 1024 * 1024
HOLDBACK = 64 * 1024  # > the tar end-of-archive marker (1 KiB) with a wide margin
# glibc's mallopt(3) parameters, and what the load sets them to (see ``steady_heap``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 8 * 1024 * 1024
MMAP_THRESHOLD = 2 * READ_SIZE
_heap_steadied = False


def steady_heap() -> None:
    """Keep glibc from handing the heap's top back to the kernel after every freed piece.

    A freshly started agent has a small heap: with glibc's default (dynamic) thresholds, each
    64 KiB piece freed during the load trims the top and the next one faults in fresh zeroed
    pages (measured: ~148,000 minor faults and ~0.3 s of system time for a 320 MB archive,
    ~10,000 and ~0.08 s with the thresholds fixed; bench/bench_unlock.py). Fixed thresholds
    keep up to ``TRIM_THRESHOLD`` of free memory at the top and serve the 1 MiB reads from the
    heap. Process-wide, set once; a no-op where the C library is not glibc.
    """
    global _heap_steadied
    if _heap_steadied:
        return
    _heap_steadied = True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def already_loaded(
    state_dir: Path,
    archive: Path,
    engine_factory: Callable[[], Engine],
    api_version: str,
) -> int | None:
    """The checking stage: the number of images when the recorded unlock still holds (the same
    archive, or none any more, and all its images present, tagged again if need be); ``None``
    when the archive is to be loaded."""
    remove_stale_temp_files(state_dir)
    record = read_record(state_dir)
    if record is None:
        return None
    if archive.exists() and archive_identity(archive) != record.archive:
        logger.info("unlock: {} is a new archive, loading it", archive)
        return None
    with engine_factory() as engine:
        if not all_present(engine, record.images):
            if not archive.exists():
                raise NotFoundError(
                    f"the images archive {archive} is gone and the images it held are no "
                    "longer in the Docker engine"
                )
            logger.info("unlock: recorded images are missing from the Docker engine, reloading")
            return None
        verify_images(engine, record.images, api_version)
    logger.info("unlock: archive already loaded and all images present (no network needed)")
    return len(record.images)


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
    engine_factory: Callable[[], Engine],
    cancel: threading.Event,
    progress: Callable[[int], None],
    decrypted: Callable[[int], None] = lambda size: None,
) -> LoadOutcome:
    """Decrypt ``path`` straight into the engine's image load. Blocking: run in a thread.

    ``progress`` is told the archive bytes read so far, ``decrypted`` each authenticated piece's
    size."""
    steady_heap()
    reader = ArchiveReader(path, cancel, progress)
    splitter = PayloadSplitter(counted(decrypt_iter(reader.chunks(), fragments), decrypted))
    manifest = splitter.read_manifest()  # wrong key or foreign file: fails before Docker
    with engine_factory() as engine:
        loaded = engine.load(until_cancelled(held_back(splitter.tar_chunks()), cancel))
    return LoadOutcome(manifest=manifest, archive=reader.identity(), loaded=loaded)


def verify_images(engine: Engine, images: Iterable[ImageEntry], api_version: str) -> None:
    """Every image present; each ``api_tag`` image tagged ``repository:API_VERSION``."""
    images = list(images)
    held = engine.present(image.id for image in images)
    missing = [image for image in images if image.id not in held]
    if missing:
        names = ", ".join(f"{image.ref} ({image.id[:19]})" for image in missing)
        raise UnlockError(f"images missing from the Docker engine after loading: {names}")
    for image in images:
        if image.api_tag and image.repository:
            wanted = f"{image.repository}:{api_version}"
            if wanted not in engine.repo_tags(image.id):
                engine.tag(image.id, image.repository, api_version)


def all_present(engine: Engine, images: Iterable[ImageEntry]) -> bool:
    ids = [image.id for image in images]
    return engine.present(ids) == set(ids)
