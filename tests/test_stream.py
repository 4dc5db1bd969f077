"""agent.stream and agent.keys: round trips, sizes, hostile input, the key schedule."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import errors, keys, stream

SMALL = 1024  # the smallest chunk size: many chunks from little data
RECORD = SMALL + stream.TAG_SIZE
FRAGMENT = bytes(range(32))
OTHER_FRAGMENT = bytes(range(32, 64))


def encrypt(plaintext: bytes, fragments: list[bytes], chunk_size: int = SMALL) -> bytes:
    return b"".join(stream.encrypt_iter([plaintext], fragments, chunk_size=chunk_size))


def decrypt(ciphertext: bytes, fragments: list[bytes], piece_size: int = 1 << 20) -> bytes:
    pieces = [ciphertext[i : i + piece_size] for i in range(0, len(ciphertext), piece_size)]
    return b"".join(stream.decrypt_iter(pieces, fragments))


def lengths_around_chunks(chunk_size: int) -> list[int]:
    cs = chunk_size
    return [0, 1, cs - 1, cs, cs + 1, 2 * cs - 1, 2 * cs, 2 * cs + 5, 5 * cs + 3]


@pytest.mark.parametrize("chunk_size", [SMALL, stream.CHUNK_SIZE])
def test_round_trip_at_chunk_boundaries(chunk_size: int) -> None:
    for length in lengths_around_chunks(chunk_size):
        plaintext = os.urandom(length)
        ciphertext = encrypt(plaintext, [FRAGMENT], chunk_size)
        assert len(ciphertext) == stream.ciphertext_size(length, chunk_size=chunk_size)
        assert stream.plaintext_size(len(ciphertext), chunk_size=chunk_size) == length
        for piece_size in (chunk_size + stream.TAG_SIZE, chunk_size + stream.TAG_SIZE + 1, 4099):
            assert decrypt(ciphertext, [FRAGMENT], piece_size) == plaintext


def test_the_default_chunk_size_is_the_spec_s() -> None:
    ciphertext = encrypt(b"x", [FRAGMENT], stream.CHUNK_SIZE)
    assert stream.CHUNK_SIZE == 65536
    assert ciphertext[8:10] == bytes([stream.VERSION, 16])
    assert stream.HEADER_SIZE == 90


def test_incremental_api_returns_the_header_first_and_holds_a_possible_final_chunk() -> None:
    encryptor = stream.Encryptor([FRAGMENT], chunk_size=SMALL)
    first = encryptor.update(b"a" * SMALL)  # a full chunk may be the final one: held back
    assert len(first) == stream.HEADER_SIZE
    second = encryptor.update(b"b")  # now chunk 0 is known not to be final
    assert len(second) == RECORD
    last = encryptor.finalize()
    assert len(last) == 1 + stream.TAG_SIZE
    decryptor = stream.Decryptor([FRAGMENT])
    assert decryptor.update(first) == b""
    assert decryptor.header is not None and decryptor.header.chunk_size == SMALL
    assert decryptor.update(second) == b""  # the whole record, but nothing after it yet
    assert decryptor.update(last[:1]) == b"a" * SMALL
    assert decryptor.update(last[1:]) == b""
    assert decryptor.finalize() == b"b"


def test_file_api_round_trip_counts_bytes() -> None:
    plaintext = os.urandom(3 * stream.FILE_READ_SIZE + 12345)
    ciphertext_file = io.BytesIO()
    written = stream.encrypt_file(io.BytesIO(plaintext), ciphertext_file, [FRAGMENT])
    assert written == len(ciphertext_file.getvalue()) == stream.ciphertext_size(len(plaintext))
    plaintext_file = io.BytesIO()
    ciphertext_file.seek(0)
    assert stream.decrypt_file(ciphertext_file, plaintext_file, [FRAGMENT]) == len(plaintext)
    assert plaintext_file.getvalue() == plaintext


def test_inputs_may_be_bytearrays_and_memoryviews() -> None:
    plaintext = bytearray(os.urandom(5000))
    ciphertext = b"".join(
        stream.encrypt_iter([memoryview(plaintext)], [FRAGMENT], chunk_size=SMALL)
    )
    assert b"".join(stream.decrypt_iter([bytearray(ciphertext)], [FRAGMENT])) == plaintext


def test_the_same_fragments_never_give_the_same_stream_twice() -> None:
    first, second = encrypt(b"same", [FRAGMENT]), encrypt(b"same", [FRAGMENT])
    assert first[10:42] != second[10:42]  # a fresh salt, so a fresh key
    assert first[stream.HEADER_SIZE :] != second[stream.HEADER_SIZE :]


def test_fragment_order_does_not_matter_but_each_fragment_does() -> None:
    ciphertext = encrypt(b"two fragments", [FRAGMENT, OTHER_FRAGMENT])
    assert decrypt(ciphertext, [OTHER_FRAGMENT, FRAGMENT]) == b"two fragments"
    for fragments in ([FRAGMENT], [OTHER_FRAGMENT], [FRAGMENT, FRAGMENT], [FRAGMENT + b"x"]):
        with pytest.raises(errors.WrongKeyError, match="wrong key"):
            decrypt(ciphertext, fragments)


def test_wrong_key_is_reported_once_the_header_arrives_before_any_chunk() -> None:
    ciphertext = encrypt(os.urandom(3 * SMALL), [FRAGMENT])
    decryptor = stream.Decryptor([OTHER_FRAGMENT])
    assert decryptor.update(ciphertext[: stream.HEADER_SIZE - 1]) == b""
    with pytest.raises(errors.WrongKeyError):
        decryptor.update(ciphertext[stream.HEADER_SIZE - 1 : stream.HEADER_SIZE])


def test_a_foreign_file_is_named_as_such_from_its_first_bytes() -> None:
    decryptor = stream.Decryptor([FRAGMENT])
    with pytest.raises(errors.UnsupportedFormatError, match="not an azaion-loader"):
        decryptor.update(b"PK\x03\x04")
    assert stream.Decryptor([FRAGMENT]).update(stream.MAGIC[:5]) == b""


def test_a_failed_decryptor_stays_failed() -> None:
    ciphertext = bytearray(encrypt(os.urandom(3 * SMALL), [FRAGMENT]))
    ciphertext[stream.HEADER_SIZE + RECORD + 3] ^= 0x40  # chunk 1
    good = encrypt(b"", [FRAGMENT])
    decryptor = stream.Decryptor([FRAGMENT])
    with pytest.raises(errors.TamperedError, match="chunk 1 failed authentication"):
        decryptor.update(ciphertext)
    calls: list[Callable[[], object]] = [
        lambda: decryptor.update(good),
        decryptor.finalize,
        lambda: decryptor.update(b""),
    ]
    for call in calls:
        with pytest.raises(errors.TamperedError, match="chunk 1"):
            call()


def test_nothing_of_a_chunk_is_released_before_it_is_verified() -> None:
    plaintext = os.urandom(4 * SMALL)
    ciphertext = bytearray(encrypt(plaintext, [FRAGMENT]))
    ciphertext[stream.HEADER_SIZE + 2 * RECORD + 10] ^= 1  # inside chunk 2
    released: list[bytes] = []
    with pytest.raises(errors.TamperedError):
        for piece in stream.decrypt_iter(
            [bytes(ciphertext[i : i + 7]) for i in range(0, len(ciphertext), 7)], [FRAGMENT]
        ):
            released.append(piece)
    assert b"".join(released) == plaintext[: 2 * SMALL]  # chunks 0 and 1, nothing of chunk 2


def test_iter_update_yields_chunk_by_chunk_and_abandoning_it_fails_the_decryptor() -> None:
    plaintext = os.urandom(4 * SMALL + 1)
    ciphertext = encrypt(plaintext, [FRAGMENT])
    decryptor = stream.Decryptor([FRAGMENT])
    pieces = decryptor.iter_update(ciphertext)
    assert next(pieces) == plaintext[:SMALL]
    pieces.close()  # abandoned after one chunk: the decryptor's position is lost
    with pytest.raises(errors.StreamError, match="abandoned"):
        decryptor.update(ciphertext[stream.HEADER_SIZE + RECORD :])


def test_bytes_after_a_finalized_stream_are_trailing_data() -> None:
    ciphertext = encrypt(b"abc", [FRAGMENT])
    decryptor = stream.Decryptor([FRAGMENT])
    decryptor.update(ciphertext)
    assert decryptor.finalize() == b"abc"
    assert decryptor.finalize() == b""
    with pytest.raises(errors.TrailingDataError):
        decryptor.update(b"\x00")


def test_an_empty_final_chunk_after_others_is_refused() -> None:
    # The encoder never writes one (the final chunk is empty only in the empty stream), so a
    # full chunk followed by an empty final chunk must not decrypt: sizes stay exact.
    stream_keys = keys.derive_stream_keys([FRAGMENT], bytes(32))
    header = stream.make_header(stream_keys, bytes(32), 10).pack()
    aead = AESGCM(stream_keys.payload_key)
    data = (
        header
        + aead.encrypt(stream.nonce_for_chunk(0, False), b"a" * SMALL, None)
        + aead.encrypt(stream.nonce_for_chunk(1, True), b"", None)
    )
    with pytest.raises(errors.TruncatedError):
        decrypt(data, [FRAGMENT])


def test_the_encryptor_refuses_work_after_finalize() -> None:
    encryptor = stream.Encryptor([FRAGMENT])
    encryptor.finalize()
    with pytest.raises(errors.StreamError, match="already finalized"):
        encryptor.update(b"more")


def test_the_chunk_limit_is_enforced_on_both_sides() -> None:
    encryptor = stream.Encryptor([FRAGMENT], chunk_size=SMALL)
    encryptor.update(b"x")
    encryptor._index = stream.MAX_CHUNKS  # as if 2^32 chunks had been sealed
    with pytest.raises(errors.StreamError, match="too long"):
        encryptor.finalize()
    ciphertext = encrypt(os.urandom(2 * SMALL), [FRAGMENT])
    decryptor = stream.Decryptor([FRAGMENT])
    decryptor.update(ciphertext[: stream.HEADER_SIZE])
    decryptor._index = stream.MAX_CHUNKS
    with pytest.raises(errors.UnsupportedFormatError, match="more than"):
        decryptor.update(ciphertext[stream.HEADER_SIZE :])
    with pytest.raises(ValueError):
        stream.nonce_for_chunk(stream.MAX_CHUNKS, last=True)


def test_nonce_layout() -> None:
    assert stream.nonce_for_chunk(0, last=False) == bytes(12)
    assert stream.nonce_for_chunk(1, last=True) == bytes(10) + b"\x01\x01"
    assert stream.nonce_for_chunk(0x0102, last=False) == bytes(9) + b"\x01\x02\x00"
    assert stream.nonce_for_chunk(5, last=True)[-1] == stream.LAST_CHUNK_FLAG


@pytest.mark.parametrize(
    ("ciphertext_size", "plaintext_size"),
    [
        (stream.HEADER_SIZE + 16, 0),
        (stream.HEADER_SIZE + 17, 1),
        (stream.HEADER_SIZE + stream.CHUNK_SIZE + 16, stream.CHUNK_SIZE),
        (stream.HEADER_SIZE + stream.CHUNK_SIZE + 16 + 17, stream.CHUNK_SIZE + 1),
    ],
)
def test_size_functions_are_exact_inverses(ciphertext_size: int, plaintext_size: int) -> None:
    assert stream.plaintext_size(ciphertext_size) == plaintext_size
    assert stream.ciphertext_size(plaintext_size) == ciphertext_size


@pytest.mark.parametrize(
    "impossible",
    [0, stream.HEADER_SIZE, stream.HEADER_SIZE + 15, stream.HEADER_SIZE + 65552 + 16],
)
def test_impossible_ciphertext_sizes_are_refused(impossible: int) -> None:
    with pytest.raises(errors.TruncatedError):
        stream.plaintext_size(impossible)


def test_sizes_refuse_nonsense_arguments() -> None:
    with pytest.raises(ValueError):
        stream.ciphertext_size(-1)
    with pytest.raises(ValueError):
        stream.plaintext_size(100, chunk_size=1000)
    with pytest.raises(errors.UnsupportedFormatError):
        stream.Encryptor([FRAGMENT], chunk_size=1 << 30)


# Key fragments and the key schedule (agent.keys)


def test_fragment_text_form_round_trips_and_is_one_line() -> None:
    fragment = keys.generate_fragment()
    assert len(fragment) == keys.FRAGMENT_SIZE
    assert fragment != keys.generate_fragment()
    text = keys.encode_fragment(fragment)
    assert "\n" not in text
    assert keys.decode_fragment(f"  {text}\n") == fragment


@pytest.mark.parametrize("text", ["not base64!", "QUJD", "", "QUJDRA==\nQUJDRA=="])
def test_bad_fragment_text_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        keys.decode_fragment(text)
    assert text.strip() == "" or text.strip() not in str(caught.value)


def test_fragment_files_round_trip_with_mode_0600_and_no_silent_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "api.key"
    fragment = keys.generate_fragment()
    keys.write_fragment_file(path, fragment)
    assert path.stat().st_mode & 0o777 == 0o600
    assert keys.read_fragment_file(path) == fragment
    with pytest.raises(errors.ConflictError, match="already exists"):
        keys.write_fragment_file(path, keys.generate_fragment())
    assert keys.read_fragment_file(path) == fragment
    replacement = keys.generate_fragment()
    keys.write_fragment_file(path, replacement, force=True)
    assert keys.read_fragment_file(path) == replacement
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.key"]  # no temp files left


def test_reading_a_bad_fragment_file_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="does not exist"):
        keys.read_fragment_file(tmp_path / "missing.key")
    secretish = tmp_path / "bad.key"
    secretish.write_text("c2VjcmV0 is not a fragment\n")
    with pytest.raises(errors.ConfigError, match="does not hold a key fragment") as caught:
        keys.read_fragment_file(secretish)
    assert "c2VjcmV0" not in str(caught.value)
    with pytest.raises(errors.ConfigError, match="too large"):
        keys.read_fragment_file("/dev/zero")


def test_key_schedule_separates_fragment_sets_and_salts() -> None:
    salt, other_salt = bytes(32), bytes(31) + b"\x01"
    base = keys.derive_stream_keys([FRAGMENT], salt)
    assert keys.derive_stream_keys([FRAGMENT], salt) == base
    assert keys.derive_stream_keys([FRAGMENT], other_salt).payload_key != base.payload_key
    different = [[FRAGMENT, FRAGMENT], [FRAGMENT + OTHER_FRAGMENT], [OTHER_FRAGMENT]]
    assert all(keys.derive_stream_keys(f, salt).key_check != base.key_check for f in different)
    assert len({base.payload_key, base.header_key, base.key_check}) == 3
    assert "payload" not in repr(base) and base.payload_key.hex() not in repr(base)
    with pytest.raises(errors.ConfigError):
        keys.derive_stream_keys([], salt)
    with pytest.raises(errors.ConfigError):
        keys.derive_stream_keys([b"short"], salt)


# Properties (hypothesis)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    length=st.integers(min_value=0, max_value=6 * SMALL + 3),
    piece_size=st.integers(min_value=1, max_value=3 * RECORD),
    fragment_count=st.integers(min_value=1, max_value=3),
)
def test_round_trip_any_size_any_feeding(length: int, piece_size: int, fragment_count: int) -> None:
    fragments = [keys.generate_fragment() for _ in range(fragment_count)]
    plaintext = os.urandom(length)
    ciphertext = encrypt(plaintext, fragments)
    assert len(ciphertext) == stream.ciphertext_size(length, chunk_size=SMALL)
    assert stream.plaintext_size(len(ciphertext), chunk_size=SMALL) == length
    assert decrypt(ciphertext, list(reversed(fragments)), piece_size) == plaintext


@FAST
@given(size=st.integers(min_value=0, max_value=10**12), log2=st.integers(10, 22))
def test_size_functions_round_trip(size: int, log2: int) -> None:
    chunk_size = 1 << log2
    assert stream.plaintext_size(stream.ciphertext_size(size, chunk_size=chunk_size),
                                 chunk_size=chunk_size) == size  # fmt: skip


CORRUPTION_PLAINTEXT = bytes(range(256)) * 17  # 4352 bytes: 4 full chunks and a short one
CORRUPTION_FULL_PLAINTEXT = CORRUPTION_PLAINTEXT[: 4 * SMALL]  # 4 full chunks, the last final


@FAST
@given(
    full_final=st.booleans(),
    data=st.data(),
    mask=st.integers(min_value=1, max_value=255),
    piece_size=st.sampled_from([1 << 20, RECORD, 333]),
)
def test_any_single_byte_corruption_fails_with_the_class_its_position_implies(
    full_final: bool, data: st.DataObject, mask: int, piece_size: int
) -> None:
    plaintext = CORRUPTION_FULL_PLAINTEXT if full_final else CORRUPTION_PLAINTEXT
    ciphertext = bytearray(encrypt(plaintext, [FRAGMENT]))
    position = data.draw(st.integers(min_value=0, max_value=len(ciphertext) - 1))
    ciphertext[position] ^= mask
    with pytest.raises(errors.StreamError) as caught:
        decrypt(bytes(ciphertext), [FRAGMENT], piece_size)
    assert type(caught.value) is expected_error(bytes(ciphertext), position), str(caught.value)


def expected_error(corrupted: bytes, position: int) -> type[errors.StreamError]:
    """docs/format.md, "Failures": what a change at ``position`` must be reported as."""
    if position <= 8:  # magic, version
        return errors.UnsupportedFormatError
    if position == 9:  # chunk size: out of range is unsupported, in range fails the MAC
        in_range = stream.MIN_CHUNK_SIZE_LOG2 <= corrupted[9] <= stream.MAX_CHUNK_SIZE_LOG2
        return errors.TamperedError if in_range else errors.UnsupportedFormatError
    if position < 58:  # salt, key check
        return errors.WrongKeyError
    if position < stream.HEADER_SIZE:  # header MAC
        return errors.TamperedError
    final_record_start = len(corrupted) - (len(corrupted) - stream.HEADER_SIZE) % RECORD
    if final_record_start < len(corrupted) and position >= final_record_start:
        return errors.TruncatedError  # short final chunk: cut short or altered, see the spec
    return errors.TamperedError
