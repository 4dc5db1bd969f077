"""The stream format's test vectors (tests/vectors/, made by tests/vectors/generate.py).

Positive vectors must decrypt to their plaintext, re-encrypt to the same bytes from the same
fixed inputs, and decode with a reference decoder written from docs/format.md alone. Negative
vectors must fail with exactly their documented error class, however the input is fed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent import errors, stream
from tests.vectors import generate

VECTORS_DIR = Path(__file__).parent / "vectors"
INDEX = json.loads((VECTORS_DIR / generate.INDEX_NAME).read_text())
POSITIVE = [v for v in INDEX["vectors"] if "error" not in v]
NEGATIVE = [v for v in INDEX["vectors"] if "error" in v]


def ciphertext_of(vector: dict[str, Any]) -> bytes:
    data: bytes = (VECTORS_DIR / vector["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == vector["ciphertext_sha256"]
    return data


def fragments_of(encoded: list[str]) -> list[bytes]:
    return [base64.b64decode(text) for text in encoded]


def feed(data: bytes, piece_size: int, fragments: list[bytes]) -> bytes:
    pieces = [data[i : i + piece_size] for i in range(0, len(data), piece_size)]
    return b"".join(stream.decrypt_iter(pieces, fragments))


def test_vector_set_covers_the_issue() -> None:
    names = {v["name"] for v in INDEX["vectors"]}
    required = {
        "empty", "one_byte", "one_chunk", "one_chunk_plus_one", "many_chunks", "bad_tag_chunk_2",
        "truncated_at_chunk_boundary", "truncated_mid_chunk", "no_final_chunk_full",
        "two_final_chunks", "trailing_garbage", "header_flip_mac", "wrong_fragment",
        "unknown_version",
    }  # fmt: skip
    assert required <= names
    assert {v["error"] for v in NEGATIVE} == {
        "WrongKeyError", "TamperedError", "TruncatedError", "TrailingDataError",
        "UnsupportedFormatError",
    }  # fmt: skip


def test_committed_vectors_equal_the_generator_output(tmp_path: Path) -> None:
    generate.write_vectors(tmp_path)
    committed = sorted(p.name for p in VECTORS_DIR.iterdir() if p.suffix in {".bin", ".json"})
    assert sorted(p.name for p in tmp_path.iterdir()) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (VECTORS_DIR / name).read_bytes(), name


@pytest.mark.parametrize("vector", POSITIVE, ids=lambda v: v["name"])
@pytest.mark.parametrize("piece_size", [1 << 20, 1000, 17])
def test_positive_vector_decrypts(vector: dict[str, Any], piece_size: int) -> None:
    plaintext = feed(ciphertext_of(vector), piece_size, fragments_of(vector["decrypt_fragments"]))
    assert plaintext == generate.pattern(vector["plaintext_length"])


@pytest.mark.parametrize("vector", POSITIVE, ids=lambda v: v["name"])
def test_positive_vector_reencrypts_to_the_same_bytes(vector: dict[str, Any]) -> None:
    parts = vector["encrypt"]
    encryptor = stream.Encryptor._from_parts(
        fragments_of(parts["fragments"]), bytes.fromhex(parts["salt"]), parts["chunk_size"]
    )
    plaintext = generate.pattern(vector["plaintext_length"])
    assert encryptor.update(plaintext) + encryptor.finalize() == ciphertext_of(vector)
    assert len(ciphertext_of(vector)) == stream.ciphertext_size(
        len(plaintext), chunk_size=parts["chunk_size"]
    )


@pytest.mark.parametrize("vector", POSITIVE, ids=lambda v: v["name"])
def test_positive_vector_decodes_with_the_spec_reference_decoder(vector: dict[str, Any]) -> None:
    plaintext = reference_decrypt(ciphertext_of(vector), fragments_of(vector["decrypt_fragments"]))
    assert plaintext == generate.pattern(vector["plaintext_length"])


@pytest.mark.parametrize("vector", NEGATIVE, ids=lambda v: v["name"])
@pytest.mark.parametrize("piece_size", [1 << 20, 1000, 1])
def test_negative_vector_fails_with_its_error_class(
    vector: dict[str, Any], piece_size: int
) -> None:
    expected = getattr(errors, vector["error"])
    with pytest.raises(errors.StreamError) as caught:
        feed(ciphertext_of(vector), piece_size, fragments_of(vector["decrypt_fragments"]))
    assert type(caught.value) is expected, str(caught.value)


@pytest.mark.parametrize("vector", NEGATIVE, ids=lambda v: v["name"])
def test_negative_vector_writes_no_unverified_byte(vector: dict[str, Any]) -> None:
    sink = io.BytesIO()
    source = io.BytesIO(ciphertext_of(vector))
    with pytest.raises(getattr(errors, vector["error"])):
        stream.decrypt_file(source, sink, fragments_of(vector["decrypt_fragments"]))
    # Whatever reached the sink is verified plaintext: a prefix of the original's.
    assert generate.pattern(len(sink.getvalue())) == sink.getvalue()


def reference_decrypt(data: bytes, fragments: list[bytes]) -> bytes:
    """docs/format.md, transcribed without agent.stream or agent.keys (positive path only)."""
    assert data[:8] == b"\x89AZS\r\n\x1a\n" and data[8] == 1
    chunk_size = 1 << data[9]
    salt, key_check, mac = data[10:42], data[42:58], data[58:90]
    ikm = bytes([len(fragments)]) + b"".join(
        len(f).to_bytes(2, "big") + f for f in sorted(fragments)
    )
    okm = HKDF(hashes.SHA256(), 80, salt, b"azaion-stream v1 keys").derive(ikm)
    payload_key, header_key = okm[:32], okm[32:64]
    assert okm[64:80] == key_check
    assert hmac.digest(header_key, data[:58], "sha256") == mac
    aead, record, body = AESGCM(payload_key), chunk_size + 16, data[90:]
    chunks = [body[i : i + record] for i in range(0, len(body), record)]
    return b"".join(
        aead.decrypt(i.to_bytes(11, "big") + bytes([i == len(chunks) - 1]), chunk, None)
        for i, chunk in enumerate(chunks)
    )
