"""Generate the publisher signature test vectors (docs/format.md, "Publisher signatures").

    .venv/bin/python -m tests.vectors.generate_signatures [--out DIR]

Writes ``signatures/signatures_v1.json`` (the index), the trusted public key and one ``.bin``
per vector. Deterministic: Ed25519 signatures are, and the streams use the stream vectors'
fixed fragments and salt. An archive vector is a whole archive file (stream, then signature
block); a resource vector is its two parts as stored: the small part (the envelope of version
2, which carries the block) in ``<name>.bin`` and the big part in ``<name>.big.bin``.
``verify`` is what a device trusting only the publisher key must conclude: "ok", or the
``SignatureError`` reason it must name.
tests/test_signing.py checks the committed files equal this output and verifies each vector.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import archive, resources, signing, stream
from agent.archive import ArchiveManifest, ImageEntry
from tests.vectors.generate import FRAGMENT_A, FRAGMENT_B, SALT, pattern

OUT = Path(__file__).resolve().parent / "signatures"
INDEX_NAME = "signatures_v1.json"
PUBLISHER_SEED = bytes(range(0x60, 0x80))
OTHER_SEED = bytes(range(0x80, 0xA0))
RELEASE = 7
CHUNK_SIZE = 1024


@dataclass
class SignedVector:
    name: str
    description: str
    kind: signing.Kind
    data: bytes  # archive: the whole file; resource: the small part
    manifest: bytes
    verify: str
    big: bytes | None = None  # resource vectors: the big part

    def index_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "name": self.name,
            "description": self.description,
            "kind": self.kind.name.lower(),
            "file": f"{self.name}.bin",
            "size": len(self.data),
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "manifest": self.manifest.decode("utf-8"),
            "verify": self.verify,
        }
        if self.big is not None:
            entry["big_file"] = f"{self.name}.big.bin"
            entry["big_size"] = len(self.big)
            entry["big_sha256"] = hashlib.sha256(self.big).hexdigest()
        return entry


def publisher() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(PUBLISHER_SEED)


def encrypt(plaintext: bytes, fragments: list[bytes]) -> bytes:
    encryptor = stream.Encryptor._from_parts(fragments, SALT, CHUNK_SIZE)
    return encryptor.update(plaintext) + encryptor.finalize()


def archive_manifest() -> bytes:
    entry = ImageEntry(
        ref="azaion/app:1.2", id="sha256:" + "ab" * 32, repository=None, api_tag=False
    )
    return ArchiveManifest(
        images=(entry,), created="2026-11-30T00:00:00+00:00", release=RELEASE
    ).encode()


def signed_block(
    key: Ed25519PrivateKey, kind: signing.Kind, ciphertext: bytes, manifest: bytes
) -> bytes:
    return signing.sign(
        key,
        kind,
        RELEASE,
        len(ciphertext),
        hashlib.sha256(ciphertext).digest(),
        hashlib.sha256(manifest).digest(),
    ).pack()


def resource_parts(
    key: Ed25519PrivateKey, plaintext: bytes, manifest: bytes
) -> tuple[resources.SmallPart, bytes]:
    """A signed resource's small part and big part, split as the agent splits an upload."""
    whole = encrypt(plaintext, [FRAGMENT_A, FRAGMENT_B])
    head = whole[: resources.HEAD_SIZE]
    big = bytes([len(FRAGMENT_B)]) + FRAGMENT_B + whole[resources.HEAD_SIZE :]
    big_sha256 = hashlib.sha256(big).digest()
    size, digest = signing.resource_ciphertext(head, len(big), big_sha256)
    block = signing.sign(
        key, signing.Kind.RESOURCE, RELEASE, size, digest, hashlib.sha256(manifest).digest()
    )
    small = resources.SmallPart(FRAGMENT_A, big_sha256.hex(), len(big), big_sha256, head, block)
    return small, big


def all_vectors() -> list[SignedVector]:
    key, other = publisher(), Ed25519PrivateKey.from_private_bytes(OTHER_SEED)
    manifest = archive_manifest()
    payload = archive.PAYLOAD_MAGIC + len(manifest).to_bytes(4, "big") + manifest + pattern(5000)
    stream_bytes = encrypt(payload, [FRAGMENT_A])
    block = signed_block(key, signing.Kind.ARCHIVE, stream_bytes, manifest)
    cut = stream_bytes[: -(CHUNK_SIZE + stream.TAG_SIZE)]
    resource_manifest = signing.resource_manifest("models", "detector.onnx", 10000, RELEASE)
    small, big = resource_parts(key, pattern(10000), resource_manifest)
    renamed = signing.resource_manifest("models", "tracker.onnx", 10000, RELEASE)
    head = bytearray(small.head)
    head[-1] ^= 0x01
    altered = resources.SmallPart(
        small.fragment, small.big_name, small.big_size, small.big_sha256, bytes(head),
        small.signature,
    )  # fmt: skip
    as_resource = signed_block(key, signing.Kind.RESOURCE, stream_bytes, manifest)
    forged = bytearray(block)
    forged[-1] ^= 0x01
    impostor = signing.sign(
        other, signing.Kind.ARCHIVE, RELEASE, len(stream_bytes),
        hashlib.sha256(stream_bytes).digest(), hashlib.sha256(manifest).digest(),
    )  # fmt: skip
    claims_trusted = signing.SignatureBlock(
        signing.Statement(
            signing.Kind.ARCHIVE,
            signing.key_id_of(signing.public_key_of(key).raw),
            RELEASE,
            len(stream_bytes),
            hashlib.sha256(stream_bytes).digest(),
            hashlib.sha256(manifest).digest(),
        ),
        impostor.signature,
    ).pack()
    archive_kind, resource_kind = signing.Kind.ARCHIVE, signing.Kind.RESOURCE
    return [
        SignedVector("signed_archive", "an archive signed by the publisher", archive_kind,
                     stream_bytes + block, manifest, "ok"),
        SignedVector("signed_resource", "a resource's two parts, the block in its small part",
                     resource_kind, small.pack(), resource_manifest, "ok", big),
        SignedVector("resource_under_another_name",
                     "the signed resource's parts published under another name",
                     resource_kind, small.pack(), renamed, "manifest other than", big),
        SignedVector("resource_head_altered",
                     "the small part's last ciphertext byte flipped, the block kept",
                     resource_kind, altered.pack(), resource_manifest, "altered after signing",
                     big),
        SignedVector("unsigned_archive", "the same archive without a block", archive_kind,
                     stream_bytes, manifest, "not signed"),
        SignedVector("wrong_key", "signed by a key the device does not trust", archive_kind,
                     stream_bytes + impostor.pack(), manifest, "does not trust"),
        SignedVector("wrong_key_claiming_trusted_id",
                     "another key's signature under the trusted key's id", archive_kind,
                     stream_bytes + claims_trusted, manifest, "does not verify"),
        SignedVector("signature_damaged", "the signature's last bit flipped", archive_kind,
                     stream_bytes + bytes(forged), manifest, "does not verify"),
        SignedVector("truncated_after_signing", "the last chunk removed, the block kept",
                     archive_kind, cut + block, manifest, "truncated or extended"),
        SignedVector("extended_after_signing", "a chunk's worth of bytes inserted before the block",
                     archive_kind, stream_bytes + bytes(CHUNK_SIZE + stream.TAG_SIZE) + block,
                     manifest, "truncated or extended"),
        SignedVector("resource_signature_on_archive",
                     "the archive's bytes signed as a resource", archive_kind,
                     stream_bytes + as_resource, manifest, "signature for resource"),
    ]  # fmt: skip


def write_vectors(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vectors = all_vectors()
    for vector in vectors:
        (out / f"{vector.name}.bin").write_bytes(vector.data)
        if vector.big is not None:
            (out / f"{vector.name}.big.bin").write_bytes(vector.big)
    public = signing.public_key_of(publisher(), "vectors")
    (out / "publisher.pub").write_text(public.to_line())
    index = {
        "format": "azaion-loader publisher signatures, version 1 (docs/format.md)",
        "publisher_seed": PUBLISHER_SEED.hex(),
        "publisher_key_id": public.name,
        "stream": {"fragments": "stream vectors' A (archive) and A, B (resource)",
                   "salt": SALT.hex(), "chunk_size": CHUNK_SIZE},
        "release": RELEASE,
        "vectors": [vector.index_entry() for vector in vectors],
    }  # fmt: skip
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="directory (default: signatures/)")
    write_vectors(parser.parse_args().out)


if __name__ == "__main__":
    main()
