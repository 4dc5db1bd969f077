"""Key fragments and the key schedule of the encrypted stream format (docs/format.md).

A *key fragment* is a random secret of ``FRAGMENT_SIZE`` bytes (other lengths within
``MIN_FRAGMENT_SIZE..MAX_FRAGMENT_SIZE`` are accepted, so a fragment may come from any source).
Its text form is one line of standard base64, so it travels through systemd credentials and
environment-like stores. A stream's keys are derived from all its fragments and the stream's
random salt with HKDF-SHA256; the order the fragments are given in does not matter.

Nothing here puts a fragment or a derived key into an error message.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.durable import write_atomically
from agent.errors import ConfigError, ConflictError

FRAGMENT_SIZE = 32
MIN_FRAGMENT_SIZE = 16
MAX_FRAGMENT_SIZE = 1024
MAX_FRAGMENTS = 255
SALT_SIZE = 32
PAYLOAD_KEY_SIZE = 32
HEADER_KEY_SIZE = 32
KEY_CHECK_SIZE = 16
KEY_SCHEDULE_INFO = b"azaion-stream v1 keys"
# Longest text a fragment file may hold: base64 of MAX_FRAGMENT_SIZE plus a line break, with
# slack. Reading stops there, so a wrong path (a device, a huge file) cannot exhaust memory.
MAX_FRAGMENT_FILE_SIZE = 4 * MAX_FRAGMENT_SIZE


@dataclass(frozen=True, repr=False)
class StreamKeys:
    """The keys of one stream, all derived from its fragments and its salt."""

    payload_key: bytes  # AES-256-GCM key of the chunks
    header_key: bytes  # HMAC-SHA256 key of the header
    key_check: bytes  # stored in the header: tells a wrong key from altered data

    def __repr__(self) -> str:
        return "StreamKeys(<secret>)"


def generate_fragment() -> bytes:
    """A new random key fragment of ``FRAGMENT_SIZE`` bytes."""
    return os.urandom(FRAGMENT_SIZE)


def encode_fragment(fragment: bytes) -> str:
    """The one-line text form of a fragment (standard base64, no line break)."""
    check_fragment(fragment)
    return base64.b64encode(fragment).decode("ascii")


def decode_fragment(text: str) -> bytes:
    """Parse the text form; surrounding whitespace (a trailing newline) is ignored.

    Raises ``ConfigError`` without echoing the text, which may be a secret.
    """
    try:
        fragment = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("the key fragment is not one line of base64 text") from exc
    check_fragment(fragment)
    return fragment


def check_fragment(fragment: bytes) -> None:
    """Refuse fragments too short to be a secret or too long to be one."""
    if not MIN_FRAGMENT_SIZE <= len(fragment) <= MAX_FRAGMENT_SIZE:
        raise ConfigError(
            f"a key fragment must be {MIN_FRAGMENT_SIZE} to {MAX_FRAGMENT_SIZE} bytes long, "
            f"this one has {len(fragment)}"
        )


def read_fragment_file(path: str | os.PathLike[str]) -> bytes:
    """Read a fragment written by ``write_fragment_file`` (or any one-line base64 secret)."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FRAGMENT_FILE_SIZE + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"key fragment file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read key fragment file {path}: {exc.strerror}") from exc
    if len(raw) > MAX_FRAGMENT_FILE_SIZE:
        raise ConfigError(f"key fragment file {path} is too large to be a key fragment")
    try:
        return decode_fragment(raw.decode("ascii"))
    except (UnicodeDecodeError, ConfigError) as exc:
        raise ConfigError(
            f"key fragment file {path} does not hold a key fragment "
            f"(expected one line of base64 text)"
        ) from exc


def write_fragment_file(
    path: str | os.PathLike[str], fragment: bytes, *, force: bool = False
) -> None:
    """Write the text form with mode 0600, durably; never overwrite unless ``force``.

    The file is written under a temporary name in the same directory, synced, then linked
    (or, with ``force``, renamed) into place, so a crash leaves the old file or the whole new
    one, never half a key.
    """
    target = Path(path)
    text = (encode_fragment(fragment) + "\n").encode("ascii")
    try:
        write_atomically(target, text, replace=force)
    except FileExistsError as exc:
        raise ConflictError(f"key fragment file {target} already exists") from exc
    except OSError as exc:
        raise ConfigError(f"cannot write key fragment file {path}: {exc.strerror}") from exc


def encode_fragment_set(fragments: Sequence[bytes]) -> bytes:
    """HKDF input keying material: an unambiguous encoding of the sorted fragments.

    ``u8 count || (u16 length || fragment)*``, fragments in ascending byte order, so
    ``[a, b]`` and ``[b, a]`` give the same keys while ``[a]``, ``[a, a]`` and ``[ab]`` do not.
    """
    if not fragments:
        raise ConfigError("at least one key fragment is needed")
    if len(fragments) > MAX_FRAGMENTS:
        raise ConfigError(f"at most {MAX_FRAGMENTS} key fragments are allowed")
    encoded = bytearray([len(fragments)])
    for fragment in sorted(bytes(fragment) for fragment in fragments):
        check_fragment(fragment)
        encoded += len(fragment).to_bytes(2, "big") + fragment
    return bytes(encoded)


def derive_stream_keys(fragments: Sequence[bytes], salt: bytes) -> StreamKeys:
    """HKDF-SHA256(IKM = encoded fragments, salt, info = KEY_SCHEDULE_INFO), split in three."""
    if len(salt) != SALT_SIZE:
        raise ValueError(f"the salt must be {SALT_SIZE} bytes")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=PAYLOAD_KEY_SIZE + HEADER_KEY_SIZE + KEY_CHECK_SIZE,
        salt=salt,
        info=KEY_SCHEDULE_INFO,
    )
    material = hkdf.derive(encode_fragment_set(fragments))
    return StreamKeys(
        payload_key=material[:PAYLOAD_KEY_SIZE],
        header_key=material[PAYLOAD_KEY_SIZE : PAYLOAD_KEY_SIZE + HEADER_KEY_SIZE],
        key_check=material[PAYLOAD_KEY_SIZE + HEADER_KEY_SIZE :],
    )
