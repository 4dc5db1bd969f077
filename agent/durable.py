"""Files that must survive a power cut whole: a key fragment, the unlock record, an archive.

Written under a hidden temporary name (``.NAME.XXXX.tmp``) in the same directory, synced, given
their mode, then renamed (or linked, when an existing file must not be replaced) into place, and
the directory synced: a crash leaves the old file or the whole new one, never half of either,
and no temporary file is left behind by a failure.

``write_atomically`` takes the bytes at once (small files, mode 0600); ``write_stream_atomically``
takes them piece by piece (an archive streamed out of ``docker save``) and returns their size
and SHA-256, counted on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from agent.errors import StorageError

PRIVATE = 0o600
WRITE_BUFFER = 4 * 1024 * 1024  # for streams: few, large writes


def sync_directory(directory: Path) -> None:
    """Make a new directory entry durable; some file systems refuse, which is harmless."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def _beside(
    path: Path,
    *,
    replace: bool = True,
    mode: int = PRIVATE,
    buffering: int = -1,
    durable: bool = True,
) -> Iterator[BinaryIO]:
    """A temp file beside ``path`` to write to; once the block ends cleanly it is synced
    (unless not ``durable``), given ``mode`` and moved to ``path``. Raises ``OSError``; the
    temp file never outlives the call."""
    descriptor, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb", buffering=buffering) as file:  # mkstemp: mode 0600
            yield file
            file.flush()
            if durable:
                os.fsync(file.fileno())
            if mode != PRIVATE:
                os.fchmod(file.fileno(), mode)
        if replace:
            os.replace(temp_name, path)
        else:
            os.link(temp_name, path)  # atomic, and fails if the target exists
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
    if durable:
        sync_directory(path.parent)


def write_atomically(
    path: Path, data: bytes, *, replace: bool = True, mode: int = PRIVATE, durable: bool = True
) -> None:
    """Write ``data`` to ``path`` durably and atomically (mode 0600 unless ``mode`` says).

    With ``replace=False`` an existing ``path`` is left alone and ``FileExistsError`` raised.
    Other failures raise ``OSError``; no temporary file is left behind either way. Not
    ``durable``: atomic (a reader sees the old or the new file) but not synced, for what a
    crash may lose (an fsync commits the file system's journal, and with it the dirty data of
    every other file: a download's megabytes).
    """
    with _beside(path, replace=replace, mode=mode, durable=durable) as file:
        file.write(data)


def write_stream_atomically(
    path: Path, pieces: Iterable[bytes], *, mode: int = PRIVATE
) -> tuple[int, str]:
    """Write ``pieces`` to ``path`` durably and atomically; returns their size and SHA-256.

    An ``OSError`` (disk full, directory not writable) becomes ``StorageError``; an error of
    ``pieces`` is raised as it is. Either way (or on an interruption) the old file stays.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with _beside(path, mode=mode, buffering=WRITE_BUFFER) as file:
            for piece in pieces:
                file.write(piece)
                digest.update(piece)
                size += len(piece)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
    return size, digest.hexdigest()
