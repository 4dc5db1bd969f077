"""The encrypted stream format, version 1: STREAM-chunked AES-256-GCM (spec: docs/format.md).

    stream = header || chunk_0 || ... || chunk_n        (chunk_n is the final chunk)
    header = MAGIC || version || chunk_size_log2 || salt || key_check || header_mac
    chunk_i = AES-256-GCM(payload_key, nonce_for_chunk(i, i == n), plaintext_i)

Pure: bytes and file-like objects in, bytes out. Keys come from ``agent.keys``. Every chunk is
authenticated before a byte of it is handed out; once a ``Decryptor`` has failed it stays
failed. Names follow the spec (``CHUNK_SIZE``, ``LAST_CHUNK_FLAG``, ``nonce_for_chunk``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import (
    StreamError,
    TamperedError,
    TrailingDataError,
    TruncatedError,
    UnsupportedFormatError,
    WrongKeyError,
)
from agent.keys import (
    KEY_CHECK_SIZE,
    SALT_SIZE,
    StreamKeys,
    derive_stream_keys,
    encode_fragment_set,
)

MAGIC = b"\x89AZS\r\n\x1a\n"
VERSION = 1
CHUNK_SIZE_LOG2 = 16
CHUNK_SIZE = 1 << CHUNK_SIZE_LOG2  # plaintext bytes per chunk; the final chunk may be shorter
MIN_CHUNK_SIZE_LOG2 = 10
MAX_CHUNK_SIZE_LOG2 = 22
TAG_SIZE = 16
NONCE_SIZE = 12
LAST_CHUNK_FLAG = 0x01
MAX_CHUNKS = 1 << 32  # chunks per stream (so per key): 256 TiB at the default chunk size
HEADER_MAC_SIZE = 32
HEADER_SIZE = len(MAGIC) + 1 + 1 + SALT_SIZE + KEY_CHECK_SIZE + HEADER_MAC_SIZE
_MAC_OFFSET = HEADER_SIZE - HEADER_MAC_SIZE
FILE_READ_SIZE = 1 << 20

Buffer = bytes | bytearray | memoryview


def nonce_for_chunk(index: int, last: bool) -> bytes:
    """11-byte big-endian chunk index, then ``LAST_CHUNK_FLAG`` on the final chunk, else 0."""
    if not 0 <= index < MAX_CHUNKS:
        raise ValueError(f"chunk index {index} is outside 0..{MAX_CHUNKS - 1}")
    return index.to_bytes(NONCE_SIZE - 1, "big") + (b"\x01" if last else b"\x00")


@dataclass(frozen=True)
class StreamHeader:
    """The fixed-size header that starts every stream."""

    chunk_size_log2: int
    salt: bytes
    key_check: bytes
    mac: bytes
    version: int = VERSION

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_size_log2

    def signed_part(self) -> bytes:
        """Every header byte the MAC covers (all but the MAC itself)."""
        prefix = MAGIC + bytes([self.version, self.chunk_size_log2])
        return prefix + self.salt + self.key_check

    def pack(self) -> bytes:
        return self.signed_part() + self.mac


def make_header(keys: StreamKeys, salt: bytes, chunk_size_log2: int) -> StreamHeader:
    """A new header for a stream encrypted under ``keys``, MAC included."""
    _check_chunk_size_log2(chunk_size_log2)
    unsigned = StreamHeader(chunk_size_log2, salt, keys.key_check, mac=b"")
    return StreamHeader(chunk_size_log2, salt, keys.key_check, mac=_header_mac(keys, unsigned))


def parse_header(data: Buffer) -> StreamHeader:
    """Parse (not yet authenticate) the first ``HEADER_SIZE`` bytes of a stream."""
    data = bytes(data[:HEADER_SIZE])
    _check_magic(data)
    if len(data) < HEADER_SIZE:
        raise TruncatedError(
            f"the stream ended inside its header ({len(data)} of {HEADER_SIZE} bytes)"
        )
    version, chunk_size_log2 = data[len(MAGIC)], data[len(MAGIC) + 1]
    if version != VERSION:
        raise UnsupportedFormatError(
            f"stream format version {version} is not supported (this agent reads version {VERSION})"
        )
    _check_chunk_size_log2(chunk_size_log2)
    salt_end = len(MAGIC) + 2 + SALT_SIZE
    return StreamHeader(
        chunk_size_log2=chunk_size_log2,
        salt=data[len(MAGIC) + 2 : salt_end],
        key_check=data[salt_end:_MAC_OFFSET],
        mac=data[_MAC_OFFSET:],
    )


def open_header(header: StreamHeader, fragments: Sequence[bytes]) -> StreamKeys:
    """Derive the stream's keys and authenticate the header: wrong key first, then tampering."""
    keys = derive_stream_keys(fragments, header.salt)
    if not hmac.compare_digest(keys.key_check, header.key_check):
        raise WrongKeyError(
            "wrong key: the key fragments given do not open this stream (one is wrong, "
            "missing or extra)"
        )
    if not hmac.compare_digest(_header_mac(keys, header), header.mac):
        raise TamperedError("the stream header failed authentication: it was altered")
    return keys


def _header_mac(keys: StreamKeys, header: StreamHeader) -> bytes:
    return hmac.digest(keys.header_key, header.signed_part(), hashlib.sha256)


def _check_magic(data: bytes) -> None:
    # Compares what has arrived so far, so a foreign file is named as such after 8 bytes.
    seen = data[: len(MAGIC)]
    if seen != MAGIC[: len(seen)]:
        raise UnsupportedFormatError("this is not an azaion-loader encrypted stream")


def _check_chunk_size_log2(chunk_size_log2: int) -> None:
    if not MIN_CHUNK_SIZE_LOG2 <= chunk_size_log2 <= MAX_CHUNK_SIZE_LOG2:
        raise UnsupportedFormatError(
            f"a chunk size of 2^{chunk_size_log2} bytes is not supported (2^"
            f"{MIN_CHUNK_SIZE_LOG2} to 2^{MAX_CHUNK_SIZE_LOG2})"
        )


def _chunk_size_log2(chunk_size: int) -> int:
    log2 = chunk_size.bit_length() - 1
    if chunk_size <= 0 or chunk_size != 1 << log2:
        raise ValueError("the chunk size must be a power of two")
    _check_chunk_size_log2(log2)
    return log2


def _as_bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class Encryptor:
    """Incremental encryption: ``update`` returns the ciphertext ready so far (the first call
    includes the header), ``finalize`` returns the rest (the final chunk).

    A full chunk is sealed only once a byte after it has arrived, because until then it may be
    the final chunk; so at most one chunk of plaintext is buffered.
    """

    def __init__(self, fragments: Sequence[bytes], *, chunk_size: int = CHUNK_SIZE) -> None:
        self._init_from_parts(fragments, os.urandom(SALT_SIZE), chunk_size)

    @classmethod
    def _from_parts(cls, fragments: Sequence[bytes], salt: bytes, chunk_size: int) -> Encryptor:
        """Deterministic construction for test vectors only: a reused salt reuses the key."""
        encryptor = cls.__new__(cls)
        encryptor._init_from_parts(fragments, salt, chunk_size)
        return encryptor

    def _init_from_parts(self, fragments: Sequence[bytes], salt: bytes, chunk_size: int) -> None:
        keys = derive_stream_keys(fragments, salt)
        self._header: bytes | None = make_header(keys, salt, _chunk_size_log2(chunk_size)).pack()
        self._aead = AESGCM(keys.payload_key)
        self._chunk_size = chunk_size
        self._index = 0
        self._pending = bytearray()
        self._finished = False

    def update(self, data: Buffer) -> bytes:
        return b"".join(self.update_parts(data))

    def update_parts(self, data: Buffer) -> list[bytes]:
        """Like ``update``, as a list of pieces (header, chunks): saves joining them."""
        self._check_open()
        parts = self._take_header()
        view = _as_bytes_view(data)
        if self._pending:
            needed = self._chunk_size - len(self._pending)
            if len(view) <= needed:
                self._pending += view
                return parts
            self._pending += view[:needed]
            view = view[needed:]
            parts.append(self._seal(self._pending, last=False))
            self._pending.clear()
        while len(view) > self._chunk_size:  # keep at least one byte: it may end the stream
            parts.append(self._seal(view[: self._chunk_size], last=False))
            view = view[self._chunk_size :]
        self._pending += view
        return parts

    def finalize(self) -> bytes:
        self._check_open()
        parts = self._take_header()
        parts.append(self._seal(self._pending, last=True))
        self._pending.clear()
        self._finished = True
        return b"".join(parts)

    def _seal(self, plaintext: Buffer, *, last: bool) -> bytes:
        self._check_index(last)
        chunk = self._aead.encrypt(nonce_for_chunk(self._index, last), plaintext, None)
        self._index += 1
        return chunk

    def _seal_into(self, plaintext: memoryview, out: memoryview, *, last: bool) -> int:
        """``_seal`` into ``out``, exactly ``len(plaintext) + TAG_SIZE`` bytes; returns that."""
        self._check_index(last)
        self._aead.encrypt_into(nonce_for_chunk(self._index, last), plaintext, None, out)
        self._index += 1
        return len(out)

    def _check_index(self, last: bool) -> None:
        # Chunk MAX_CHUNKS - 1 can only be the final one: its successor would be over the limit.
        if self._index >= (MAX_CHUNKS if last else MAX_CHUNKS - 1):
            raise StreamError(
                f"the plaintext is too long for one stream (over {MAX_CHUNKS} chunks)"
            )

    def _take_header(self) -> list[bytes]:
        header, self._header = self._header, None
        return [header] if header is not None else []

    def _check_open(self) -> None:
        if self._finished:
            raise StreamError("the encryptor is already finalized")


class Decryptor:
    """Incremental decryption: ``update`` returns only plaintext whose chunk has been
    authenticated; ``finalize`` authenticates the final chunk and returns its plaintext.

    A full-size chunk is opened only once a byte after it has arrived (it may be the final
    one), so at most one chunk of ciphertext is buffered. Errors: ``WrongKeyError``,
    ``TamperedError``, ``TruncatedError``, ``TrailingDataError``, ``UnsupportedFormatError``;
    after the first, every call raises it again.
    """

    def __init__(self, fragments: Sequence[bytes]) -> None:
        encode_fragment_set(fragments)  # refuse unusable fragments now, not at the header
        self._fragments = [bytes(fragment) for fragment in fragments]
        self._buffer = bytearray()
        self._header: StreamHeader | None = None
        self._aead: AESGCM | None = None
        self._record_size = 0  # chunk size + tag, known once the header is read
        self._index = 0
        self._finished = False
        self._failure: StreamError | None = None

    @property
    def header(self) -> StreamHeader | None:
        """The stream's header once it has been read and authenticated, else None."""
        return self._header

    def update(self, data: Buffer) -> bytes:
        return b"".join(self.iter_update(data))

    def update_parts(self, data: Buffer) -> list[bytes]:
        """Like ``update``, one verified plaintext piece per chunk: saves joining them."""
        return list(self.iter_update(data))

    def iter_update(self, data: Buffer) -> Generator[bytes, None, None]:
        """Like ``update_parts``, yielding each chunk's plaintext as soon as it is verified, so
        a consumer holds one chunk at a time. Consume it fully before the next call; abandoned
        part-way, it leaves the decryptor failed."""
        return self._guarded(self._open_available(_as_bytes_view(data)))

    def finalize(self) -> bytes:
        """Authenticate the final chunk; ``TruncatedError`` if the stream ended before it."""
        return b"".join(self._guarded(self._open_final()))

    def open_followed_into(self, records: memoryview, count: int, out: memoryview) -> int:
        """Open the first ``count`` full-size records of ``records`` into ``out`` (``count``
        chunk sizes, one after another), with no buffer of its own: for a reader that knows
        more of the stream follows them (none of them is the final chunk). Call it only
        between whole records: after the header, with nothing buffered by ``update``. Returns
        the plaintext bytes written; on an error, ``out`` holds unverified bytes after the
        chunks opened before it: discard it all."""
        if self._failure is not None:
            raise type(self._failure)(self._failure.message)
        if self._aead is None or self._buffer:
            raise StreamError("open_followed_into needs the header read and no partial chunk")
        try:
            return self._open_followed_into(records, count, out)
        except StreamError as exc:
            self._fail(exc)
            raise

    def _guarded(self, steps: Iterator[bytes]) -> Generator[bytes, None, None]:
        if self._failure is not None:
            raise type(self._failure)(self._failure.message)
        try:
            yield from steps
        except StreamError as exc:
            self._fail(exc)
            raise
        except GeneratorExit:
            self._fail(StreamError("the decryption was abandoned part-way through an update"))
            raise

    def _fail(self, failure: StreamError) -> None:
        self._failure = failure
        self._fragments = []
        self._aead = None

    def _open_available(self, view: memoryview) -> Iterator[bytes]:
        if self._finished:
            if view:
                raise TrailingDataError("the stream has data after its final chunk")
            return
        if self._aead is None:
            view = self._read_header(view)
            if self._aead is None:
                return
        if self._buffer:
            needed = self._record_size - len(self._buffer)
            if len(view) <= needed:
                self._buffer += view
                return
            self._buffer += view[:needed]
            view = view[needed:]
            with memoryview(self._buffer) as buffered:
                plaintexts = list(self._open_followed_chunks(buffered, 1))
            self._buffer.clear()
            yield from plaintexts
        followed = (len(view) - 1) // self._record_size  # full records with a byte after them
        yield from self._open_followed_chunks(view, followed)
        self._buffer += view[max(followed, 0) * self._record_size :]

    def _read_header(self, view: memoryview) -> memoryview:
        needed = HEADER_SIZE - len(self._buffer)
        self._buffer += view[:needed]
        _check_magic(bytes(self._buffer[: len(MAGIC)]))
        if len(self._buffer) == HEADER_SIZE:
            header = parse_header(self._buffer)
            keys = open_header(header, self._fragments)
            self._header = header
            self._fragments = []  # the keys are derived; the fragments are no longer needed
            self._aead = AESGCM(keys.payload_key)
            self._record_size = header.chunk_size + TAG_SIZE
            self._buffer.clear()
        return view[needed:]

    def _open_followed_chunks(self, records: memoryview, count: int) -> Iterator[bytes]:
        """Open ``count`` full-size chunks that have bytes after them: none may be the final one.

        The hot loop of the format, kept flat: per chunk, a nonce and one AEAD call.
        """
        assert self._aead is not None
        decrypt, record_size = self._aead.decrypt, self._record_size
        if self._index + count >= MAX_CHUNKS:  # chunk MAX_CHUNKS - 1 could only be the final one
            raise UnsupportedFormatError(
                f"the stream has more than {MAX_CHUNKS} chunks, over the format's limit"
            )
        for offset in range(0, count * record_size, record_size):
            record = records[offset : offset + record_size]
            nonce = self._index.to_bytes(NONCE_SIZE - 1, "big") + b"\x00"
            try:
                plaintext = decrypt(nonce, record, None)
            except InvalidTag:
                raise self._followed_chunk_failure(record) from None
            self._index += 1
            yield plaintext

    def _open_followed_into(self, records: memoryview, count: int, out: memoryview) -> int:
        """``_open_followed_chunks`` into ``out`` (``count`` chunk sizes), without a new buffer
        per chunk; returns the plaintext bytes written. On a failure, the chunks opened before
        the failing one (``_index`` counts them) are in ``out``, verified."""
        assert self._aead is not None
        decrypt_into, record_size = self._aead.decrypt_into, self._record_size
        chunk_size = record_size - TAG_SIZE
        if self._index + count >= MAX_CHUNKS:  # chunk MAX_CHUNKS - 1 could only be the final one
            raise UnsupportedFormatError(
                f"the stream has more than {MAX_CHUNKS} chunks, over the format's limit"
            )
        for i in range(count):
            record = records[i * record_size : (i + 1) * record_size]
            nonce = self._index.to_bytes(NONCE_SIZE - 1, "big") + b"\x00"
            try:
                decrypt_into(nonce, record, None, out[i * chunk_size : (i + 1) * chunk_size])
            except InvalidTag:
                raise self._followed_chunk_failure(record) from None
            self._index += 1
        return count * chunk_size

    def _followed_chunk_failure(self, record: Buffer) -> StreamError:
        """Why a full-size record with bytes after it does not open as chunk ``_index``."""
        if self._try_open(record, last=True) is None:
            return TamperedError(f"chunk {self._index} failed authentication: the data was altered")
        return TrailingDataError(f"the stream has data after its final chunk (chunk {self._index})")

    def _open_final(self) -> Iterator[bytes]:
        if self._finished:
            return
        if self._aead is None:
            raise TruncatedError(
                f"the stream ended inside its header ({len(self._buffer)} of {HEADER_SIZE} bytes)"
            )
        record = self._buffer
        if not record:  # chunks are only opened with a byte after them, so this is chunk 0
            raise TruncatedError("the stream ended after its header, before its first chunk")
        if len(record) < TAG_SIZE or (len(record) == TAG_SIZE and self._index > 0):
            # Shorter than any chunk (an empty final chunk only ends an empty stream).
            raise TruncatedError(f"the stream ended inside chunk {self._index}")
        plaintext = self._try_open(record, last=True)
        if plaintext is None:
            raise self._final_chunk_failure(record)
        self._index += 1
        self._buffer = bytearray()
        self._finished = True
        yield plaintext

    def _final_chunk_failure(self, record: Buffer) -> StreamError:
        """Why the last bytes of the stream do not open as its final chunk."""
        if len(record) < self._record_size:
            # A stream cut inside a chunk, a final chunk altered in place and bytes appended to
            # a short final chunk all look the same; the first (an interrupted copy or
            # download) is by far the likeliest, so the error is TruncatedError.
            return TruncatedError(
                f"chunk {self._index} failed authentication as the final chunk: the stream "
                f"is truncated, or was altered or has bytes appended"
            )
        if self._try_open(record, last=False) is not None:
            return TruncatedError(
                f"the stream ended after chunk {self._index}, before its final chunk"
            )
        return TamperedError(f"chunk {self._index} failed authentication: the data was altered")

    def _try_open(self, record: Buffer, *, last: bool) -> bytes | None:
        """The chunk's plaintext if it authenticates as chunk ``_index`` (final or not)."""
        assert self._aead is not None
        if self._index >= MAX_CHUNKS:
            raise UnsupportedFormatError(
                f"the stream has more than {MAX_CHUNKS} chunks, over the format's limit"
            )
        try:
            return self._aead.decrypt(nonce_for_chunk(self._index, last), record, None)
        except InvalidTag:
            return None


def encrypt_iter(
    chunks: Iterable[Buffer], fragments: Sequence[bytes], *, chunk_size: int = CHUNK_SIZE
) -> Iterator[bytes]:
    """Encrypt a stream of byte pieces of any sizes; yields header and chunks as they are ready."""
    encryptor = Encryptor(fragments, chunk_size=chunk_size)
    for piece in chunks:
        yield from encryptor.update_parts(piece)
    yield encryptor.finalize()


def decrypt_iter(chunks: Iterable[Buffer], fragments: Sequence[bytes]) -> Iterator[bytes]:
    """Decrypt a stream of byte pieces of any sizes; yields only authenticated plaintext."""
    decryptor = Decryptor(fragments)
    for piece in chunks:
        yield from decryptor.iter_update(piece)
    final = decryptor.finalize()
    if final:
        yield final


def encrypt_file(
    fin: BinaryIO, fout: BinaryIO, fragments: Sequence[bytes], *, chunk_size: int = CHUNK_SIZE
) -> int:
    """Encrypt ``fin`` to ``fout`` in bounded memory; returns the ciphertext bytes written.

    The same stream as ``encrypt_iter``; reads about ``FILE_READ_SIZE`` at a time into one
    reused buffer and writes each round's chunks in one call, sealed into another.
    """
    encryptor = Encryptor(fragments, chunk_size=chunk_size)
    written = sum(_write(fout, header) for header in encryptor._take_header())
    batch = _chunks_per_read(chunk_size)
    plaintext = memoryview(bytearray((batch + 1) * chunk_size))  # + the chunk held back
    out = memoryview(bytearray((batch + 1) * (chunk_size + TAG_SIZE)))
    filled = _fill(fin, plaintext)
    while filled == len(plaintext):  # every chunk but the last has a byte after it
        done = 0
        for start in range(0, batch * chunk_size, chunk_size):
            end = done + chunk_size + TAG_SIZE
            done += encryptor._seal_into(
                plaintext[start : start + chunk_size], out[done:end], last=False
            )
        _write(fout, out[:done])
        written += done
        plaintext[:chunk_size] = plaintext[batch * chunk_size :]
        filled = chunk_size + _fill(fin, plaintext[chunk_size:])
    # The input has ended: the full chunks before the last piece, then the final chunk.
    followed = max(0, (filled - 1) // chunk_size)
    done = 0
    for start in range(0, (followed + 1) * chunk_size, chunk_size):
        piece = plaintext[start : min(start + chunk_size, filled)]
        end = done + len(piece) + TAG_SIZE
        done += encryptor._seal_into(piece, out[done:end], last=start == followed * chunk_size)
    _write(fout, out[:done])
    return written + done


def decrypt_file(fin: BinaryIO, fout: BinaryIO, fragments: Sequence[bytes]) -> int:
    """Decrypt ``fin`` to ``fout`` in bounded memory; returns the plaintext bytes written.

    Only authenticated plaintext reaches ``fout``; on an error, what was written is a prefix of
    the plaintext (every chunk verified before the failing one) and the caller must discard it.
    The same checks as ``decrypt_iter``; reads about ``FILE_READ_SIZE`` at a time into one
    reused buffer and writes each round's plaintext in one call, opened into another.
    """
    decryptor = Decryptor(fragments)
    header = memoryview(bytearray(HEADER_SIZE))
    decryptor.update(header[: _fill(fin, header)])  # the header alone: no plaintext yet
    if decryptor.header is None:  # the input ended inside the header: finalize says so
        return _write(fout, decryptor.finalize())
    chunk_size = decryptor.header.chunk_size
    record_size = chunk_size + TAG_SIZE
    batch = _chunks_per_read(chunk_size)
    records = memoryview(bytearray((batch + 1) * record_size))  # + the record held back
    out = memoryview(bytearray(batch * chunk_size))
    written = 0
    filled = _fill(fin, records)
    while True:
        # Full records with a byte after them; a full buffer holds its last record back.
        followed = batch if filled == len(records) else max(0, (filled - 1) // record_size)
        opened_before = decryptor._index
        try:
            done = decryptor._open_followed_into(records, followed, out)
        except StreamError:
            _write(fout, out[: (decryptor._index - opened_before) * chunk_size])
            raise
        _write(fout, out[:done])
        written += done
        if filled < len(records):
            break
        records[:record_size] = records[batch * record_size :]
        filled = record_size + _fill(fin, records[record_size:])
    # The input has ended: what is left (at most one record) must be the final chunk.
    decryptor.update(records[followed * record_size : filled])
    return written + _write(fout, decryptor.finalize())


def _chunks_per_read(chunk_size: int) -> int:
    return max(1, FILE_READ_SIZE // chunk_size)


def _fill(fin: BinaryIO, view: memoryview) -> int:
    """Read into ``view`` until it is full or the input ends; returns the bytes read."""
    readinto = getattr(fin, "readinto", None)
    filled = 0
    while filled < len(view):
        if readinto is not None:
            count = readinto(view[filled:])
        else:  # a file-like object with ``read`` only
            piece = fin.read(len(view) - filled)
            count = len(piece)
            view[filled : filled + count] = piece
        if not count:
            break
        filled += count
    return filled


def _write(fout: BinaryIO, data: Buffer) -> int:
    """Write all of ``data`` (nothing for no bytes); returns its length."""
    if data:
        fout.write(data)
    return len(data)


def ciphertext_size(plaintext_size: int, *, chunk_size: int = CHUNK_SIZE) -> int:
    """The exact size of the stream that encrypts ``plaintext_size`` bytes."""
    if plaintext_size < 0:
        raise ValueError("a size cannot be negative")
    _chunk_size_log2(chunk_size)
    chunks = max(1, -(-plaintext_size // chunk_size))
    return HEADER_SIZE + plaintext_size + chunks * TAG_SIZE


def plaintext_size(ciphertext_size: int, *, chunk_size: int = CHUNK_SIZE) -> int:
    """The exact plaintext size of a complete stream of ``ciphertext_size`` bytes.

    Raises ``TruncatedError`` if no complete stream has that size.
    """
    if ciphertext_size < 0:
        raise ValueError("a size cannot be negative")
    _chunk_size_log2(chunk_size)
    body = ciphertext_size - HEADER_SIZE
    if body < TAG_SIZE:
        raise TruncatedError(f"{ciphertext_size} bytes is too short for a complete stream")
    record_size = chunk_size + TAG_SIZE
    full_records, rest = divmod(body, record_size)
    if body == TAG_SIZE:
        return 0  # the empty stream: one empty final chunk
    if 0 < rest <= TAG_SIZE:
        raise TruncatedError(f"{ciphertext_size} bytes is not the size of a complete stream")
    chunks = full_records + (1 if rest else 0)
    return body - chunks * TAG_SIZE
