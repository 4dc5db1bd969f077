"""Publisher signatures (agent/signing.py; docs/format.md, "Publisher signatures").

The committed vectors must equal their generator's output; each must verify, or fail with the
reason it documents, against a trust store holding only the vectors' publisher key; the
positive ones must also verify with a reference verifier written from docs/format.md alone.
Key files, the trust store and the manifest's release are checked on real files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import signing, stream
from agent.archive import ArchiveManifest, PayloadSplitter
from agent.errors import ConfigError, ConflictError, SignatureError, UnsupportedFormatError
from agent.resources import SmallPart
from tests.test_cli_crypto import assert_failed_with_one_line, cli
from tests.vectors import generate, generate_signatures

VECTORS_DIR = generate_signatures.OUT
INDEX = json.loads((VECTORS_DIR / generate_signatures.INDEX_NAME).read_text())
VECTORS = INDEX["vectors"]


def data_of(vector: dict[str, Any]) -> bytes:
    data = (VECTORS_DIR / vector["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == vector["sha256"]
    return data


def trusting_the_publisher(tmp_path: Path) -> signing.TrustStore:
    keys = tmp_path / "publishers.d"
    keys.mkdir()
    (keys / "publisher.pub").write_bytes((VECTORS_DIR / "publisher.pub").read_bytes())
    return signing.TrustStore.load(keys)


def check(vector: dict[str, Any], store: signing.TrustStore) -> None:
    """Verify a vector the way a device does: the block, then the bytes it covers."""
    data = data_of(vector)
    kind = signing.Kind[vector["kind"].upper()]
    if kind is signing.Kind.ARCHIVE:
        size, block = signing.split_archive(io.BytesIO(data))
        digest = hashlib.sha256(data[:size]).digest()
    else:
        small = SmallPart.unpack(data)
        big = big_of(vector)
        assert (len(big), hashlib.sha256(big).digest()) == (small.big_size, small.big_sha256)
        block = small.signature
        size, digest = signing.resource_ciphertext(small.head, len(big), small.big_sha256)
    measured = signing.Statement.measured(
        kind, size, digest, hashlib.sha256(vector["manifest"].encode()).digest()
    )
    store.verify(block, measured, vector["name"])


def big_of(vector: dict[str, Any]) -> bytes:
    big = (VECTORS_DIR / vector["big_file"]).read_bytes()
    assert hashlib.sha256(big).hexdigest() == vector["big_sha256"]
    return big


def test_committed_vectors_equal_the_generator_output(tmp_path: Path) -> None:
    generate_signatures.write_vectors(tmp_path)
    committed = sorted(p.name for p in VECTORS_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (VECTORS_DIR / name).read_bytes(), name


def test_vector_set_covers_the_issue() -> None:
    names = {vector["name"] for vector in VECTORS}
    assert {
        "signed_archive", "signed_resource", "wrong_key", "truncated_after_signing",
        "extended_after_signing",
    } <= names  # fmt: skip
    assert {vector["verify"] for vector in VECTORS} >= {"ok", "not signed", "does not verify"}


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_each_vector_verifies_or_fails_with_its_reason(
    vector: dict[str, Any], tmp_path: Path
) -> None:
    store = trusting_the_publisher(tmp_path)
    assert store.enforced and store.key_names() == [INDEX["publisher_key_id"]]
    if vector["verify"] == "ok":
        check(vector, store)
    else:
        with pytest.raises(SignatureError, match=vector["verify"]) as failure:
            check(vector, store)
        assert (
            "not signed" in str(failure.value)
            or vector["name"] in str(failure.value)
            or ("archive is" in str(failure.value))
        )


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_without_installed_keys_only_a_trusted_signature_is_checked(
    vector: dict[str, Any], tmp_path: Path
) -> None:
    """No key installed: signatures are not enforced, so unsigned and unknown-key archives
    pass; the size check of a block still applies (it is about the archive's own bytes)."""
    store = signing.TrustStore.load(tmp_path / "absent")
    assert not store.enforced and not store.keys
    if vector["verify"] == "truncated or extended":
        with pytest.raises(SignatureError):
            check(vector, store)
    else:
        check(vector, store)


def reference_verify(vector: dict[str, Any]) -> int:
    """From docs/format.md alone: find the block, rebuild the statement, verify; the release."""
    data = data_of(vector)
    block_size = 8 + 1 + 1 + 8 + 8 + 8 + 32 + 32 + 64
    if vector["kind"] == "archive":
        block, ciphertext = data[-block_size:], data[:-block_size]
        measured = len(ciphertext), hashlib.sha256(ciphertext).digest()
    else:
        block, head, big = reference_resource_parts(data, big_of(vector))
        measured = (
            len(head) + len(big),
            hashlib.sha256(hashlib.sha256(head).digest() + hashlib.sha256(big).digest()).digest(),
        )
    assert block[:8] == b"\x89AZG\r\n\x1a\n" and block[8] == 1
    kind, key_id, release, size, digest, manifest = struct.unpack(">B8sQQ32s32s", block[9:98])
    assert kind == {"archive": 1, "resource": 2}[vector["kind"]]
    assert (size, digest) == measured
    assert manifest == hashlib.sha256(vector["manifest"].encode()).digest()
    line = (VECTORS_DIR / "publisher.pub").read_text().split()
    raw = base64.b64decode(line[1])
    assert line[0] == "azaion-publisher-ed25519" and key_id == hashlib.sha256(raw).digest()[:8]
    statement = b"azaion-loader signature v1\n" + block[9:98]
    Ed25519PublicKey.from_public_bytes(raw).verify(block[98:], statement)
    return int(release)


def reference_resource_parts(small: bytes, big: bytes) -> tuple[bytes, bytes, bytes]:
    """From docs/format.md alone: a signed small part's block and head, and the big part;
    the two parts' fragments open the stream they make together."""
    assert small[:4] == b"AZSP" and small[4] == 2
    (fragment_length,) = struct.unpack_from(">H", small, 5)
    fragment_a, offset = small[7 : 7 + fragment_length], 7 + fragment_length
    big_size, big_sha256, name_length = struct.unpack_from(">Q32sB", small, offset)
    offset += 41 + name_length
    (head_length,) = struct.unpack_from(">I", small, offset)
    head, offset = small[offset + 4 : offset + 4 + head_length], offset + 4 + head_length
    (block_length,) = struct.unpack_from(">H", small, offset)
    block = small[offset + 2 : offset + 2 + block_length]
    assert offset + 2 + block_length == len(small) and block_length == 162
    assert (big_size, big_sha256) == (len(big), hashlib.sha256(big).digest())
    fragment_b, rest = big[1 : 1 + big[0]], big[1 + big[0] :]
    plaintext = b"".join(stream.decrypt_iter([head + rest], [fragment_a, fragment_b]))
    assert plaintext == generate.pattern(len(plaintext))
    return block, head, big


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["verify"] == "ok"], ids=lambda v: v["name"]
)
def test_positive_vectors_verify_with_a_reference_verifier(vector: dict[str, Any]) -> None:
    assert reference_verify(vector) == INDEX["release"]
    assert json.loads(vector["manifest"])["release"] == INDEX["release"]


def test_the_signed_archive_holds_the_signed_manifest() -> None:
    """The manifest a block covers is the one inside the encrypted payload."""
    vector = next(v for v in VECTORS if v["name"] == "signed_archive")
    data = data_of(vector)
    size, block = signing.split_archive(io.BytesIO(data))
    assert block is not None and block.statement.release == INDEX["release"]
    plaintext = stream.decrypt_iter([data[:size]], [generate.FRAGMENT_A])
    manifest = PayloadSplitter(plaintext).read_manifest()
    assert manifest.encode() == vector["manifest"].encode()
    assert manifest.release == block.statement.release


# -- key files ------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads_and_a_public_line(tmp_path: Path) -> None:
    out = tmp_path / "publisher.key"
    public = signing.write_key_pair(out, "release team 2026")
    assert os.stat(out).st_mode & 0o777 == 0o600
    pub_path = tmp_path / "publisher.key.pub"
    assert os.stat(pub_path).st_mode & 0o777 == 0o644
    assert signing.read_public_key(pub_path) == public
    assert pub_path.read_text().startswith("azaion-publisher-ed25519 ")
    key = signing.read_private_key(out)
    assert signing.public_key_of(key).raw == public.raw
    digest = hashlib.sha256(b"ciphertext").digest()
    block = signing.sign(key, signing.Kind.RESOURCE, 3, 10, digest, digest)
    store = signing.TrustStore.load(tmp_path)
    store.verify(
        signing.SignatureBlock.unpack(block.pack()),
        signing.Statement(signing.Kind.RESOURCE, bytes(8), 0, 10, digest, digest),
        "a resource",
    )


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    out = tmp_path / "publisher.key"
    signing.write_key_pair(out)
    before = out.read_bytes()
    with pytest.raises(ConflictError, match="never overwritten"):
        signing.write_key_pair(out)
    assert out.read_bytes() == before
    (tmp_path / "other.key.pub").write_text("x")
    with pytest.raises(ConflictError):
        signing.write_key_pair(tmp_path / "other.key")
    assert not (tmp_path / "other.key").exists()


def test_a_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "publisher.key"
    signing.write_key_pair(out)
    out.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others") as failure:
        signing.read_private_key(out)
    assert "PRIVATE KEY" not in str(failure.value)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an unencrypted"),
        (b"\x00" * (signing.MAX_PRIVATE_KEY_FILE + 1), "larger than"),
    ],
)
def test_a_bad_private_key_file_is_one_clear_error(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=reason):
        signing.read_private_key(path)


@pytest.mark.parametrize(
    "line, reason",
    [
        ("ssh-ed25519 AAAA", "not a publisher public key"),
        ("azaion-publisher-ed25519 !!!", "not valid base64"),
        ("azaion-publisher-ed25519 " + base64.b64encode(bytes(31)).decode(), "32 bytes"),
        ("azaion-publisher-ed25519 " + base64.b64encode(bytes(32)).decode() + " a\x1bb", "control"),
    ],
)
def test_a_bad_public_key_line_says_what_is_wrong(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        signing.PublicKey.from_line(line)


def test_a_broken_key_file_fails_closed(tmp_path: Path) -> None:
    """A key file that cannot be read still means "signatures required": it trusts nothing."""
    (tmp_path / "broken.pub").write_text("not a key\n")
    (tmp_path / "notes.txt").write_text("ignored: not *.pub")
    store = signing.TrustStore.load(tmp_path)
    assert store.enforced and not store.keys
    assert len(store.problems) == 1 and "broken.pub" in store.problems[0]
    with pytest.raises(SignatureError, match="not signed"):
        store.verify(
            None, signing.Statement(signing.Kind.ARCHIVE, bytes(8), 0, 0, bytes(32), bytes(32)), "x"
        )


def test_the_trust_store_reads_a_bounded_number_of_keys(tmp_path: Path) -> None:
    for index in range(signing.MAX_TRUSTED_KEYS + 2):
        key = signing.PublicKey(hashlib.sha256(bytes([index])).digest())
        (tmp_path / f"k{index:03}.pub").write_text(key.to_line())
    store = signing.TrustStore.load(tmp_path)
    assert len(store.keys) == signing.MAX_TRUSTED_KEYS
    assert any("only the first" in problem for problem in store.problems)


def test_a_block_of_another_version_or_shape_is_refused() -> None:
    digest = bytes(32)
    block = signing.SignatureBlock(
        signing.Statement(signing.Kind.ARCHIVE, bytes(8), 1, 0, digest, digest), bytes(64)
    ).pack()
    with pytest.raises(SignatureError, match="version 2"):
        signing.SignatureBlock.unpack(block[:8] + b"\x02" + block[9:])
    with pytest.raises(SignatureError, match="malformed"):
        signing.SignatureBlock.unpack(block[:9] + b"\x09" + block[10:])
    with pytest.raises(SignatureError, match="162 bytes"):
        signing.SignatureBlock.unpack(block[:-1])


# -- the manifest's release -----------------------------------------------------------------------


def test_a_manifest_without_release_reads_as_release_0() -> None:
    old = b'{"created":"","images":[{"ref":"a:1","id":"sha256:00"}],"version":1}'
    assert ArchiveManifest.decode(old).release == 0


@pytest.mark.parametrize("release", ['"7"', "-1", "true", "1e3", str(2**63)])
def test_a_manifest_with_a_bad_release_is_refused(release: str) -> None:
    data = f'{{"images":[{{"ref":"a:1","id":"sha256:00"}}],"release":{release},"version":1}}'
    with pytest.raises(UnsupportedFormatError, match="release"):
        ArchiveManifest.decode(data.encode())


def test_publisher_keygen_cli_prints_the_public_line_and_refuses_to_overwrite(
    tmp_path: Path,
) -> None:
    out = tmp_path / "publisher.key"
    made = cli("publisher-keygen", "--out", out, "--comment", "release team")
    assert made.returncode == 0, made.stderr
    printed = made.stdout.decode().splitlines()
    assert printed[0] + "\n" == (tmp_path / "publisher.key.pub").read_text()
    public = signing.read_public_key(tmp_path / "publisher.key.pub")
    assert public.comment == "release team" and public.name in printed[1]
    assert signing.public_key_of(signing.read_private_key(out)).raw == public.raw
    before = out.read_bytes()
    again = cli("publisher-keygen", "--out", out)
    assert_failed_with_one_line(again, 1)
    assert b"never overwritten" in again.stderr and out.read_bytes() == before


def test_the_current_trust_store_follows_every_change_of_the_key_files(tmp_path: Path) -> None:
    """``TrustStore.current`` (looked at every load) reads again whenever a key file is added,
    removed, rewritten in place or made unreadable, and only then."""
    keys = tmp_path / "publishers.d"
    keys.mkdir()
    assert not signing.TrustStore.current(keys).enforced
    first = signing.write_key_pair(tmp_path / "first.key")
    (keys / "first.pub").write_text(first.to_line())
    store = signing.TrustStore.current(keys)
    assert store.key_names() == [first.name]
    assert signing.TrustStore.current(keys) is store  # unchanged: not read again
    second = signing.write_key_pair(tmp_path / "second.key")
    with (keys / "first.pub").open("r+") as file:  # rewritten in place, same length
        file.write(second.to_line()[: len(first.to_line())].ljust(len(first.to_line())))
    assert signing.TrustStore.current(keys).key_names() == [second.name]
    (keys / "first.pub").write_text("not a key\n")
    broken = signing.TrustStore.current(keys)
    assert broken.enforced and not broken.keys and broken.problems
    (keys / "first.pub").unlink()
    assert not signing.TrustStore.current(keys).enforced
