"""The images archive: payload layout (``agent.archive``), its durable write, and pack-images
against a real dockerd."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import keys, signing
from agent.archive import PAYLOAD_MAGIC, ArchiveManifest, ImageEntry, PayloadSplitter, payload_head
from agent.durable import write_stream_atomically
from agent.errors import LoaderError, UnsupportedFormatError, WrongKeyError
from agent.images import ImageEngine
from agent.pack import pack_images
from agent.stream import decrypt_iter
from tests.fixtures.dockerd import Dockerd, import_image

REPO = Path(__file__).resolve().parent.parent

MANIFEST = ArchiveManifest(
    images=(
        ImageEntry("azaion/app:1.2", "sha256:" + "a" * 64, "azaion/app", True),
        ImageEntry("sha256:" + "b" * 64, "sha256:" + "b" * 64, None, False),
    ),
    created="2026-01-01T00:00:00+00:00",
)


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("piece_size", [1, 7, 64, 100_000])
def test_splitter_returns_manifest_then_exactly_the_tar(piece_size: int) -> None:
    tar = os.urandom(5000)
    payload = payload_head(MANIFEST) + tar
    splitter = PayloadSplitter(pieces_of(payload, piece_size))

    assert splitter.read_manifest() == MANIFEST
    assert b"".join(splitter.tar_chunks()) == tar


def test_manifest_round_trips_through_json() -> None:
    assert ArchiveManifest.decode(MANIFEST.encode()) == MANIFEST


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not an images payload at all", "does not hold Docker images"),
        (PAYLOAD_MAGIC + (10).to_bytes(4, "big") + b"{}", "ends inside its manifest"),
        (PAYLOAD_MAGIC + (2).to_bytes(4, "big") + b"{}", "version"),
        (PAYLOAD_MAGIC + (2**31).to_bytes(4, "big"), "implausibly large"),
        (PAYLOAD_MAGIC + (3).to_bytes(4, "big") + b"{x}", "not valid JSON"),
    ],
)
def test_splitter_refuses_what_is_not_an_images_payload(payload: bytes, message: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=message):
        PayloadSplitter([payload]).read_manifest()


def test_stream_write_returns_size_and_digest_and_sets_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "archive.enc"
    target.write_bytes(b"old")
    pieces = [b"new ", b"", b"data" * 1000]

    size, digest = write_stream_atomically(target, iter(pieces), mode=0o644)

    assert target.read_bytes() == b"".join(pieces)
    assert (size, digest) == (
        len(target.read_bytes()),
        hashlib.sha256(b"".join(pieces)).hexdigest(),
    )
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [target]


def test_stream_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "archive.enc"
    target.write_bytes(b"old")

    def pieces() -> Iterator[bytes]:
        yield b"new data"
        raise OSError(28, "No space left on device")

    with pytest.raises(LoaderError, match="No space left"):
        write_stream_atomically(target, pieces())
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def decrypt_payload(archive: Path, fragments: list[bytes]) -> tuple[ArchiveManifest, bytes]:
    return decrypt_payload_bytes(archive.read_bytes(), fragments)


def decrypt_payload_bytes(data: bytes, fragments: list[bytes]) -> tuple[ArchiveManifest, bytes]:
    splitter = PayloadSplitter(decrypt_iter(pieces_of(data, 65536), fragments))
    manifest = splitter.read_manifest()
    return manifest, b"".join(splitter.tar_chunks())


@pytest.mark.docker
def test_pack_images_writes_an_encrypted_archive_of_docker_save(
    dockerd: Dockerd, tmp_path: Path
) -> None:
    image_id = import_image(dockerd.client, "azaion/test-pack:1.0")
    fragment = keys.generate_fragment()
    archive = tmp_path / "images.enc"

    with ImageEngine.connect(dockerd.host) as engine:
        result = pack_images(engine, ["azaion/test-pack:1.0"], archive, [fragment])

    raw = archive.read_bytes()
    assert result.archive_size == len(raw)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [archive]  # no temp file left
    # Nothing about the images is readable in the clear.
    for clear in (b"azaion/test-pack", image_id.encode(), b"manifest.json", b"busybox"):
        assert clear not in raw
    manifest, tar = decrypt_payload(archive, [fragment])
    assert manifest.images == (
        ImageEntry("azaion/test-pack:1.0", image_id, "azaion/test-pack", True),
    )
    with tarfile.open(fileobj=io.BytesIO(tar)) as saved:
        assert "manifest.json" in saved.getnames()
        assert b"azaion/test-pack:1.0" in saved.extractfile("manifest.json").read()  # type: ignore[union-attr]


def run_cli(*args: str, docker_host: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_HOST": docker_host}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.docker
def test_pack_images_cli_with_device_fragment(dockerd: Dockerd, tmp_path: Path) -> None:
    import_image(dockerd.client, "azaion/test-pack:cli")
    archive, api_file, device_file = (
        tmp_path / "images.enc",
        tmp_path / "api.key",
        tmp_path / "device.key",
    )
    args = ["pack-images", "--out", str(archive), "--fragment-out", str(api_file)]

    done = run_cli(
        *args,
        "--device-fragment",
        str(device_file),
        "azaion/test-pack:cli",
        docker_host=dockerd.host,
    )

    assert done.returncode == 0, done.stderr
    assert "azaion/test-pack:cli" in done.stdout
    assert stat.S_IMODE(api_file.stat().st_mode) == 0o600
    api_fragment = keys.read_fragment_file(api_file)
    device_fragment = keys.read_fragment_file(device_file)
    assert api_fragment.hex() not in done.stdout + done.stderr
    with pytest.raises(WrongKeyError):
        decrypt_payload(archive, [api_fragment])
    manifest, _ = decrypt_payload(archive, [api_fragment, device_fragment])
    assert [image.ref for image in manifest.images] == ["azaion/test-pack:cli"]

    again = run_cli(*args, "azaion/test-pack:cli", docker_host=dockerd.host)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert keys.read_fragment_file(api_file) == api_fragment


@pytest.mark.docker
def test_pack_images_cli_unknown_image_fails_cleanly(dockerd: Dockerd, tmp_path: Path) -> None:
    archive = tmp_path / "images.enc"
    done = run_cli(
        "pack-images",
        "--out",
        str(archive),
        "--fragment-out",
        str(tmp_path / "api.key"),
        "azaion/no-such-image:1",
        docker_host=dockerd.host,
    )
    assert done.returncode == 1
    assert "azaion/no-such-image:1" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.docker
def test_pack_images_signs_in_the_same_pass(dockerd: Dockerd, tmp_path: Path) -> None:
    """--sign-key: the archive ends with a block over exactly the stream before it, that a
    device trusting the key verifies, and the payload's manifest carries the release."""
    import_image(dockerd.client, "azaion/test-pack:signed")
    key = tmp_path / "publisher.key"
    signing.write_key_pair(key)
    archive, api_file = tmp_path / "images.enc", tmp_path / "api.key"
    args = ["pack-images", "--out", str(archive), "--fragment-out", str(api_file)]

    unreleased = run_cli(*args, "--sign-key", str(key), "azaion/test-pack:signed",
                         docker_host=dockerd.host)  # fmt: skip
    assert unreleased.returncode == 2 and "--release" in unreleased.stderr
    assert not archive.exists()

    done = run_cli(*args, "--sign-key", str(key), "--release", "12", "azaion/test-pack:signed",
                   docker_host=dockerd.host)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "signed as release 12" in done.stdout
    with archive.open("rb") as file:
        size, block = signing.split_archive(file)
        stream_bytes = file.read(size)
    assert block is not None and block.statement.release == 12
    manifest, _ = decrypt_payload_bytes(stream_bytes, [keys.read_fragment_file(api_file)])
    assert manifest.release == 12
    measured = signing.Statement(
        signing.Kind.ARCHIVE,
        bytes(8),
        0,
        size,
        hashlib.sha256(stream_bytes).digest(),
        hashlib.sha256(manifest.encode()).digest(),
    )
    signing.TrustStore.load(tmp_path).verify(block, measured, "the archive")
