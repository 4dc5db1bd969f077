"""Publisher signatures: who made a release, checked against the keys a device trusts.

The Resource API holds the key fragments, so whoever controls it could encrypt an archive
every device would open. A publisher signature closes that: the publisher signs what it
produces with an Ed25519 key only it holds (``azaion-loader publisher-keygen``), and a device
that trusts at least one publisher key (``LOADER_PUBLISHERS_DIR``, by default
``/etc/azaion-loader/publishers.d/*.pub``) refuses anything not signed by one of them.

A signature covers a *statement* (docs/format.md, "Publisher signatures"):

    statement = DOMAIN || u8 kind || key_id (8) || u64be release
                || u64be ciphertext_size || ciphertext_sha256 (32) || manifest_sha256 (32)
    signature = Ed25519(private_key, statement)                            (64 bytes)

``kind`` says what was signed (an images archive or a resource), so a signature over one can
never pass for the other; ``release`` is the publisher's release number (anti-rollback);
the ciphertext's length and SHA-256 are computed in the same streaming pass that writes or
reads it; ``manifest_sha256`` binds what the payload says it holds. The signature block
(``SignatureBlock``, 162 bytes) carries the statement's fields and the signature; an archive
ends with it (``split_archive``).

Key files: the private key is PKCS#8 PEM, mode 0600, never read by the agent; the public key
is one line, ``azaion-publisher-ed25519 <base64 of 32 bytes> [comment]``, named by its key id
(the first 8 bytes of the SHA-256 of the raw key, in hex). Reading is bounded: files are read
up to a small limit, and a directory up to ``MAX_TRUSTED_KEYS`` keys.

Nothing here needs a secret of the agent's; error messages name files, key ids and fields,
never key material beyond a public key id.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.durable import write_atomically
from agent.errors import ConfigError, ConflictError, SignatureError

DOMAIN = b"azaion-loader signature v1\n"
BLOCK_MAGIC = b"\x89AZG\r\n\x1a\n"
BLOCK_VERSION = 1
KEY_ID_SIZE = 8
DIGEST_SIZE = 32
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
PUBLIC_KEY_LABEL = "azaion-publisher-ed25519"
PUBLIC_KEY_SUFFIX = ".pub"
MAX_PUBLIC_KEY_FILE = 4096  # one line: the label, 44 characters of base64, a comment
MAX_PRIVATE_KEY_FILE = 16384
MAX_TRUSTED_KEYS = 64
MAX_RELEASE = 2**63 - 1
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644

# kind, key id, release, ciphertext size, ciphertext sha256, manifest sha256
_FIELDS = struct.Struct(f">B{KEY_ID_SIZE}sQQ{DIGEST_SIZE}s{DIGEST_SIZE}s")
_BLOCK_HEAD = struct.Struct(f">{len(BLOCK_MAGIC)}sB")
BLOCK_SIZE = _BLOCK_HEAD.size + _FIELDS.size + SIGNATURE_SIZE


class Kind(IntEnum):
    """What a signature is over; a signature for one kind never verifies as another."""

    ARCHIVE = 1  # an images archive (pack-images)
    RESOURCE = 2  # a resource (upload)


def key_id_of(raw_public_key: bytes) -> bytes:
    """The key id: the first 8 bytes of the SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key).digest()[:KEY_ID_SIZE]


@dataclass(frozen=True)
class PublicKey:
    """A publisher's public key, as a device trusts it."""

    raw: bytes
    comment: str = ""

    @property
    def key_id(self) -> bytes:
        return key_id_of(self.raw)

    @property
    def name(self) -> str:
        """The key id in hex: how messages and ``/status`` name a key."""
        return self.key_id.hex()

    def to_line(self) -> str:
        encoded = base64.b64encode(self.raw).decode("ascii")
        return f"{PUBLIC_KEY_LABEL} {encoded} {self.comment}".rstrip() + "\n"

    @classmethod
    def from_line(cls, text: str) -> PublicKey:
        """Parse one public key line; ``ValueError`` says what is wrong (never echoes it)."""
        fields = text.strip().split(maxsplit=2)
        if len(fields) < 2 or fields[0] != PUBLIC_KEY_LABEL:
            raise ValueError(f"not a publisher public key (expected '{PUBLIC_KEY_LABEL} <key>')")
        try:
            raw = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            raise ValueError("the public key is not valid base64") from None
        if len(raw) != PUBLIC_KEY_SIZE:
            raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, not {len(raw)}")
        comment = fields[2] if len(fields) > 2 else ""
        if not comment.isprintable():
            raise ValueError("the public key's comment holds control characters")
        return cls(raw, comment)

    def verifier(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)


def public_key_of(private_key: Ed25519PrivateKey, comment: str = "") -> PublicKey:
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return PublicKey(raw, comment)


# -- key files ----------------------------------------------------------------------------------


def write_key_pair(out: Path, comment: str = "") -> PublicKey:
    """A new publisher key: ``out`` (private, PKCS#8 PEM, 0600) and ``out.pub`` (public, one
    line). Refuses to overwrite either: a publisher key replaced by accident strands every
    device that trusts the old one."""
    if not comment.isprintable():
        raise ConfigError("the key's comment must be printable text on one line")
    public_path = out.with_name(out.name + PUBLIC_KEY_SUFFIX)
    for path in (out, public_path):
        if os.path.lexists(path):
            raise ConflictError(f"{path} exists; a publisher key is never overwritten")
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = public_key_of(private_key, comment)
    for path, data, mode in (
        (out, pem, PRIVATE_KEY_MODE),
        (public_path, public.to_line().encode("ascii"), PUBLIC_KEY_MODE),
    ):
        try:  # replace=False: a key that appeared meanwhile is not overwritten either
            write_atomically(path, data, replace=False, mode=mode)
        except FileExistsError:
            if path == public_path:
                out.unlink()  # the private key written just now has no public half
            raise ConflictError(f"{path} exists; a publisher key is never overwritten") from None
    return public


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """A publisher's private key (``--sign-key``); ``ConfigError`` naming the file if it is
    missing, too readable, or not an unencrypted Ed25519 PKCS#8 PEM key."""
    data = _read_bounded(path, MAX_PRIVATE_KEY_FILE, "publisher private key")
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"publisher private key {path} is readable by others (mode {mode:04o}); "
            "chmod 600 it, and consider the key exposed"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{path} is not an unencrypted PEM private key (make one with publisher-keygen)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key (make one with publisher-keygen)")
    return key


def read_public_key(path: Path) -> PublicKey:
    data = _read_bounded(path, MAX_PUBLIC_KEY_FILE, "publisher public key")
    try:
        return PublicKey.from_line(data.decode("ascii"))
    except UnicodeDecodeError:
        raise ConfigError(f"publisher public key {path} is not ASCII text") from None
    except ValueError as exc:
        raise ConfigError(f"publisher public key {path}: {exc}") from None


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise ConfigError(f"{what} {path} is not readable by this user") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes; not a key file")
    return data


# -- the trust store ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustStore:
    """The publisher keys a device trusts. ``enforced``: at least one ``*.pub`` file is
    installed, so everything must be signed; a file that cannot be read is listed in
    ``problems`` and trusts nothing (fail closed: a broken key file never switches
    signatures off)."""

    keys: Mapping[bytes, PublicKey] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    enforced: bool = False

    @classmethod
    def load(cls, directory: Path) -> TrustStore:
        try:
            paths = sorted(
                entry for entry in directory.iterdir() if entry.name.endswith(PUBLIC_KEY_SUFFIX)
            )
        except FileNotFoundError:
            return cls()
        except NotADirectoryError:
            raise ConfigError(f"publishers directory {directory} is not a directory") from None
        keys: dict[bytes, PublicKey] = {}
        problems: list[str] = []
        for path in paths[:MAX_TRUSTED_KEYS]:
            try:
                key = read_public_key(path)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            keys[key.key_id] = key
        if len(paths) > MAX_TRUSTED_KEYS:
            problems.append(
                f"{directory} holds {len(paths)} keys; only the first {MAX_TRUSTED_KEYS} "
                "(by name) are trusted"
            )
        return cls(keys=keys, problems=tuple(problems), enforced=bool(paths))

    @classmethod
    def current(cls, directory: Path) -> TrustStore:
        """``load``, but read again only when the directory or one of its key files changed
        (their inode, size, mtime or ctime: a key added, removed, replaced, rewritten in place
        or made unreadable): for what runs at every load. ~4x cheaper than reading."""
        try:
            with os.scandir(directory) as entries:
                files = sorted(
                    (entry.name, entry.stat())
                    for entry in entries
                    if entry.name.endswith(PUBLIC_KEY_SUFFIX)
                )
            fingerprint = tuple(
                (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in files
            )
        except OSError:
            return cls.load(directory)  # says what is wrong, or that nothing is installed
        known = _CURRENT.get(directory)
        if known is not None and known[0] == fingerprint:
            return known[1]
        store = cls.load(directory)
        _CURRENT[directory] = (fingerprint, store)
        return store

    def key_names(self) -> list[str]:
        return sorted(key.name for key in self.keys.values())

    def admit(self, block: SignatureBlock | None, what: str) -> PublicKey | None:
        """The checks that need nothing measured, so that they can refuse before a byte is
        read or downloaded: an unsigned input when signatures are enforced, a key this device
        does not trust. The key to verify with, or None when there is nothing to verify
        (unsigned, or signed by an unknown key while signatures are not enforced)."""
        if block is None:
            if self.enforced:
                raise SignatureError(f"{what} is not signed, and this device requires signatures")
            return None
        key = self.keys.get(block.statement.key_id)
        if key is None and self.enforced:
            raise SignatureError(
                f"{what} is signed by key {block.statement.key_id.hex()}, which this device "
                "does not trust (not in its publishers directory)"
            )
        return key

    def verify(self, block: SignatureBlock | None, expected: Statement, what: str) -> None:
        """Check ``block`` against the statement computed from the bytes themselves.

        ``expected`` holds what the reader measured (kind, ciphertext size and SHA-256,
        manifest SHA-256); its key id and release are ignored. ``SignatureError`` names
        ``what`` and the reason. When signatures are not enforced, an unsigned ``block``
        (None) passes; a signed one is still checked if its key is known."""
        key = self.admit(block, what)
        if key is None or block is None:
            return
        signed = block.statement
        if signed.kind != expected.kind:
            raise SignatureError(
                f"{what} carries a signature for {signed.kind.name.lower()}, "
                f"not for {expected.kind.name.lower()}"
            )
        if signed.ciphertext_size != expected.ciphertext_size:
            raise SignatureError(
                f"{what} is {expected.ciphertext_size} bytes but was signed at "
                f"{signed.ciphertext_size}: truncated or extended after signing"
            )
        if signed.ciphertext_sha256 != expected.ciphertext_sha256:
            raise SignatureError(f"{what} was altered after signing (its SHA-256 differs)")
        if signed.manifest_sha256 != expected.manifest_sha256:
            raise SignatureError(f"{what} holds a manifest other than the one signed")
        _check_signature(key, block, what)


_CURRENT: dict[Path, tuple[tuple[tuple[str, int, int, int, int], ...], TrustStore]] = {}
_VERIFIED: collections.OrderedDict[bytes, None] = collections.OrderedDict()
VERIFIED_MEMORY = 1024  # signatures remembered as good (a resource's is checked at every load)


def _check_signature(key: PublicKey, block: SignatureBlock, what: str) -> None:
    """Ed25519-verify ``block`` with ``key`` (~70 us), unless this very key, statement and
    signature verified before: the outcome of a verification never changes, and a resource's
    small part, fetched and checked at every load, is the same each time."""
    remembered = key.raw + block.pack()
    if remembered in _VERIFIED:
        _VERIFIED.move_to_end(remembered)
        return
    try:
        key.verifier().verify(block.signature, block.statement.encode())
    except InvalidSignature:
        raise SignatureError(
            f"{what}: the signature by key {key.name} does not verify (forged or damaged)"
        ) from None
    _VERIFIED[remembered] = None
    if len(_VERIFIED) > VERIFIED_MEMORY:
        _VERIFIED.popitem(last=False)


# -- statements and blocks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """What a signature covers (see the module docstring)."""

    kind: Kind
    key_id: bytes
    release: int
    ciphertext_size: int
    ciphertext_sha256: bytes
    manifest_sha256: bytes

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_SIZE:
            raise ValueError("a key id is 8 bytes")
        if not 0 <= self.release <= MAX_RELEASE:
            raise ValueError(f"a release number is 0 to {MAX_RELEASE}")
        if not 0 <= self.ciphertext_size < 2**64:
            raise ValueError("a ciphertext size is an unsigned 64-bit number")
        if len(self.ciphertext_sha256) != DIGEST_SIZE or len(self.manifest_sha256) != DIGEST_SIZE:
            raise ValueError("a digest is 32 bytes")

    def fields(self) -> bytes:
        return _FIELDS.pack(
            self.kind,
            self.key_id,
            self.release,
            self.ciphertext_size,
            self.ciphertext_sha256,
            self.manifest_sha256,
        )

    def encode(self) -> bytes:
        """The bytes the signature is over."""
        return DOMAIN + self.fields()

    @classmethod
    def measured(
        cls, kind: Kind, ciphertext_size: int, ciphertext_sha256: bytes, manifest_sha256: bytes
    ) -> Statement:
        """What a reader measured itself, for ``TrustStore.verify`` to compare with a block:
        the key id and release are the block's own, not measured (left zero here)."""
        return cls(kind, bytes(KEY_ID_SIZE), 0, ciphertext_size, ciphertext_sha256, manifest_sha256)

    @classmethod
    def decode(cls, data: bytes) -> Statement:
        """Parse the bytes ``encode`` makes; ``ValueError`` if they are not a statement."""
        if len(data) != len(DOMAIN) + _FIELDS.size or not data.startswith(DOMAIN):
            raise ValueError("not a signature statement of version 1")
        kind, key_id, release, size, digest, manifest = _FIELDS.unpack_from(data, len(DOMAIN))
        return cls(Kind(kind), key_id, release, size, digest, manifest)


@dataclass(frozen=True)
class SignatureBlock:
    """``BLOCK_MAGIC || u8 version || statement fields || signature``: 162 bytes."""

    statement: Statement
    signature: bytes

    def pack(self) -> bytes:
        return (
            _BLOCK_HEAD.pack(BLOCK_MAGIC, BLOCK_VERSION) + self.statement.fields() + self.signature
        )

    @classmethod
    def unpack(cls, data: bytes) -> SignatureBlock:
        """Parse a block; ``SignatureError`` if it is not one this agent can read."""
        if len(data) != BLOCK_SIZE:
            raise SignatureError(f"a signature block is {BLOCK_SIZE} bytes, not {len(data)}")
        magic, version = _BLOCK_HEAD.unpack_from(data, 0)
        if magic != BLOCK_MAGIC:
            raise SignatureError("not a signature block")
        if version != BLOCK_VERSION:
            raise SignatureError(f"a signature block of version {version}, unknown to this agent")
        kind, key_id, release, size, digest, manifest = _FIELDS.unpack_from(data, _BLOCK_HEAD.size)
        try:
            statement = Statement(Kind(kind), key_id, release, size, digest, manifest)
        except ValueError as exc:
            raise SignatureError(f"the signature block is malformed ({exc})") from None
        return cls(statement, data[-SIGNATURE_SIZE:])


def sign(
    private_key: Ed25519PrivateKey,
    kind: Kind,
    release: int,
    ciphertext_size: int,
    ciphertext_sha256: bytes,
    manifest_sha256: bytes,
) -> SignatureBlock:
    statement = Statement(
        kind,
        public_key_of(private_key).key_id,
        release,
        ciphertext_size,
        ciphertext_sha256,
        manifest_sha256,
    )
    return SignatureBlock(statement, private_key.sign(statement.encode()))


def split_archive(file: BinaryIO) -> tuple[int, SignatureBlock | None]:
    """The length of the encrypted stream at the start of an archive and its signature block,
    if it ends with one. A block is recognised by its magic *and* a recorded ciphertext size
    equal to what precedes it, so an unsigned stream whose last bytes happen to look like a
    magic is not misread (and a block with the wrong size is reported, not skipped)."""
    size = file.seek(0, os.SEEK_END)
    if size < BLOCK_SIZE:
        return size, None
    file.seek(size - BLOCK_SIZE)
    tail = file.read(BLOCK_SIZE)
    file.seek(0)
    if not tail.startswith(BLOCK_MAGIC):
        return size, None
    block = SignatureBlock.unpack(tail)
    if block.statement.ciphertext_size != size - BLOCK_SIZE:
        raise SignatureError(
            f"the archive is {size - BLOCK_SIZE} bytes before its signature block but was "
            f"signed at {block.statement.ciphertext_size}: truncated or extended after signing"
        )
    return size - BLOCK_SIZE, block


def resource_ciphertext(head: bytes, big_size: int, big_sha256: bytes) -> tuple[int, bytes]:
    """A resource's ``ciphertext_size`` and ``ciphertext_sha256`` as its signature covers
    them: the two parts as stored, the small part's ``head`` (stream header and first
    ciphertext) and the big part (its key fragment, then the rest of the ciphertext):
    ``len(head) + big_size`` and ``SHA-256(SHA-256(head) || SHA-256(big part))``. The big
    part's SHA-256 is the one its download (or the upload's spool) computes in the pass that
    writes it, and the cache holds only parts that match it: a load from the cache checks the
    signature before its first byte, without reading the part again."""
    digest = hashlib.sha256(hashlib.sha256(head).digest() + big_sha256).digest()
    return len(head) + big_size, digest


def resource_manifest(folder: str, name: str, size: int, release: int) -> bytes:
    """The manifest a resource's signature covers: where it is published, its plaintext size
    and its release, as compact sorted UTF-8 JSON (so a signed resource cannot be replayed
    under another name or folder)."""
    document = {"folder": folder, "name": name, "release": release, "size": size, "version": 1}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")
