"""What survives a reboot: the record of the last successful unlock.

``LOADER_STATE_DIR/unlock.json``, written durably and atomically (``agent.durable``), names the
archive by its ``ArchiveIdentity`` and lists the images it held, with the release number and
the publisher key that signed it (``agent.signing``; none for an unsigned archive). At the next
boot, the same archive with all those images present needs no network. Nothing in it is secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from agent.archive import ImageEntry
from agent.durable import write_atomically
from agent.errors import LoaderError
from agent.signing import split_archive
from agent.stream import HEADER_SIZE

RECORD_NAME = "unlock.json"
RECORD_VERSION = 1


@dataclass(frozen=True)
class ArchiveIdentity:
    """Which archive: the SHA-256 of its stream header, and its size.

    The header holds the archive's random salt and a MAC over it under the archive's key, so it
    is unique per archive and cannot be reused with other content without the key. Digesting
    the header instead of the whole file keeps the boot-time check instant at any archive size
    (and the load free of a second hash over every byte). A signed archive's digest covers its
    signature block too (``header || block``), so the same stream signed again as another
    release is another archive; ``size`` is the whole file's.
    """

    header_sha256: str
    size: int

    @classmethod
    def of_header(cls, header: bytes, size: int) -> ArchiveIdentity:
        return cls(hashlib.sha256(header).hexdigest(), size)


@dataclass(frozen=True)
class UnlockRecord:
    """What survives a reboot: which archive was unlocked, and into which images."""

    archive: ArchiveIdentity
    images: tuple[ImageEntry, ...]
    api_version: str
    unlocked_at: str
    release: int = 0
    publisher: str | None = None  # the key id (hex) whose signature verified, if any
    # Images of earlier releases that this one does not carry and a container still used
    # when they were to be removed: tried again at each check, never forced.
    pending_removal: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "archive": {
                "header_sha256": self.archive.header_sha256,
                "size": self.archive.size,
            },
            "images": [image.to_json() for image in self.images],
            "api_version": self.api_version,
            "unlocked_at": self.unlocked_at,
            "release": self.release,
            "publisher": self.publisher,
            "pending_removal": list(self.pending_removal),
        }

    @classmethod
    def from_json(cls, data: Any) -> UnlockRecord:
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            raise ValueError("unknown record version")
        archive = data["archive"]
        return cls(
            archive=ArchiveIdentity(
                header_sha256=str(archive["header_sha256"]), size=int(archive["size"])
            ),
            images=tuple(ImageEntry.from_json(item) for item in data["images"]),
            api_version=str(data["api_version"]),
            unlocked_at=str(data["unlocked_at"]),
            release=int(data.get("release", 0)),
            publisher=None if data.get("publisher") is None else str(data["publisher"]),
            pending_removal=tuple(str(item) for item in data.get("pending_removal", [])),
        )


def record_path(state_dir: Path) -> Path:
    return state_dir / RECORD_NAME


def read_record(state_dir: Path) -> UnlockRecord | None:
    """The last successful unlock, or None (none yet, or unreadable: then we simply reload)."""
    path = record_path(state_dir)
    try:
        return UnlockRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, LoaderError) as exc:
        logger.warning("ignoring unreadable unlock record {}: {}", path, exc)
        return None


def write_record(state_dir: Path, record: UnlockRecord) -> None:
    """Durable and atomic: a crash leaves the old record or the new one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record.to_json(), indent=2, sort_keys=True).encode("utf-8") + b"\n"
    write_atomically(record_path(state_dir), data)


def remove_stale_temp_files(state_dir: Path) -> None:
    """Temp files of a record write that a power cut interrupted; harmless, but tidy up."""
    for stale in state_dir.glob(f".{RECORD_NAME}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def archive_identity(path: Path) -> ArchiveIdentity:
    """The identity of the archive at ``path`` (reads only its header and signature block)."""
    with path.open("rb") as file:
        header = file.read(HEADER_SIZE)
        size = os.fstat(file.fileno()).st_size
        block = split_archive(file)[1]
    return ArchiveIdentity.of_header(header + (block.pack() if block else b""), size)
