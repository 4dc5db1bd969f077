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

Publisher signatures (``agent.signing``, ``Trust``) are checked in the same pass: before the
first byte is decrypted, that the archive is signed if the device requires it, by a key it
trusts, and not as a release older than the installed one; once the manifest is read, that it
names the signed release; and after the final chunk, the signature over the ciphertext's
length and SHA-256 (hashed as it is read) and the manifest's SHA-256. Only then is the held-back
tail released, so Docker never completes the load of an archive whose signature fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loguru import logger

from agent.archive import ArchiveManifest, ImageEntry, PayloadSplitter
from agent.engine import Engine
from agent.errors import (
    NotFoundError,
    RollbackRefused,
    SignatureError,
    StorageError,
    UnlockCancelled,
    UnlockError,
)
from agent.signing import Kind, SignatureBlock, Statement, TrustStore, split_archive
from agent.stream import HEADER_SIZE, decrypt_iter, parse_header, plaintext_size
from agent.unlock.record import (
    ArchiveIdentity,
    UnlockRecord,
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


@dataclass(frozen=True)
class Installed:
    """What the checking stage found: the record of images that are installed and usable now,
    and whether the archive at ``IMAGES_PATH`` is the one they came from (else: an update)."""

    record: UnlockRecord
    current: bool


def already_loaded(
    state_dir: Path,
    archive: Path,
    engine_factory: Callable[[], Engine],
    api_version: str,
    trust: Trust | None = None,
) -> Installed | None:
    """The checking stage: the installed release when the recorded unlock still holds (all
    its images present, tagged again if need be, and verified by a publisher trusted now where
    signatures are required), with whether the archive is still the one it came from (same
    archive, or none any more); ``None`` when there is nothing usable and the archive is to be
    loaded."""
    remove_stale_temp_files(state_dir)
    record = read_record(state_dir)
    if record is None:
        return None
    current = not archive.exists() or archive_identity(archive) == record.archive
    if trust is not None and trust.store.enforced and record.publisher not in trust.key_names:
        logger.warning(
            "unlock: the installed images were not verified by a publisher this device trusts "
            "now; loading {} again to check its signature",
            archive,
        )
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
    if current:
        logger.info("unlock: archive already loaded and all images present (no network needed)")
    else:
        logger.info(
            "unlock: release {} installed and all its images present; {} is a new archive, "
            "to be loaded as an update",
            record.release,
            archive,
        )
    return Installed(record, current)


def archive_changed(state_dir: Path, archive: Path) -> UnlockRecord | None:
    """The installed record if ``archive`` exists and is not the archive it came from."""
    record = read_record(state_dir)
    if record is None or not archive.exists() or archive_identity(archive) == record.archive:
        return None
    return record


def remove_images(engine: Engine, image_ids: Iterable[str]) -> tuple[str, ...]:
    """Remove the images no release needs any more, except those a container uses; the ones
    left (in use) are returned, to try again at the next check."""
    left = []
    for image_id in image_ids:
        if engine.remove_unused(image_id):
            logger.info("unlock: removed image {} of an earlier release", image_id[:19])
        else:
            logger.info("unlock: image {} of an earlier release is in use; kept", image_id[:19])
            left.append(image_id)
    return tuple(left)


@dataclass(frozen=True)
class Trust:
    """What an archive's signature is checked against: the publisher keys the device trusts,
    the release installed now (signed releases below it are refused), and whether the operator
    allowed a downgrade for this boot (``LOADER_ALLOW_DOWNGRADE``)."""

    store: TrustStore
    installed_release: int | None = None
    allow_downgrade: bool = False

    @property
    def key_names(self) -> list[str]:
        return self.store.key_names()


def engine_body(
    splitter: PayloadSplitter, trust: Trust, reader: ArchiveReader, what: str
) -> Iterator[bytes]:
    """The tar for the engine: the signature verified once the stream has authenticated, and
    only then the held-back tail released."""
    return held_back(then_verified(splitter.tar_chunks(), trust, reader, splitter, what))


ROOM_MARGIN = 1.10  # the images take about their tar's size on disk, and a little more
MB = 1000 * 1000


def check_room(data_root: str, need: int, what: str) -> None:
    """Refuse early, with a clear message, when the engine's data root has less free space
    than ``need`` bytes (the archive's payload) with a margin: better than filling the disk
    half-way through a load. A data root this process cannot see (an engine elsewhere, no
    permission) is not checked."""
    try:
        stats = os.statvfs(data_root)
    except OSError as exc:
        logger.debug("cannot check free space of {}: {}", data_root, exc.strerror)
        return
    free = stats.f_bavail * stats.f_frsize
    if free < need * ROOM_MARGIN:
        raise StorageError(
            f"the Docker engine's data root {data_root} has {free / MB:.0f} MB free; the images "
            f"of {what} need about {need * ROOM_MARGIN / MB:.0f} MB: free some space first"
        )
    logger.info(
        "unlock: {:.0f} MB free in {} for about {:.0f} MB of images",
        free / MB,
        data_root,
        need / MB,
    )


def load_trust(publishers_dir: Path, state_dir: Path, allow_downgrade: bool) -> Trust:
    """The trust an unlock starts with: the publisher keys installed now (read afresh each
    time, so a key added or removed counts from the next unlock), the installed release."""
    store = TrustStore.load(publishers_dir)
    for problem in store.problems:
        logger.warning("publisher keys: {}", problem)
    record = read_record(state_dir)
    # Only a verified release counts: an unsigned archive's claim must not block signed ones.
    installed = None if record is None or record.publisher is None else record.release
    return Trust(store, installed, allow_downgrade)


@dataclass(frozen=True)
class LoadOutcome:
    manifest: ArchiveManifest
    archive: ArchiveIdentity
    loaded: list[str]
    signature: SignatureBlock | None = None
    verified_by: str | None = None  # the trusted key whose signature verified


class BackgroundDigest:
    """SHA-256 of the pieces handed to ``update``, computed in a thread of its own: hashlib lets
    go of the GIL on large buffers, so the hash runs on another core beside the decryption
    instead of adding to it (measured: bench/bench_release.py). At most ``DEPTH`` pieces wait;
    the pieces are bytes, never changed after they are handed over."""

    DEPTH = 8

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pieces: queue.Queue[bytes | None] = queue.Queue(self.DEPTH)
        self._thread = threading.Thread(target=self._run, name="archive-digest", daemon=True)
        self._thread.start()
        self._result: bytes | None = None

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            self._hash.update(piece)

    def update(self, piece: bytes) -> None:
        self._pieces.put(piece)

    def digest(self) -> bytes:
        if self._result is None:
            self._pieces.put(None)
            self._thread.join()
            self._result = self._hash.digest()
        return self._result

    def close(self) -> None:
        """Stop the thread if the digest was never asked for (a failed or stopped load)."""
        if self._result is None and self._thread.is_alive():
            self._pieces.put(None)
            self._thread.join()


class ArchiveReader:
    """Reads the archive's stream once (up to its signature block, if it has one): keeps its
    header (its identity), hashes it when it is signed, counts progress, and stops when
    cancelled."""

    def __init__(
        self,
        file: BinaryIO,
        cancel: threading.Event,
        progress: Callable[[int], None],
        *,
        stream_size: int,
        signature: SignatureBlock | None,
    ) -> None:
        self._file = file
        self._cancel = cancel
        self._progress = progress
        self._stream_size = stream_size
        self.signature = signature
        self._digest = BackgroundDigest() if signature is not None else None
        self._header = b""
        self.size = 0  # stream bytes read

    def chunks(self) -> Iterator[bytes]:
        left = self._stream_size
        while left and (block := self._file.read(min(READ_SIZE, left))):
            if self._cancel.is_set():
                raise UnlockCancelled("the unlock was stopped")
            if len(self._header) < HEADER_SIZE:
                self._header += block[: HEADER_SIZE - len(self._header)]
            if self._digest is not None:
                self._digest.update(block)
            left -= len(block)
            self.size += len(block)
            self._progress(self.size)
            yield block

    @property
    def header(self) -> bytes:
        return self._header

    def digest(self) -> bytes:
        return b"" if self._digest is None else self._digest.digest()

    def close(self) -> None:
        if self._digest is not None:
            self._digest.close()

    def identity(self) -> ArchiveIdentity:
        block = b"" if self.signature is None else self.signature.pack()
        size = self.size + len(block)
        return ArchiveIdentity.of_header(self._header + block, size)


def check_before_reading(trust: Trust, block: SignatureBlock | None, what: str) -> None:
    """What can be refused before a byte is decrypted: a missing signature where one is
    required, an untrusted key, an older release."""
    store = trust.store
    if block is None:
        if store.enforced:
            raise SignatureError(f"{what} is not signed, and this device requires signatures")
        return
    signed = block.statement
    if store.enforced and signed.key_id not in store.keys:
        raise SignatureError(
            f"{what} is signed by key {signed.key_id.hex()}, which this device does not trust "
            "(not in its publishers directory)"
        )
    installed = trust.installed_release
    if installed is not None and signed.release < installed:
        if not trust.allow_downgrade:
            raise RollbackRefused(
                f"{what} is release {signed.release}, older than the installed release "
                f"{installed}; set LOADER_ALLOW_DOWNGRADE=1 for one boot to allow it"
            )
        logger.warning(
            "unlock: loading release {} over the installed release {} (LOADER_ALLOW_DOWNGRADE)",
            signed.release,
            installed,
        )


def check_manifest(block: SignatureBlock | None, manifest: ArchiveManifest, what: str) -> None:
    if block is not None and manifest.release != block.statement.release:
        raise SignatureError(
            f"{what} holds release {manifest.release} but is signed as release "
            f"{block.statement.release}"
        )


def then_verified(
    pieces: Iterable[bytes],
    trust: Trust,
    reader: ArchiveReader,
    splitter: PayloadSplitter,
    what: str,
) -> Iterator[bytes]:
    """Pass ``pieces`` on; once they end (the stream authenticated), verify the signature, so
    a failure comes before ``held_back`` releases the tail."""
    yield from pieces
    measured = Statement.measured(
        Kind.ARCHIVE,
        reader.size,
        reader.digest() or bytes(32),
        hashlib.sha256(splitter.manifest_bytes).digest(),
    )
    trust.store.verify(reader.signature, measured, what)


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
    trust: Trust | None = None,
) -> LoadOutcome:
    """Decrypt ``path`` straight into the engine's image load. Blocking: run in a thread.

    ``progress`` is told the archive bytes read so far, ``decrypted`` each authenticated piece's
    size. ``trust``: check the publisher signature (none: an unsigned-archive device's old
    behaviour, the signature block skipped unchecked)."""
    steady_heap()
    trust = trust or Trust(TrustStore())
    what = f"the images archive {path}"
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(path.open("rb"))
        stream_size, block = split_archive(file)
        check_before_reading(trust, block, what)
        reader = ArchiveReader(file, cancel, progress, stream_size=stream_size, signature=block)
        stack.callback(reader.close)
        splitter = PayloadSplitter(counted(decrypt_iter(reader.chunks(), fragments), decrypted))
        manifest = splitter.read_manifest()  # wrong key or foreign file: fails before Docker
        check_manifest(block, manifest, what)
        with engine_factory() as engine:
            data_root = engine.data_root()
            if data_root is not None:
                need = plaintext_size(stream_size, chunk_size=manifest_chunk(reader))
                check_room(data_root, need, what)
            loaded = engine.load(
                until_cancelled(engine_body(splitter, trust, reader, what), cancel)
            )
    verified_by = None
    if block is not None and block.statement.key_id in trust.store.keys:
        verified_by = block.statement.key_id.hex()
    return LoadOutcome(
        manifest=manifest,
        archive=reader.identity(),
        loaded=loaded,
        signature=block,
        verified_by=verified_by,
    )


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


def manifest_chunk(reader: ArchiveReader) -> int:
    """The archive's chunk size, from the header the reader has kept."""
    return parse_header(reader.header).chunk_size
