"""Signed archives at the unlock: the real dockerd and dev-api, archives signed by
``pack_images(..., sign_key=...)`` (agent/signing.py; docs/format.md, "Publisher signatures"),
by the rig and publisher of ``tests/fixtures/release.py``.

With a publisher key installed, only archives it signed load; the signature is verified in the
load's one pass, before the held-back tail reaches the engine, so an archive whose stream
authenticates but whose signature fails leaves no image behind. A signed release older than the
installed one is refused unless LOADER_ALLOW_DOWNGRADE allows it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import keys, signing
from agent.archive import (
    ARCHIVE_CHUNK_SIZE,
    ArchiveManifest,
    ImageEntry,
    PayloadSplitter,
    payload_head,
)
from agent.errors import SignatureError
from agent.stream import decrypt_iter, encrypt_iter
from agent.unlock import read_record
from agent.unlock.pipeline import HOLDBACK, ArchiveReader, Trust, engine_body
from tests.fixtures.release import Publisher
from tests.test_unlock import Rig, unlock

pytestmark = pytest.mark.docker


@dataclass
class Signed:
    archive: Path
    ref: str
    image_id: str


def pack_signed(rig: Rig, by: Publisher | None, release: int) -> Signed:
    """One image of its own, packed into the rig's archive (signed by ``by``, if any)."""
    ref = f"azaion/test-signed-{secrets.token_hex(4)}:1.0"
    ids = (by or Publisher.unsigned(rig)).pack([ref], release)
    return Signed(rig.archive, ref, ids[ref])


async def test_a_signed_archive_loads_and_its_release_and_publisher_are_recorded(rig: Rig) -> None:
    team = Publisher(rig, "release-team")
    signed = pack_signed(rig, team, release=3)
    manager = rig.manager()

    result = await unlock(manager)

    assert result["state"] == "ready", result
    assert signed.image_id in rig.dockerd.image_ids()
    record = read_record(rig.state_dir)
    key_id = team.key_id
    assert record is not None and record.release == 3 and record.publisher == key_id
    assert (result["release"], result["publisher"]) == (3, key_id)
    assert manager.status_line() == f"ready: 1 image loaded, release 3 signed by {key_id}"
    again = await unlock(rig.manager())  # the next boot: the record holds, no load
    assert (again["state"], again["release"], again["publisher"]) == ("ready", 3, key_id)


async def test_unsigned_archive_with_a_key_installed_is_refused(rig: Rig) -> None:
    Publisher(rig, "release-team")
    unsigned = pack_signed(rig, None, release=0)

    result = await unlock(rig.manager())

    assert result["state"] == "error"
    assert "is not signed, and this device requires signatures" in result["error"]
    assert str(unsigned.archive) in result["error"]
    assert unsigned.image_id not in rig.dockerd.image_ids()
    assert read_record(rig.state_dir) is None


async def test_an_archive_signed_by_an_untrusted_key_is_refused(rig: Rig) -> None:
    Publisher(rig, "release-team")
    stranger = Publisher(rig, "stranger", trusted=False)
    signed = pack_signed(rig, stranger, release=5)

    result = await unlock(rig.manager())

    assert result["state"] == "error"
    assert "which this device does not trust" in result["error"]
    assert signed.image_id not in rig.dockerd.image_ids()


async def test_a_bad_signature_is_found_in_the_same_pass_and_nothing_is_loaded(rig: Rig) -> None:
    """The stream itself is intact (every chunk authenticates); only the signature is wrong.
    The whole tar but its held-back tail reaches the engine before the signature can be
    checked; the tail never does, so the engine keeps nothing."""
    team = Publisher(rig, "release-team")
    signed = pack_signed(rig, team, release=2)
    data = bytearray(signed.archive.read_bytes())
    data[-1] ^= 0x01  # the signature's last byte
    signed.archive.write_bytes(bytes(data))

    manager = rig.manager()
    result = await unlock(manager)

    assert result["state"] == "error"
    assert "does not verify" in result["error"]
    assert manager.stats.decrypted_bytes > 0  # the stream was decrypted: the check came last
    assert signed.image_id not in rig.dockerd.image_ids()
    assert read_record(rig.state_dir) is None


async def test_an_older_signed_release_is_refused_unless_allowed(rig: Rig) -> None:
    """2 -> 1 is a failed update: the device stays ready on release 2 and says why; with
    LOADER_ALLOW_DOWNGRADE the same archive is installed."""
    team = Publisher(rig, "release-team")
    newer = pack_signed(rig, team, release=2)
    assert (await unlock(rig.manager()))["state"] == "ready"
    older = pack_signed(rig, team, release=1)

    refused = await unlock(rig.manager())

    assert (refused["state"], refused["release"]) == ("ready", 2)
    assert refused["update"]["state"] == "error"
    assert "release 1, older than the installed release 2" in refused["update"]["error"]
    assert "LOADER_ALLOW_DOWNGRADE" in refused["update"]["error"]
    assert older.image_id not in rig.dockerd.image_ids()
    record = read_record(rig.state_dir)
    assert record is not None and record.release == 2

    allowed = await unlock(rig.manager(loader_allow_downgrade=True))

    assert (allowed["state"], allowed["release"]) == ("ready", 1), allowed
    assert allowed["update"]["state"] == "ready"
    assert older.image_id in rig.dockerd.image_ids()
    assert newer.image_id not in rig.dockerd.image_ids()  # release 2's image, unused, removed
    record = read_record(rig.state_dir)
    assert record is not None and record.release == 1


async def test_without_keys_an_unsigned_archive_loads_as_before(rig: Rig) -> None:
    unsigned = pack_signed(rig, None, release=0)
    assert (await unlock(rig.manager()))["state"] == "ready"
    assert unsigned.image_id in rig.dockerd.image_ids()
    record = read_record(rig.state_dir)
    assert record is not None and record.publisher is None


async def test_installing_a_key_later_makes_the_unverified_install_load_again(rig: Rig) -> None:
    """Images loaded from an unsigned archive are not trusted once a key is installed: the
    next unlock reads the archive again, and refuses it."""
    unsigned = pack_signed(rig, None, release=0)
    assert (await unlock(rig.manager()))["state"] == "ready"
    Publisher(rig, "release-team")

    result = await unlock(rig.manager())

    assert result["state"] == "error"
    assert "is not signed" in result["error"]
    assert unsigned.image_id in rig.dockerd.image_ids()  # nothing is removed here


def test_the_tail_stays_held_back_when_the_signature_fails(tmp_path: Path) -> None:
    """The order inside the load: every tar byte but the held-back tail may pass before the
    signature is checked; when the check fails, the tail never does."""
    key_path = tmp_path / "publisher.key"
    public = signing.write_key_pair(key_path)
    store = signing.TrustStore.load(tmp_path)
    assert store.enforced and store.key_names() == [public.name]
    fragment = keys.generate_fragment()
    tar = os.urandom(3 * HOLDBACK + 12345)
    manifest = ArchiveManifest(images=(ImageEntry("a:1", "sha256:00", None, False),), release=4)
    archive = tmp_path / "images.enc"
    pack_images_from(archive, manifest, tar, fragment, signing.read_private_key(key_path))
    data = bytearray(archive.read_bytes())
    data[-1] ^= 0x01
    archive.write_bytes(bytes(data))

    passed = bytearray()
    with archive.open("rb") as file:
        stream_size, block = signing.split_archive(file)
        reader = ArchiveReader(
            file, threading.Event(), lambda done: None, stream_size=stream_size, signature=block
        )
        splitter = PayloadSplitter(decrypt_iter(reader.chunks(), [fragment]))
        assert splitter.read_manifest().release == 4
        pieces = engine_body(splitter, Trust(store), reader, "the archive")
        with pytest.raises(SignatureError, match="does not verify"):
            for piece in pieces:
                passed += piece
    assert reader.size == stream_size  # the whole stream was read and authenticated
    assert tar.startswith(passed) and len(tar) - len(passed) >= HOLDBACK


def pack_images_from(
    out: Path, manifest: ArchiveManifest, tar: bytes, fragment: bytes, key: Any
) -> None:
    """What pack_images writes, from a tar in memory instead of the engine's."""
    pieces = encrypt_iter(
        iter([payload_head(manifest), tar]), [fragment], chunk_size=ARCHIVE_CHUNK_SIZE
    )
    stream_bytes = b"".join(pieces)
    block = signing.sign(
        key,
        signing.Kind.ARCHIVE,
        manifest.release,
        len(stream_bytes),
        hashlib.sha256(stream_bytes).digest(),
        hashlib.sha256(manifest.encode()).digest(),
    )
    out.write_bytes(stream_bytes + block.pack())
