"""agent.stream's file functions against its incremental API: the same bytes, the same errors.

``encrypt_file``/``decrypt_file`` read into reused buffers, a few chunks per read, and hold
the last full chunk back until they know whether it is the final one. These tests sweep lengths
around the chunk and read boundaries, feed every test vector through them, and compare both
what is written and the error raised with ``Encryptor``/``decrypt_iter`` on the same input.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from agent import errors, stream
from tests.test_stream_vectors import NEGATIVE, POSITIVE, ciphertext_of, fragments_of
from tests.vectors import generate

FRAGMENT = bytes(range(32))
SALT = bytes(range(100, 100 + 32))
CHUNK_SIZES = [1 << 10, stream.CHUNK_SIZE, 1 << 20]


class ShortReads(io.RawIOBase):
    """A readable that hands out at most ``step`` bytes a call, as a pipe or a socket may."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._step, self._offset = data, step, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        piece = self._data[self._offset : self._offset + min(self._step, len(buffer))]
        buffer[: len(piece)] = piece
        self._offset += len(piece)
        return len(piece)


class ReadOnly:
    """A file-like object with ``read`` and nothing else."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)


def pattern(length: int) -> bytes:
    """``generate.pattern``, built faster for the longer inputs here."""
    period = bytes(range(251))
    return (period * (length // 251 + 1))[:length]


def sources(data: bytes) -> dict[str, BinaryIO]:
    return {
        "BytesIO": io.BytesIO(data),
        "short reads": cast(BinaryIO, ShortReads(data, 1000)),
        "read only": cast(BinaryIO, ReadOnly(data)),
    }


def lengths(chunk_size: int) -> list[int]:
    cs, per_read = chunk_size, max(1, stream.FILE_READ_SIZE // chunk_size)
    around = [cs, per_read * cs, (per_read + 1) * cs, 2 * (per_read + 1) * cs]
    return sorted({0, 1, *(n + d for n in around for d in (-1, 0, 1)), 3 * cs + 5})


def reference_encrypt(plaintext: bytes, chunk_size: int) -> bytes:
    encryptor = stream.Encryptor._from_parts([FRAGMENT], SALT, chunk_size)
    return encryptor.update(plaintext) + encryptor.finalize()


def reference_decrypt(data: bytes, fragments: list[bytes]) -> tuple[bytes, BaseException | None]:
    """What ``decrypt_iter`` hands out before it fails, and the failure."""
    out = bytearray()
    pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    try:
        for piece in stream.decrypt_iter(pieces, fragments):
            out += piece
    except errors.StreamError as exc:
        return bytes(out), exc
    return bytes(out), None


def file_decrypt(source: BinaryIO, fragments: list[bytes]) -> tuple[bytes, BaseException | None]:
    sink = io.BytesIO()
    try:
        written = stream.decrypt_file(source, sink, fragments)
    except errors.StreamError as exc:
        return sink.getvalue(), exc
    assert written == len(sink.getvalue())
    return sink.getvalue(), None


def assert_same_outcome(data: bytes, fragments: list[bytes]) -> None:
    expected_out, expected_error = reference_decrypt(data, fragments)
    for name, source in sources(data).items():
        out, error = file_decrypt(source, fragments)
        assert out == expected_out, name
        assert type(error) is type(expected_error), name
        assert str(error) == str(expected_error), name


@pytest.fixture
def fixed_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Encryptor`` draws its salt from ``os.urandom``: fixed here, so outputs compare."""
    monkeypatch.setattr(os, "urandom", lambda size: SALT[:size])


@pytest.mark.usefixtures("fixed_salt")
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_encrypt_file_writes_the_incremental_stream(chunk_size: int) -> None:
    for length in lengths(chunk_size):
        plaintext = pattern(length)
        expected = reference_encrypt(plaintext, chunk_size)
        for name, source in sources(plaintext).items():
            sink = io.BytesIO()
            written = stream.encrypt_file(source, sink, [FRAGMENT], chunk_size=chunk_size)
            assert sink.getvalue() == expected, (length, name)
            assert written == len(expected) == stream.ciphertext_size(length, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_decrypt_file_round_trips_at_every_boundary(chunk_size: int) -> None:
    for length in lengths(chunk_size):
        plaintext = pattern(length)
        ciphertext = reference_encrypt(plaintext, chunk_size)
        for name, source in sources(ciphertext).items():
            assert file_decrypt(source, [FRAGMENT]) == (plaintext, None), (length, name)


@pytest.mark.parametrize("vector", POSITIVE + NEGATIVE, ids=lambda v: v["name"])
def test_decrypt_file_agrees_with_decrypt_iter_on_every_vector(vector: dict[str, Any]) -> None:
    assert_same_outcome(ciphertext_of(vector), fragments_of(vector["decrypt_fragments"]))


@pytest.mark.usefixtures("fixed_salt")
@pytest.mark.parametrize("vector", POSITIVE, ids=lambda v: v["name"])
def test_encrypt_file_writes_every_positive_vector(vector: dict[str, Any]) -> None:
    parts = vector["encrypt"]
    sink = io.BytesIO()
    plaintext = io.BytesIO(generate.pattern(vector["plaintext_length"]))
    salt = bytes.fromhex(parts["salt"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "urandom", lambda size: salt[:size])
        stream.encrypt_file(
            plaintext, sink, fragments_of(parts["fragments"]), chunk_size=parts["chunk_size"]
        )
    assert sink.getvalue() == ciphertext_of(vector)


def damaged_streams(chunk_size: int) -> dict[str, bytes]:
    """A stream of several reads' worth of chunks, damaged around the read boundaries."""
    per_read = max(1, stream.FILE_READ_SIZE // chunk_size)
    record = chunk_size + stream.TAG_SIZE
    good = reference_encrypt(pattern(2 * (per_read + 1) * chunk_size + 7), chunk_size)
    body_end = len(good)
    cases = {"whole": good}
    for index in sorted({0, per_read - 1, per_read, per_read + 1, 2 * per_read + 1}):
        at = stream.HEADER_SIZE + index * record + 5
        flipped = bytearray(good)
        flipped[at] ^= 0x20
        cases[f"chunk {index} altered"] = bytes(flipped)
        cases[f"cut after chunk {index}"] = good[: stream.HEADER_SIZE + (index + 1) * record]
        cases[f"cut inside chunk {index}"] = good[:at]
    cases["trailing byte"] = good + b"\0"
    cases["trailing record"] = good + good[body_end - record : body_end]
    return cases


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_decrypt_file_fails_like_decrypt_iter_on_damaged_streams(chunk_size: int) -> None:
    for name, data in damaged_streams(chunk_size).items():
        try:
            assert_same_outcome(data, [FRAGMENT])
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


def test_decrypt_file_refuses_a_wrong_key_without_writing(tmp_path: Path) -> None:
    data = reference_encrypt(pattern(5000), 1 << 10)
    out, error = file_decrypt(io.BytesIO(data), [bytes(32)])
    assert out == b"" and isinstance(error, errors.WrongKeyError)
