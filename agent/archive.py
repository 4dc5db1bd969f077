"""The images archive format: what ``pack-images`` writes and what the unlock reads back.

The archive is one encrypted stream (``agent.stream``, ``ARCHIVE_CHUNK_SIZE`` chunks) whose
plaintext payload is

    payload  = PAYLOAD_MAGIC || u32 manifest_length || manifest || docker_save_tar
    manifest = UTF-8 JSON: {"version": 1, "created": ISO time, "release": N, "images": [
                   {"ref": "azaion/app:1.2", "id": "sha256:...",
                    "repository": "azaion/app" | null, "api_tag": true | false}, ...]}

The manifest comes first, so the unlock knows what to expect (and that the key is right)
before a byte reaches Docker, and it sits inside the encrypted, authenticated payload, so the
archive says nothing in the clear. ``api_tag`` asks the device to tag that image
``repository:API_VERSION`` after loading. ``release`` is the publisher's release number (0 when
the publisher gave none; older archives lack it and read as 0): a publisher signature
(``agent.signing``) covers the manifest, so a device can refuse an older release.

This module is the format alone: bytes and iterables of bytes in, bytes and objects out. The
publisher (``agent.pack``) and the device (``agent.unlock``) both read it from here; files,
Docker and the clock stay with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError, UnsupportedFormatError

PAYLOAD_MAGIC = b"AZIMG\x00\x01\n"
MANIFEST_VERSION = 1
LENGTH_SIZE = 4
MAX_MANIFEST_SIZE = 1024 * 1024
# Large chunks keep the per-chunk overhead of decryption negligible next to Docker's own work.
ARCHIVE_CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class ImageEntry:
    """One image the archive holds."""

    ref: str
    id: str
    repository: str | None
    api_tag: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "id": self.id,
            "repository": self.repository,
            "api_tag": self.api_tag,
        }

    @classmethod
    def from_json(cls, data: Any) -> ImageEntry:
        if not isinstance(data, dict):
            raise UnsupportedFormatError("the images manifest lists something that is not an image")
        ref, image_id = data.get("ref"), data.get("id")
        repository, api_tag = data.get("repository"), data.get("api_tag", False)
        if not isinstance(ref, str) or not isinstance(image_id, str):
            raise UnsupportedFormatError("an image in the images manifest lacks its ref or ID")
        if not (repository is None or isinstance(repository, str)) or not isinstance(api_tag, bool):
            raise UnsupportedFormatError(f"the images manifest entry for {ref} is malformed")
        return cls(
            ref=ref, id=image_id, repository=repository, api_tag=api_tag and bool(repository)
        )


@dataclass(frozen=True)
class ArchiveManifest:
    """What the archive holds. ``created`` (ISO time) is the publisher's to give."""

    images: tuple[ImageEntry, ...]
    created: str = ""
    release: int = 0

    def encode(self) -> bytes:
        document = {
            "version": MANIFEST_VERSION,
            "created": self.created,
            "release": self.release,
            "images": [image.to_json() for image in self.images],
        }
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> ArchiveManifest:
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise UnsupportedFormatError("the images manifest is not valid JSON") from exc
        if not isinstance(document, dict) or document.get("version") != MANIFEST_VERSION:
            raise UnsupportedFormatError(
                "the images manifest has a version this agent does not know"
            )
        images = document.get("images")
        if not isinstance(images, list) or not images:
            raise UnsupportedFormatError("the images manifest lists no images")
        created = document.get("created")
        release = document.get("release", 0)
        if isinstance(release, bool) or not isinstance(release, int) or not 0 <= release < 2**63:
            raise UnsupportedFormatError("the images manifest's release is not a release number")
        return cls(
            images=tuple(ImageEntry.from_json(item) for item in images),
            created=created if isinstance(created, str) else "",
            release=release,
        )


def payload_head(manifest: ArchiveManifest) -> bytes:
    """What precedes the ``docker save`` tar in the plaintext payload."""
    encoded = manifest.encode()
    if len(encoded) > MAX_MANIFEST_SIZE:
        raise ConfigError("too many images for one archive (the manifest exceeds 1 MiB)")
    return PAYLOAD_MAGIC + len(encoded).to_bytes(LENGTH_SIZE, "big") + encoded


class PayloadSplitter:
    """Reads the manifest off the front of a plaintext payload; the rest is the tar.

    ``read_manifest`` pulls only as many plaintext pieces as the manifest needs, so the key and
    the format are known good before anything is handed on; ``tar_chunks`` then yields the
    remainder of the payload untouched.
    """

    def __init__(self, plaintext: Iterable[bytes]) -> None:
        self._source = iter(plaintext)
        self._buffer = bytearray()
        self.manifest_bytes = b""  # as they stand in the payload (what a signature covers)

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            piece = next(self._source, None)
            if piece is None:
                raise UnsupportedFormatError("the archive ends inside its manifest")
            self._buffer += piece

    def _take(self, size: int) -> bytes:
        self._fill(size)
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    def read_manifest(self) -> ArchiveManifest:
        if self._take(len(PAYLOAD_MAGIC)) != PAYLOAD_MAGIC:
            raise UnsupportedFormatError(
                "the archive does not hold Docker images (unknown payload)"
            )
        length = int.from_bytes(self._take(LENGTH_SIZE), "big")
        if length > MAX_MANIFEST_SIZE:
            raise UnsupportedFormatError("the archive's manifest is implausibly large")
        self.manifest_bytes = self._take(length)
        return ArchiveManifest.decode(self.manifest_bytes)

    def tar_chunks(self) -> Iterator[bytes]:
        if self._buffer:
            rest, self._buffer = bytes(self._buffer), bytearray()
            yield rest
        yield from self._source
