"""Resources: encrypt, split, store; fetch, verify, decrypt (docs/resource-api.md, "Why two parts").

Upload: the plaintext is encrypted with the stream format (``agent.stream``) under two fresh
random key fragments. The **small part** (Resource API) is an envelope holding the first
fragment, the stream header and the first ``HEAD_DATA_BYTES`` of ciphertext, and the big part's
name, length and SHA-256. The **big part** (CDN) is the second fragment followed by the rest of
the ciphertext. The data keys come from both fragments, so either part alone opens nothing.
The big part is named by its SHA-256, so a name never changes meaning; the small part is stored
last and is the commit.

Load: the small part comes from the API on every load (it is never cached: on disk next to the
big part it would undo the split); the big part comes from the cache if intact, else from the
CDN (resumed, shared between concurrent loads). Plaintext exists only in memory, a few MiB at
most per load; crypto runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent import keys, stream
from agent.api_client import BodyInterrupted, RangeNotSatisfiable, ResourceApiClient
from agent.cache import BigPartCache, RangeRefused, Spool, check_component
from agent.errors import StreamError, UpstreamError

READ_SIZE = 256 * 1024  # ciphertext per read from the cache
UPLOAD_BATCH = 1024 * 1024  # plaintext per worker-thread step when encrypting an upload
STEP_READS = 8  # reads per worker-thread step: a thread hop costs as much as ~100 KiB of AES
HEAD_DATA_BYTES = 4096  # ciphertext after the stream header that stays in the small part
HEAD_SIZE = stream.HEADER_SIZE + HEAD_DATA_BYTES
BIG_NAME = re.compile(r"[0-9a-f]{64}")

SMALL_MAGIC = b"AZSP"
SMALL_VERSION = 1
# magic, version, fragment length | fragment | big size, big sha256, big name length | name |
# head length | head
_SMALL_PREFIX = struct.Struct(">4sBH")
_SMALL_BIG = struct.Struct(">Q32sB")
_SMALL_HEAD = struct.Struct(">I")


@dataclass(frozen=True, repr=False)
class SmallPart:
    """What the Resource API keeps for one resource."""

    fragment: bytes
    big_name: str
    big_size: int
    big_sha256: bytes
    head: bytes

    def pack(self) -> bytes:
        name = self.big_name.encode("ascii")
        return b"".join(
            (
                _SMALL_PREFIX.pack(SMALL_MAGIC, SMALL_VERSION, len(self.fragment)),
                self.fragment,
                _SMALL_BIG.pack(self.big_size, self.big_sha256, len(name)),
                name,
                _SMALL_HEAD.pack(len(self.head)),
                self.head,
            )
        )

    @classmethod
    def unpack(cls, data: bytes) -> SmallPart:
        """Parse an envelope; ``ValueError`` if it is not one (the caller names the source)."""
        try:
            magic, version, fragment_length = _SMALL_PREFIX.unpack_from(data, 0)
            offset = _SMALL_PREFIX.size
            fragment = data[offset : offset + fragment_length]
            offset += fragment_length
            big_size, big_sha256, name_length = _SMALL_BIG.unpack_from(data, offset)
            offset += _SMALL_BIG.size
            big_name = data[offset : offset + name_length].decode("ascii")
            offset += name_length
            (head_length,) = _SMALL_HEAD.unpack_from(data, offset)
            offset += _SMALL_HEAD.size
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError("not a small part envelope") from exc
        head = data[offset:]
        if magic != SMALL_MAGIC or version != SMALL_VERSION:
            raise ValueError("not a small part envelope of a known version")
        if len(fragment) != fragment_length or len(head) != head_length:
            raise ValueError("the small part envelope is cut short or has extra bytes")
        if not keys.MIN_FRAGMENT_SIZE <= fragment_length <= keys.MAX_FRAGMENT_SIZE:
            raise ValueError("the small part envelope holds no usable key fragment")
        if not BIG_NAME.fullmatch(big_name) or big_name != big_sha256.hex():
            raise ValueError("the small part envelope names its big part wrongly")
        return cls(fragment, big_name, big_size, big_sha256, head)


@dataclass(frozen=True)
class UploadResult:
    folder: str
    name: str
    size: int
    small_size: int
    big_size: int
    big_sha256: str


class ResourceStore:
    """Uploads and loads resources through the Resource API, the CDN and the big-part cache."""

    def __init__(self, api: ResourceApiClient, cache_dir: Path) -> None:
        self._api = api
        # Opening a download is retried by the client; resuming one that broke off, here.
        self._cache = BigPartCache(cache_dir, policy=api.policy, resumable=(BodyInterrupted,))

    @property
    def cache(self) -> BigPartCache:
        return self._cache

    async def close(self) -> None:
        await self._cache.close()

    # -- upload --------------------------------------------------------------------------------

    async def upload(self, folder: str, name: str, chunks: AsyncIterable[bytes]) -> UploadResult:
        """Encrypt ``chunks``, store the big part on the CDN (and in the cache), then the small
        part on the API. Memory stays bounded: the big part is spooled to the cache dir."""
        check_component(folder, "folder")
        check_component(name, "name")
        small_fragment, big_fragment = keys.generate_fragment(), keys.generate_fragment()
        splitter = _Splitter(stream.Encryptor([small_fragment, big_fragment]))
        with self._cache.spool(folder) as spool:
            await asyncio.to_thread(spool.write, _big_prefix(big_fragment))
            size = await _encrypt_into(chunks, splitter, spool)
            await asyncio.to_thread(splitter.finish, spool)
            small = SmallPart(
                small_fragment, spool.sha256.hex(), spool.size, spool.sha256, bytes(splitter.head)
            )
            big_path = self._cache.commit(spool, folder, small.big_name)
        try:
            await self._api.put_big_part(
                folder, small.big_name, big_path, small.big_size, sha256=small.big_name
            )
            packed = small.pack()
            await self._api.put_small_part(folder, name, packed)
        except BaseException:
            self._cache.forget(big_path)  # no small part will ever point at it
            raise
        return UploadResult(folder, name, size, len(packed), small.big_size, small.big_name)

    # -- load ----------------------------------------------------------------------------------

    async def open(self, folder: str, name: str) -> Resource:
        """Fetch what is needed to stream the resource; ``Resource.size`` is known at once."""
        check_component(folder, "folder")
        check_component(name, "name")
        raw = await self._api.get_small_part(folder, name)
        try:
            small = SmallPart.unpack(raw)
        except ValueError as exc:
            raise UpstreamError(
                f"the Resource API sent a small part for {folder}/{name} that this agent cannot "
                f"read ({exc})"
            ) from exc

        async def download(offset: int) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._api.iter_big_part(folder, small.big_name, offset=offset):
                    yield chunk
            except RangeNotSatisfiable as exc:
                raise RangeRefused(str(exc)) from exc

        for last_try in (False, True):
            path = await self._cache.fetch(
                folder, small.big_name, small.big_size, small.big_sha256, download
            )
            try:
                # Held open from here: a concurrent drop of the file cannot pull it away.
                file = path.open("rb")
                break
            except FileNotFoundError:  # dropped between the fetch and now: fetch again
                if last_try:
                    raise UpstreamError(
                        f"the cached big part of {folder}/{name} keeps disappearing"
                    ) from None
        try:
            return Resource(small, file, lambda: self._cache.forget(path))
        except BaseException:
            file.close()
            raise


class Resource:
    """A resource being loaded: ``size`` is its plaintext length; iterate for verified chunks.

    The big part is already complete and intact on disk when this exists. A worker thread reads
    and decrypts it one step (``STEP_READS`` reads of ``READ_SIZE``) ahead of the consumer, so
    decrypting overlaps with sending; the chunks handed out are the format's verified chunks
    (64 KiB). Should one still fail to authenticate (the file was altered behind the cache's
    back), the cached file is dropped and the error raised. Always ``aclose`` it (or exhaust
    it): that releases the file.
    """

    def __init__(
        self, small: SmallPart, file: io.BufferedReader, forget: Callable[[], None]
    ) -> None:
        self._small = small
        self._file = file
        self._forget = forget
        big_fragment = _read_big_prefix(file)
        try:
            header = stream.parse_header(small.head)
            ciphertext_size = len(small.head) + small.big_size - (1 + len(big_fragment))
            self.size = stream.plaintext_size(ciphertext_size, chunk_size=header.chunk_size)
        except StreamError as exc:
            raise UpstreamError(f"the small part holds no valid stream header ({exc})") from exc
        self._decryptor = stream.Decryptor([small.fragment, big_fragment])
        self._buffer = bytearray(READ_SIZE)  # reused: big allocations per read cost more than AES
        self._ready: deque[bytes] = deque()
        self._started = False
        self._exhausted = False  # the worker has read and authenticated the final chunk
        self._closed = False
        self._decrypted = 0
        self._next: asyncio.Future[list[bytes]] | None = None  # the step in the worker thread

    def __aiter__(self) -> Resource:
        return self

    async def __anext__(self) -> bytes:
        while not self._ready:
            if self._closed or (self._exhausted and self._next is None):
                await self.aclose()
                raise StopAsyncIteration
            step = self._next or self._start_step()
            try:
                # Shielded: a consumer that goes away must not orphan a thread using the file.
                chunks = await asyncio.shield(step)
            except StreamError:
                self._forget()
                await self.aclose()
                raise
            self._next = None if self._exhausted else self._start_step()
            self._ready.extend(chunk for chunk in chunks if chunk)
        return self._ready.popleft()

    def _start_step(self) -> asyncio.Future[list[bytes]]:
        self._next = asyncio.ensure_future(asyncio.to_thread(self._step))
        return self._next

    def _step(self) -> list[bytes]:
        """In the worker thread: the verified plaintext of the next ``STEP_READS`` reads."""
        chunks: list[bytes] = []
        if not self._started:
            self._started = True
            chunks += self._decryptor.update_parts(self._small.head)
        view = memoryview(self._buffer)
        for _ in range(STEP_READS):
            count = self._file.readinto(self._buffer)
            if not count:
                chunks.append(self._decryptor.finalize())
                self._exhausted = True
                break
            chunks += self._decryptor.update_parts(view[:count])
        self._decrypted += sum(len(chunk) for chunk in chunks)
        if self._exhausted and self._decrypted != self.size:
            raise StreamError("the decrypted resource is not the length its parts record")
        return chunks

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        if self._next is not None:  # let the worker finish with the file before closing it
            await asyncio.gather(self._next, return_exceptions=True)
            self._next = None
        self._file.close()

    async def __aenter__(self) -> Resource:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Splitter:
    """Routes ciphertext: the first ``HEAD_SIZE`` bytes to the small part, the rest to the spool."""

    def __init__(self, encryptor: stream.Encryptor) -> None:
        self._encryptor = encryptor
        self.head = bytearray()

    def feed(self, plaintext: bytes, spool: Spool) -> None:
        self._route(self._encryptor.update_parts(plaintext), spool)

    def finish(self, spool: Spool) -> None:
        self._route([self._encryptor.finalize()], spool)
        spool.finish()

    def _route(self, pieces: list[bytes], spool: Spool) -> None:
        for piece in pieces:
            room = HEAD_SIZE - len(self.head)
            if room > 0:
                self.head += piece[:room]
                piece = piece[room:]
            if piece:
                spool.write(piece)


async def _encrypt_into(chunks: AsyncIterable[bytes], splitter: _Splitter, spool: Spool) -> int:
    """Feed the upload through the encryptor in ``UPLOAD_BATCH`` steps; returns plaintext size."""
    size = 0
    batch = bytearray()
    async for chunk in chunks:
        size += len(chunk)
        batch += chunk
        if len(batch) >= UPLOAD_BATCH:
            await asyncio.to_thread(splitter.feed, bytes(batch), spool)
            batch.clear()
    if batch:
        await asyncio.to_thread(splitter.feed, bytes(batch), spool)
    return size


def _big_prefix(fragment: bytes) -> bytes:
    """The big part starts with its key fragment, length-prefixed."""
    return bytes([len(fragment)]) + fragment


def _read_big_prefix(file: io.BufferedReader) -> bytes:
    """The big part's key fragment (the big part was verified against its SHA-256 already)."""
    length = file.read(1)
    fragment = file.read(length[0]) if length else b""
    if not length or len(fragment) != length[0]:
        raise StreamError("the cached big part is shorter than its key fragment")
    if len(fragment) < keys.MIN_FRAGMENT_SIZE:
        raise StreamError("the big part does not start with a usable key fragment")
    return fragment
