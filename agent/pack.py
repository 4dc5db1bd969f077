"""The publisher's side of the images archive: ``pack-images`` (format: ``agent.archive``).

``docker save`` streams through the encryptor into a temp file beside the archive that is
synced and renamed into place when complete (``agent.durable``): the plaintext tar is never
written to disk, and an interrupted pack leaves the old archive, never half of a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.archive import ARCHIVE_CHUNK_SIZE, ArchiveManifest, ImageEntry, payload_head
from agent.durable import write_stream_atomically
from agent.errors import ConfigError
from agent.images import ImageEngine, parse_reference
from agent.stream import encrypt_iter

ARCHIVE_MODE = 0o644  # ciphertext only: readable by whoever ships it


@dataclass(frozen=True)
class PackResult:
    manifest: ArchiveManifest
    archive_size: int
    archive_sha256: str


def describe_images(engine: ImageEngine, refs: Sequence[str], *, api_tag: bool) -> ArchiveManifest:
    """Look the images up in the engine: their IDs, and which repository gets API_VERSION."""
    if not refs:
        raise ConfigError("name at least one image to pack")
    entries = []
    for ref in dict.fromkeys(refs):  # keep order, drop repeats
        repository = parse_reference(ref).repository
        entries.append(
            ImageEntry(
                ref=ref,
                id=engine.image_id(ref),
                repository=repository,
                api_tag=api_tag and repository is not None,
            )
        )
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return ArchiveManifest(images=tuple(entries), created=created)


def pack_images(
    engine: ImageEngine,
    refs: Sequence[str],
    out: Path,
    fragments: Sequence[bytes],
    *,
    api_tag: bool = True,
) -> PackResult:
    """Stream ``docker save refs`` through the encryptor into ``out``, atomically."""
    manifest = describe_images(engine, refs, api_tag=api_tag)
    payload = _chain(
        [payload_head(manifest)], engine.save([image.ref for image in manifest.images])
    )
    size, digest = write_stream_atomically(
        out, encrypt_iter(payload, fragments, chunk_size=ARCHIVE_CHUNK_SIZE), mode=ARCHIVE_MODE
    )
    return PackResult(manifest=manifest, archive_size=size, archive_sha256=digest)


def _chain(*parts: Iterable[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield from part
