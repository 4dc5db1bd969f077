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
CDN (``agent.download``: resumed, shared between concurrent loads, and read while it downloads:
the load starts once the big part's key fragment is on disk). A small part's claim is
checked before anything is downloaded (``plaintext_size``: a size a resource can have, within
``LOADER_MAX_RESOURCE_BYTES``). Plaintext exists only in memory, a block of ``BLOCK_SIZE`` at a
time per load (plus what the socket holds). Upload crypto runs in a worker thread; load crypto
runs on the loop in short turns (see ``Resource``).

``ResourceStore.stats`` counts the plaintext bytes handed out, one addition per block, for
``/metrics`` (the downloads keep their own ``stats``: cache hits, misses, retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import itertools
import os
import re
import struct
from collections.abc import AsyncIterable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from loguru import logger

from agent import keys, stream
from agent.api_client import ResourceApiClient
from agent.cache import BigPartCache, Spool, check_component
from agent.download import BigPartDownloads, GrowingFile
from agent.errors import LoaderError, StreamError, TruncatedError, UpstreamError
from agent.schemas import UploadResult

READ_SIZE = 1024 * 1024  # ciphertext per read: a record split between reads costs a copy
# Plaintext per __anext__: 192 KiB fits a Unix socket's default send buffer (208 KiB), so the
# handler's write usually leaves in one send(); what send() does not take, Python 3.11's
# transport copies into its own buffer (bigger blocks measured slower, single chunks too).
BLOCK_SIZE = 192 * 1024
TURN_SECONDS = 0.00025  # a load lets other tasks run at least this often (/health p99)
UPLOAD_BATCH = 1024 * 1024  # plaintext per worker-thread step when encrypting an upload
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


@dataclass
class ResourceStats:
    """What ``/metrics`` reads of the loads: verified plaintext handed out, over all loads."""

    decrypted_bytes: int = 0


class ResourceStore:
    """Uploads and loads resources through the Resource API, the CDN and the big-part cache."""

    def __init__(
        self, api: ResourceApiClient, cache_dir: Path, *, max_resource_bytes: int = 16 << 30
    ) -> None:
        """``max_resource_bytes``: the largest big part a small part may claim (setting
        ``LOADER_MAX_RESOURCE_BYTES``); more is a 502 before anything is downloaded."""
        self._api = api
        self._max_big_size = max_resource_bytes
        self._cache = BigPartCache(cache_dir)
        self._downloads = BigPartDownloads(api, self._cache)
        self.stats = ResourceStats()

    @property
    def cache(self) -> BigPartCache:
        return self._cache

    @property
    def downloads(self) -> BigPartDownloads:
        return self._downloads

    async def close(self) -> None:
        await self._downloads.close()

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
        stored_big = False
        try:
            await self._api.put_big_part(
                folder, small.big_name, big_path, small.big_size, sha256=small.big_name
            )
            stored_big = True
            packed = small.pack()
            await self._api.put_small_part(folder, name, packed)
        except BaseException as exc:
            self._cache.forget(big_path)  # no small part will ever point at it
            if stored_big and _refused(exc):
                await self._remove_orphan(folder, small.big_name)
            raise
        return UploadResult(
            folder=folder,
            name=name,
            size=size,
            small_size=len(packed),
            big_size=small.big_size,
            big_sha256=small.big_name,
        )

    async def _remove_orphan(self, folder: str, big_name: str) -> None:
        """The big part of an upload whose small part was not stored: nothing will ever name
        it (its name is the hash of fresh random keys), so it goes from the CDN again."""
        try:
            await asyncio.shield(self._api.delete_big_part(folder, big_name))
        except (LoaderError, asyncio.CancelledError) as exc:
            logger.warning(
                "could not remove big part {}/{} of a failed upload from the CDN: {}",
                folder,
                big_name,
                exc,
            )

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
        self._check_claimed_size(small, folder, name)
        # From the cache, or following the download as it writes the file: once the big
        # part's key fragment is on disk, the load starts (``Resource._read`` waits for more).
        file = await self._downloads.open(
            folder,
            small.big_name,
            small.big_size,
            small.big_sha256,
            what=f"big part of {folder}/{name}",
            ahead=1 + keys.MAX_FRAGMENT_SIZE,
        )
        path = self._cache.path(folder, small.big_name)
        following = isinstance(file.raw, GrowingFile)
        try:
            if following:
                return _Following(small, file, lambda: self._downloads.forget(path), self.stats)
            return Resource(small, file, lambda: self._downloads.forget(path), self.stats)
        except StreamError as exc:
            file.close()
            if not following:
                raise
            self._downloads.forget(path)  # what the CDN sent so far is bad
            raise _Following.blame(exc) from exc
        except BaseException:
            file.close()
            raise

    def _check_claimed_size(self, small: SmallPart, folder: str, name: str) -> None:
        """The big part's recorded size must be one a resource can have, and within bounds,
        before a byte is downloaded or a byte of disk is planned for it."""
        what = f"the Resource API's small part of {folder}/{name}"
        if small.big_size > self._max_big_size:
            raise UpstreamError(
                f"{what} claims a big part of {small.big_size} bytes, over this device's limit "
                f"of {self._max_big_size} (LOADER_MAX_RESOURCE_BYTES)"
            )
        try:
            stream.parse_header(small.head)
        except StreamError as exc:
            raise UpstreamError(f"{what} holds no valid stream header ({exc})") from exc
        for fragment_length in range(keys.MIN_FRAGMENT_SIZE, keys.MAX_FRAGMENT_SIZE + 1):
            with contextlib.suppress(TruncatedError):
                plaintext_size(small, fragment_length)
                return
        raise UpstreamError(f"{what} records a big part of an impossible size ({small.big_size})")


class Resource:
    """A resource being loaded: ``size`` is its plaintext length; iterate for verified blocks.

    The big part is on disk (intact), or being written by its download (``_read`` waits for
    the bytes it needs; only what authenticates is handed out). Each ``__anext__``
    hands out the verified plaintext of a few chunks of the format (``BLOCK_SIZE``), decrypted
    right then; the ciphertext is read ``READ_SIZE`` at a time. Both run on the event loop in
    short turns (``TURN_SECONDS``) when the file is in the page cache (see ``_read``):
    cryptography holds the GIL while it decrypts, so a worker thread would not run the AES
    beside the loop anyway; it only added a thread hop per step, moved the bytes to another
    core's cache and had the allocator trim and fault in pages again for every step's chunks
    (/load over the socket, 1 GiB, the two versions interleaved: 1.3x the throughput and 1.45x
    per CPU second of the worker-thread version; /health p99 under 10 ms for both). A read that
    would wait for the disk runs in a worker thread. Should a chunk fail to authenticate (the
    file was altered behind the cache's back), the cached file is dropped and the error raised;
    the block it was part of is never handed out. Always ``aclose`` it (or exhaust it): that
    releases the file.
    """

    def __init__(
        self,
        small: SmallPart,
        file: io.BufferedReader,
        forget: Callable[[], None],
        stats: ResourceStats,
    ) -> None:
        self._file = file
        self._forget = forget
        self._stats = stats
        big_fragment = _read_big_prefix(file)
        try:
            self.size = plaintext_size(small, len(big_fragment))
            chunk_size = stream.parse_header(small.head).chunk_size
        except StreamError as exc:
            raise UpstreamError(f"the small part holds no valid stream header ({exc})") from exc
        self._decryptor = stream.Decryptor([small.fragment, big_fragment])
        self._chunks_per_block = max(1, BLOCK_SIZE // chunk_size)
        self._buffer = bytearray(READ_SIZE)  # reused: fresh big buffers cost page faults
        self._offset = file.tell()  # where the ciphertext goes on; reads are positional
        # Decrypts lazily: each chunk as it is asked for. The buffer is read into again only
        # once all its chunks have been.
        self._chunks: Iterator[bytes] = self._decryptor.iter_update(small.head)
        self._nowait = True  # page-cache reads on the loop, unless the file system refuses them
        self._reading: asyncio.Future[int] | None = None  # a read in a worker thread
        self._turn_ends = 0.0  # loop time at which this load lets other tasks run
        self._exhausted = False  # the final chunk has been read and authenticated
        self._closed = False
        self._decrypted = 0

    @property
    def closed(self) -> bool:
        """Whether the big part's file has been released (``aclose``, or read to the end)."""
        return self._file.closed

    def __aiter__(self) -> Resource:
        return self

    async def __anext__(self) -> bytes:
        try:
            while not self._closed:
                await self._take_turns()
                block = b"".join(itertools.islice(self._chunks, self._chunks_per_block))
                if block:
                    self._decrypted += len(block)
                    self._stats.decrypted_bytes += len(block)
                    return block
                if self._exhausted:
                    break
                self._chunks = await self._next_chunks()
        except StreamError:
            self._forget()
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def _take_turns(self) -> None:
        """Let other tasks run once this load has had the loop for ``TURN_SECONDS``: a consumer
        whose writes never wait (a fast reader) must not starve them."""
        loop = asyncio.get_running_loop()
        if loop.time() >= self._turn_ends:
            await asyncio.sleep(0)
            self._turn_ends = loop.time() + TURN_SECONDS

    async def _next_chunks(self) -> Iterator[bytes]:
        count = await self._read()
        if count:
            self._offset += count
            return self._decryptor.iter_update(memoryview(self._buffer)[:count])
        self._exhausted = True
        final = self._decryptor.finalize()
        if self._decrypted + len(final) != self.size:
            raise StreamError("the decrypted resource is not the length its parts record")
        return iter((final,))

    async def _read(self) -> int:
        """Fill the buffer from the file: right here if the bytes are in the page cache (a copy
        of 1 MiB, ~0.1 ms), else in a worker thread, as a read from the disk may block."""
        if isinstance(self._file.raw, GrowingFile):  # the download is still writing it
            await self._file.raw.wait_for(self._offset + len(self._buffer))
        fd = self._file.fileno()
        if self._reading is None and self._nowait:
            try:
                return os.preadv(fd, [self._buffer], self._offset, os.RWF_NOWAIT)
            except BlockingIOError:
                pass  # not in the page cache (yet)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait = False
        if self._reading is None:  # else: the read a cancelled call left behind, same offset
            self._reading = asyncio.ensure_future(
                asyncio.to_thread(os.preadv, fd, [self._buffer], self._offset)
            )
        # Shielded: a consumer that goes away must not orphan a thread using the file.
        count = await asyncio.shield(self._reading)
        self._reading = None
        return count

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._chunks = iter(())
        if self._reading is not None:  # let the worker finish with the file before closing it
            await asyncio.gather(self._reading, return_exceptions=True)
            self._reading = None
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


class _Following(Resource):
    """A resource read while its big part downloads: bytes that do not authenticate are the
    CDN's doing (the SHA-256 check would refuse them too, at the end), not a wrong key."""

    async def __anext__(self) -> bytes:
        try:
            return await super().__anext__()
        except StreamError as exc:
            raise self.blame(exc) from exc

    @staticmethod
    def blame(exc: StreamError) -> UpstreamError:
        return UpstreamError(
            f"the CDN sent a big part with content that does not match its record ({exc})"
        )


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


def _refused(exc: BaseException) -> bool:
    """Whether the API certainly did not store the small part: it answered a redirect or a
    4xx. After a timeout, a 5xx or a lost connection it may have stored it (or an earlier
    attempt did): removing the big part then could break a stored resource, so it stays."""
    status = exc.upstream_status if isinstance(exc, LoaderError) else None
    return status is not None and 300 <= status < 500


def plaintext_size(small: SmallPart, fragment_length: int) -> int:
    """The plaintext length of the resource that ``small`` records, if its big part starts
    with a key fragment of ``fragment_length`` bytes (length-prefixed, ``_big_prefix``).
    ``StreamError`` if the small part holds no stream header; ``TruncatedError`` if no
    complete stream has that length."""
    header = stream.parse_header(small.head)
    if small.big_size < 1 + fragment_length:
        raise TruncatedError("the big part is shorter than its key fragment")
    ciphertext_size = len(small.head) + small.big_size - (1 + fragment_length)
    return stream.plaintext_size(ciphertext_size, chunk_size=header.chunk_size)


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
