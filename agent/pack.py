"""The publisher's side of the images archive: ``pack-images`` (format: ``agent.archive``).

``docker save`` streams through the encryptor into a temp file beside the archive that is
synced and renamed into place when complete (``agent.durable``): the plaintext tar is never
written to disk, and an interrupted pack leaves the old archive, never half of a new one.

With a publisher key (``--sign-key``) the archive ends with a signature block
(``agent.signing``): the ciphertext's length and SHA-256 are counted as it streams to the file,
so signing costs no second read, and the block is part of the same atomic write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.archive import ARCHIVE_CHUNK_SIZE, ArchiveManifest, ImageEntry, payload_head
from agent.durable import write_stream_atomically
from agent.errors import ConfigError
from agent.images import ImageEngine, parse_reference
from agent.signing import Kind, SignatureBlock, sign
from agent.stream import encrypt_iter

ARCHIVE_MODE = 0o644  # ciphertext only: readable by whoever ships it


@dataclass(frozen=True)
class PackResult:
    manifest: ArchiveManifest
    archive_size: int
    archive_sha256: str
    signature: SignatureBlock | None = None


def describe_images(
    engine: ImageEngine, refs: Sequence[str], *, api_tag: bool, release: int = 0
) -> ArchiveManifest:
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
    return ArchiveManifest(images=tuple(entries), created=created, release=release)


def pack_images(
    engine: ImageEngine,
    refs: Sequence[str],
    out: Path,
    fragments: Sequence[bytes],
    *,
    api_tag: bool = True,
    sign_key: Ed25519PrivateKey | None = None,
    release: int = 0,
) -> PackResult:
    """Stream ``docker save refs`` through the encryptor into ``out``, atomically; signed
    with ``sign_key`` as release ``release`` if given."""
    manifest = describe_images(engine, refs, api_tag=api_tag, release=release)
    payload = _chain(
        [payload_head(manifest)], engine.save([image.ref for image in manifest.images])
    )
    ciphertext = encrypt_iter(payload, fragments, chunk_size=ARCHIVE_CHUNK_SIZE)
    signer = None if sign_key is None else _Signer(sign_key, manifest)
    pieces = ciphertext if signer is None else signer.signed(ciphertext)
    size, digest = write_stream_atomically(out, pieces, mode=ARCHIVE_MODE)
    return PackResult(
        manifest=manifest,
        archive_size=size,
        archive_sha256=digest,
        signature=None if signer is None else signer.block,
    )


class _Signer:
    """Counts and hashes the ciphertext as it passes, then appends the signature block."""

    def __init__(self, key: Ed25519PrivateKey, manifest: ArchiveManifest) -> None:
        self._key = key
        self._manifest = manifest
        self.block: SignatureBlock | None = None

    def signed(self, ciphertext: Iterable[bytes]) -> Iterator[bytes]:
        digest, size = hashlib.sha256(), 0
        for piece in ciphertext:
            digest.update(piece)
            size += len(piece)
            yield piece
        self.block = sign(
            self._key,
            Kind.ARCHIVE,
            self._manifest.release,
            size,
            digest.digest(),
            hashlib.sha256(self._manifest.encode()).digest(),
        )
        yield self.block.pack()


def _chain(*parts: Iterable[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield from part
