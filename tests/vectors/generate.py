"""Generate the stream format's test vectors from fixed inputs (docs/format.md, "Test vectors").

    .venv/bin/python -m tests.vectors.generate [--out DIR]

Writes ``stream_v1.json`` (the index) and one ``<name>.bin`` ciphertext per vector. The output
is deterministic: fixed fragments, fixed salts, and a fixed plaintext pattern (byte i is
``i % 251``). Positive vectors come from the encryptor; negative ones are built here by
editing or re-sealing positive ones, each with the error class a decryptor must raise.
tests/test_stream_vectors.py checks that the committed files equal this script's output.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent import stream
from agent.keys import derive_stream_keys

HERE = Path(__file__).resolve().parent
INDEX_NAME = "stream_v1.json"

FRAGMENT_A = bytes(range(0x00, 0x20))
FRAGMENT_B = bytes(range(0x20, 0x40))
WRONG_FRAGMENT = bytes(range(0x40, 0x60))
SALT = bytes(range(0xA0, 0xC0))
SMALL_CHUNK_SIZE = 1024  # keeps the many-chunk and negative vectors small

# Header field offsets (docs/format.md, "Header").
VERSION_OFFSET = len(stream.MAGIC)
CHUNK_SIZE_OFFSET = VERSION_OFFSET + 1
SALT_OFFSET = CHUNK_SIZE_OFFSET + 1
KEY_CHECK_OFFSET = SALT_OFFSET + 32
MAC_OFFSET = KEY_CHECK_OFFSET + 16


def pattern(length: int) -> bytes:
    """The plaintext of every vector: byte i is i mod 251 (a prime, so chunks differ)."""
    return bytes(i % 251 for i in range(length))


@dataclass
class Vector:
    name: str
    description: str
    ciphertext: bytes
    fragments: list[bytes] = field(default_factory=lambda: [FRAGMENT_A])
    error: str | None = None  # the StreamError subclass a decryptor must raise
    plaintext_length: int | None = None  # positive vectors: plaintext is pattern(length)
    chunk_size: int | None = None  # positive vectors: encryptor input, with SALT
    encrypt_fragments: list[bytes] | None = None

    def index_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "name": self.name,
            "description": self.description,
            "file": f"{self.name}.bin",
            "ciphertext_size": len(self.ciphertext),
            "ciphertext_sha256": hashlib.sha256(self.ciphertext).hexdigest(),
            "decrypt_fragments": [base64.b64encode(f).decode() for f in self.fragments],
        }
        if self.error is None:
            entry["plaintext_length"] = self.plaintext_length
            entry["encrypt"] = {
                "fragments": [
                    base64.b64encode(f).decode() for f in self.encrypt_fragments or self.fragments
                ],
                "salt": SALT.hex(),
                "chunk_size": self.chunk_size,
            }
        else:
            entry["error"] = self.error
        return entry


def encrypt(plaintext: bytes, chunk_size: int, fragments: list[bytes]) -> bytes:
    encryptor = stream.Encryptor._from_parts(fragments, SALT, chunk_size)
    return encryptor.update(plaintext) + encryptor.finalize()


def seal_chunks(chunks: list[tuple[bytes, bool]]) -> bytes:
    """A stream of 1 KiB chunks sealed one by one with chosen final flags (malformed ones)."""
    keys = derive_stream_keys([FRAGMENT_A], SALT)
    header = stream.make_header(keys, SALT, SMALL_CHUNK_SIZE.bit_length() - 1).pack()
    aead = AESGCM(keys.payload_key)
    sealed = [
        aead.encrypt(stream.nonce_for_chunk(index, last), plaintext, None)
        for index, (plaintext, last) in enumerate(chunks)
    ]
    return header + b"".join(sealed)


def positive(
    name: str, description: str, length: int, chunk_size: int, fragments: list[bytes]
) -> Vector:
    return Vector(
        name=name,
        description=description,
        ciphertext=encrypt(pattern(length), chunk_size, fragments),
        fragments=fragments,
        plaintext_length=length,
        chunk_size=chunk_size,
    )


def positive_vectors() -> list[Vector]:
    cs, small = stream.CHUNK_SIZE, SMALL_CHUNK_SIZE
    a, ab = [FRAGMENT_A], [FRAGMENT_A, FRAGMENT_B]
    return [
        positive("empty", "empty plaintext: one empty final chunk", 0, cs, a),
        positive("one_byte", "1 byte", 1, cs, a),
        positive("one_chunk", "exactly one full chunk (a full final chunk)", cs, cs, a),
        positive("one_chunk_plus_one", "one full chunk and a 1-byte final chunk", cs + 1, cs, a),
        positive(
            "many_chunks", "5 full 1 KiB chunks and a 100-byte final one", 5 * small + 100, small, a
        ),
        positive("many_full_chunks", "4 full 1 KiB chunks, the last final", 4 * small, small, a),
        positive("two_fragments", "two key fragments (order does not matter)", 3000, small, ab),
    ]


def records(vector: Vector) -> tuple[bytes, list[bytes]]:
    """Split a positive vector's ciphertext into its header and its chunk records."""
    assert vector.chunk_size is not None
    body = vector.ciphertext[stream.HEADER_SIZE :]
    return vector.ciphertext[: stream.HEADER_SIZE], split(body, vector.chunk_size + stream.TAG_SIZE)


def flip(data: bytes, offset: int) -> bytes:
    """``data`` with the lowest bit of the byte at ``offset`` flipped."""
    changed = bytearray(data)
    changed[offset] ^= 0x01
    return bytes(changed)


def replace_byte(data: bytes, offset: int, value: int) -> bytes:
    changed = bytearray(data)
    changed[offset] = value
    return bytes(changed)


def negative_vectors(by_name: dict[str, Vector]) -> list[Vector]:
    """Malformed streams, each with the error class docs/format.md assigns it."""
    many, full = by_name["many_chunks"], by_name["many_full_chunks"]
    header, chunks = records(many)  # chunks 0-4 full, chunk 5 short and final
    full_chunks = records(full)[1]  # chunks 0-3 full, chunk 3 final
    pieces = split(pattern(5 * SMALL_CHUNK_SIZE + 100), SMALL_CHUNK_SIZE)
    a, ab = [FRAGMENT_A], [FRAGMENT_A, FRAGMENT_B]
    tampered, truncated = "TamperedError", "TruncatedError"
    trailing, unsupported = "TrailingDataError", "UnsupportedFormatError"
    wrong_key = "WrongKeyError"
    cases: list[tuple[str, str, bytes, str, list[bytes]]] = [
        ("bad_tag_chunk_2", "last tag byte of chunk 2 flipped",
         header + join(chunks[:2], flip(chunks[2], -1), chunks[3:]), tampered, a),
        ("bad_data_chunk_0", "first ciphertext byte of chunk 0 flipped",
         header + join([flip(chunks[0], 0)], chunks[1:]), tampered, a),
        ("chunks_swapped", "chunks 1 and 2 swapped",
         header + join(chunks[:1], chunks[2], chunks[1], chunks[3:]), tampered, a),
        ("chunk_duplicated", "chunk 1 repeated",
         header + join(chunks[:2], chunks[1:]), tampered, a),
        ("chunk_dropped", "chunk 1 left out", header + join(chunks[:1], chunks[2:]), tampered, a),
        ("bad_tag_full_final_chunk", "last tag byte of a full final chunk flipped",
         flip(full.ciphertext, -1), tampered, a),
        ("truncated_at_chunk_boundary", "cut after chunk 3 of 6",
         header + join(chunks[:4]), truncated, a),
        ("truncated_mid_chunk", "cut 500 bytes into chunk 3",
         header + join(chunks[:3], chunks[3][:500]), truncated, a),
        ("truncated_in_tag", "cut 10 bytes into chunk 3 (shorter than a tag)",
         header + join(chunks[:3], chunks[3][:10]), truncated, a),
        ("truncated_in_header", "cut inside the header", header[:50], truncated, a),
        ("header_only", "the header and no chunk", header, truncated, a),
        ("empty_input", "no bytes at all", b"", truncated, a),
        ("no_final_chunk_full", "4 full chunks, none flagged final",
         seal_chunks([(p, False) for p in pieces[:4]]), truncated, a),
        ("no_final_chunk_short", "a short last chunk not flagged final",
         seal_chunks([(p, False) for p in pieces]), truncated, a),
        ("two_final_chunks", "full chunks 2 and 3 both flagged final",
         seal_chunks([(p, i >= 2) for i, p in enumerate(pieces[:4])]), trailing, a),
        ("final_chunk_doubled", "a full final chunk repeated",
         full.ciphertext + full_chunks[-1], trailing, a),
        ("trailing_garbage", "7 bytes after a full final chunk",
         full.ciphertext + b"garbage", trailing, a),
        ("trailing_garbage_after_short_final",
         "7 bytes after a short final chunk: the final chunk then fails authentication",
         many.ciphertext + b"garbage", truncated, a),
        ("header_flip_magic", "bit flipped in the magic", flip(many.ciphertext, 3), unsupported, a),
        ("unknown_version", "version byte 2",
         replace_byte(many.ciphertext, VERSION_OFFSET, 2), unsupported, a),
        ("chunk_size_out_of_range", "chunk size 2^30",
         replace_byte(many.ciphertext, CHUNK_SIZE_OFFSET, 30), unsupported, a),
        ("not_a_stream", "a text file", b"hello, this is not a stream\n" * 8, unsupported, a),
        ("header_flip_chunk_size", "chunk size 2^10 changed to 2^11: the header MAC fails",
         flip(many.ciphertext, CHUNK_SIZE_OFFSET), tampered, a),
        ("header_flip_mac", "bit flipped in the header MAC",
         flip(many.ciphertext, MAC_OFFSET + 5), tampered, a),
        ("header_flip_salt", "bit flipped in the salt: indistinguishable from a wrong key",
         flip(many.ciphertext, SALT_OFFSET + 7), wrong_key, a),
        ("header_flip_key_check", "bit flipped in the key check: reads as a wrong key",
         flip(many.ciphertext, KEY_CHECK_OFFSET), wrong_key, a),
        ("wrong_fragment", "decrypted with another fragment",
         many.ciphertext, wrong_key, [WRONG_FRAGMENT]),
        ("missing_fragment", "a two-fragment stream, one fragment given",
         by_name["two_fragments"].ciphertext, wrong_key, a),
        ("extra_fragment", "a one-fragment stream, two fragments given",
         many.ciphertext, wrong_key, ab),
    ]  # fmt: skip
    return [
        Vector(name, description, data, fragments=fragments, error=error)
        for name, description, data, error, fragments in cases
    ]


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def join(*groups: list[bytes] | bytes) -> bytes:
    return b"".join(group if isinstance(group, bytes) else b"".join(group) for group in groups)


def all_vectors() -> list[Vector]:
    positives = positive_vectors()
    return positives + negative_vectors({v.name: v for v in positives})


def write_vectors(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vectors = all_vectors()
    for vector in vectors:
        (out / f"{vector.name}.bin").write_bytes(vector.ciphertext)
    index = {
        "format": "azaion-loader encrypted stream, version 1 (docs/format.md)",
        "plaintext": "byte i of a plaintext of length n is i % 251",
        "vectors": [vector.index_entry() for vector in vectors],
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory (default: this one)")
    write_vectors(parser.parse_args().out)


if __name__ == "__main__":
    main()
