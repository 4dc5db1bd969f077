"""Small files that must survive a power cut whole: a key fragment, the unlock record.

Written under a hidden temporary name (``.NAME.XXXX.tmp``, mode 0600) in the same directory,
synced, then renamed (or linked, when an existing file must not be replaced) into place, and the
directory synced: a crash leaves the old file or the whole new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def sync_directory(directory: Path) -> None:
    """Make a new directory entry durable; some file systems refuse, which is harmless."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_atomically(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` durably and atomically (mode 0600).

    With ``replace=False`` an existing ``path`` is left alone and ``FileExistsError`` raised.
    Other failures raise ``OSError``; no temporary file is left behind either way.
    """
    descriptor, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:  # mkstemp creates it with mode 0600
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temp_name, path)
        else:
            os.link(temp_name, path)  # atomic, and fails if the target exists
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
    sync_directory(path.parent)
