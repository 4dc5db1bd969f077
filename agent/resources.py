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
``LOADER_MAX_RESOURCE_BYTES``). Plaintext exists only in memory, in blocks that all loads
together take from one bounded pool (``LoadBuffers``, ``LOADER_LOAD_BUFFER_MIB``). Upload
crypto runs in a worker thread; a load decrypts its next block on the loop in short turns
while its caller is sent the current one (see ``Resource``).

``ResourceStore.stats`` counts the plaintext bytes handed out, one addition per block, for
``/metrics`` (the downloads keep their own ``stats``: cache hits, misses, retries).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import re
import secrets
import struct
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography.exceptions import InvalidSignature
from loguru import logger

from agent import keys, stream
from agent.api_client import ResourceApiClient
from agent.cache import BigPartCache, Spool, check_component
from agent.download import BigPartDownloads, GrowingFile
from agent.errors import (
    ConflictError,
    LoaderError,
    NotFoundError,
    RequestError,
    SignatureError,
    StreamError,
    TamperedError,
    TruncatedError,
    UpstreamError,
)
from agent.releases import ResourceReleases
from agent.schemas import UploadResult
from agent.signing import (
    PUBLIC_KEY_SIZE,
    Kind,
    PublicKey,
    SignatureBlock,
    Statement,
    TrustStore,
    key_id_of,
    resource_ciphertext,
    resource_manifest,
)

READ_SIZE = 1024 * 1024  # ciphertext per block (at the default chunk size, 16 chunks)
BLOCK_CHUNKS = READ_SIZE // stream.CHUNK_SIZE  # per block: as many chunks of other sizes as fit
LOAD_BUFFER_BYTES = 32 * 1024 * 1024  # default of LOADER_LOAD_BUFFER_MIB
TURN_SECONDS = 0.0005  # load work per loop iteration, all loads together (LoadTurns)
UPLOAD_BATCH = 1024 * 1024  # plaintext per worker-thread step when encrypting an upload
HEAD_DATA_BYTES = 4096  # ciphertext after the stream header that stays in the small part
HEAD_SIZE = stream.HEADER_SIZE + HEAD_DATA_BYTES
BIG_NAME = re.compile(r"[0-9a-f]{64}")

SMALL_MAGIC = b"AZSP"
SMALL_VERSION = 1  # unsigned
SMALL_VERSION_SIGNED = 2  # the same, then the publisher's signature block
# magic, version, fragment length | fragment | big size, big sha256, big name length | name |
# head length | head [| block length | signature block]  (version 2)
_SMALL_PREFIX = struct.Struct(">4sBH")
_SMALL_BIG = struct.Struct(">Q32sB")
_SMALL_HEAD = struct.Struct(">I")
_SMALL_BLOCK = struct.Struct(">H")
MAX_PENDING_SIGNATURES = 4  # uploads encrypted and waiting for their publisher's signature
PENDING_SIGNATURE_SECONDS = 600.0  # how long one waits before its spooled big part is dropped


@dataclass(frozen=True, repr=False)
class SmallPart:
    """What the Resource API keeps for one resource (docs/format.md, "Resources"): with the
    publisher's ``signature`` block when the upload was signed (``upload --sign-key``)."""

    fragment: bytes
    big_name: str
    big_size: int
    big_sha256: bytes
    head: bytes
    signature: SignatureBlock | None = None

    def pack(self) -> bytes:
        name = self.big_name.encode("ascii")
        version = SMALL_VERSION if self.signature is None else SMALL_VERSION_SIGNED
        parts = [
            _SMALL_PREFIX.pack(SMALL_MAGIC, version, len(self.fragment)),
            self.fragment,
            _SMALL_BIG.pack(self.big_size, self.big_sha256, len(name)),
            name,
            _SMALL_HEAD.pack(len(self.head)),
            self.head,
        ]
        if self.signature is not None:
            block = self.signature.pack()
            parts += [_SMALL_BLOCK.pack(len(block)), block]
        return b"".join(parts)

    def ciphertext(self) -> tuple[int, bytes]:
        """The ciphertext size and digest a publisher signature covers (``signing``)."""
        return resource_ciphertext(self.head, self.big_size, self.big_sha256)

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
            head = data[offset : offset + head_length]
            offset += head_length
            block = b""
            if version == SMALL_VERSION_SIGNED:
                (block_length,) = _SMALL_BLOCK.unpack_from(data, offset)
                offset += _SMALL_BLOCK.size
                block = data[offset : offset + block_length]
                offset += block_length
                if len(block) != block_length:
                    raise struct.error("cut short")
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError("not a small part envelope") from exc
        if magic != SMALL_MAGIC or version not in (SMALL_VERSION, SMALL_VERSION_SIGNED):
            raise ValueError("not a small part envelope of a known version")
        if len(fragment) != fragment_length or len(head) != head_length or offset != len(data):
            raise ValueError("the small part envelope is cut short or has extra bytes")
        if not keys.MIN_FRAGMENT_SIZE <= fragment_length <= keys.MAX_FRAGMENT_SIZE:
            raise ValueError("the small part envelope holds no usable key fragment")
        if not BIG_NAME.fullmatch(big_name) or big_name != big_sha256.hex():
            raise ValueError("the small part envelope names its big part wrongly")
        signature = None
        if version == SMALL_VERSION_SIGNED:
            try:
                signature = SignatureBlock.unpack(bytes(block))
            except SignatureError as exc:
                raise ValueError(f"its signature block is unreadable: {exc}") from None
        return cls(fragment, big_name, big_size, big_sha256, head, signature)


@dataclass
class ResourceStats:
    """What ``/metrics`` reads of the loads: verified plaintext handed out, over all loads."""

    decrypted_bytes: int = 0


class ResourceStore:
    """Uploads and loads resources through the Resource API, the CDN and the big-part cache."""

    def __init__(
        self,
        api: ResourceApiClient,
        cache_dir: Path,
        *,
        max_resource_bytes: int = 16 << 30,
        load_buffer_bytes: int = LOAD_BUFFER_BYTES,
        publishers_dir: Path | None = None,
        state_dir: Path | None = None,
        allow_downgrade: bool = False,
    ) -> None:
        """``max_resource_bytes``: the largest big part a small part may claim (setting
        ``LOADER_MAX_RESOURCE_BYTES``); more is a 502 before anything is downloaded.
        ``load_buffer_bytes``: the bound on all loads' blocks together (``LoadBuffers``).
        ``publishers_dir``: the publisher keys this device trusts (``LOADER_PUBLISHERS_DIR``,
        read at every load, as the unlock does); None trusts none and enforces nothing.
        ``state_dir``: where the newest release of each signed resource loaded is recorded
        (``ResourceReleases``; None: in memory only); ``allow_downgrade``: an older one loads
        anyway (``LOADER_ALLOW_DOWNGRADE``)."""
        self._api = api
        self._publishers_dir = publishers_dir
        self._releases = ResourceReleases(state_dir, allow_downgrade=allow_downgrade)
        self._recording = asyncio.Lock()  # one write of the release record at a time
        self._pending: dict[str, _Pending] = {}
        self._max_big_size = max_resource_bytes
        self._cache = BigPartCache(cache_dir)
        self._downloads = BigPartDownloads(api, self._cache)
        self.stats = ResourceStats()
        self.shared = SharedByLoads(LoadBuffers(load_buffer_bytes), LoadTurns())

    @property
    def cache(self) -> BigPartCache:
        return self._cache

    @property
    def downloads(self) -> BigPartDownloads:
        return self._downloads

    async def close(self) -> None:
        for upload_id in list(self._pending):
            self._drop_pending(upload_id)
        await self._downloads.close()

    # -- upload --------------------------------------------------------------------------------

    async def upload(self, folder: str, name: str, chunks: AsyncIterable[bytes]) -> UploadResult:
        """Encrypt ``chunks``, store the big part on the CDN (and in the cache), then the small
        part on the API. Memory stays bounded: the big part is spooled to the cache dir."""
        prepared = await self._prepare(folder, name, chunks)
        with prepared.spooled:
            return await self._store(prepared, None)

    async def upload_for_signing(
        self,
        folder: str,
        name: str,
        chunks: AsyncIterable[bytes],
        key_id: bytes,
        release: int,
    ) -> PendingSignature:
        """Encrypt ``chunks`` as ``upload`` does, but store nothing yet: the big part stays
        spooled and the statement a publisher signs is returned (the agent never holds a
        publisher's private key). ``commit_signature`` stores it signed; unsigned for
        ``PENDING_SIGNATURE_SECONDS``, it is dropped. At most ``MAX_PENDING_SIGNATURES`` wait
        (each holds a big part on disk)."""
        self._check_room_to_wait()  # before the body is read
        prepared = await self._prepare(folder, name, chunks)
        with contextlib.ExitStack() as unless_pending:
            unless_pending.push(prepared.spooled)
            ciphertext_size, ciphertext_sha256 = prepared.small.ciphertext()
            manifest = resource_manifest(folder, name, prepared.size, release)
            statement = Statement(
                Kind.RESOURCE,
                key_id,
                release,
                ciphertext_size,
                ciphertext_sha256,
                hashlib.sha256(manifest).digest(),
            )
            self._check_room_to_wait()  # others may have come while this one encrypted
            upload_id = secrets.token_hex(16)
            expiry = asyncio.get_running_loop().call_later(
                PENDING_SIGNATURE_SECONDS, self._expire, upload_id
            )
            self._pending[upload_id] = _Pending(prepared, statement, expiry)
            unless_pending.pop_all()
        logger.info(
            "upload of {}/{} encrypted; waiting for the signature of key {} (release {})",
            folder,
            name,
            key_id.hex(),
            release,
        )
        return PendingSignature(
            upload_id, statement, manifest, prepared.size, PENDING_SIGNATURE_SECONDS
        )

    async def commit_signature(
        self, upload_id: str, folder: str, name: str, public_key: bytes, signature: bytes
    ) -> UploadResult:
        """Store an upload of ``upload_for_signing`` with its publisher's ``signature`` over
        the statement, checked here with ``public_key`` (whose id the statement names): a
        wrong key file or a damaged signature is refused before anything is stored."""
        pending = self._pending.get(upload_id)
        if pending is None or (pending.prepared.folder, pending.prepared.name) != (folder, name):
            raise NotFoundError(
                f"no upload of {folder}/{name} waits for a signature under that id (it was "
                f"stored already, or expired {PENDING_SIGNATURE_SECONDS:.0f} s after it was sent)"
            )
        statement = pending.statement
        if len(public_key) != PUBLIC_KEY_SIZE or key_id_of(public_key) != statement.key_id:
            raise RequestError(
                f"the public key is not key {statement.key_id.hex()}, which the statement names"
            )
        try:
            PublicKey(public_key).verifier().verify(signature, statement.encode())
        except InvalidSignature:
            raise RequestError(
                f"the signature does not verify over the statement with key "
                f"{statement.key_id.hex()}"
            ) from None
        del self._pending[upload_id]
        pending.expiry.cancel()
        with pending.prepared.spooled:
            return await self._store(pending.prepared, SignatureBlock(statement, signature))

    def _check_room_to_wait(self) -> None:
        if len(self._pending) >= MAX_PENDING_SIGNATURES:
            raise ConflictError(
                f"{len(self._pending)} uploads already wait for their signature; sign them, or "
                f"wait until they expire ({PENDING_SIGNATURE_SECONDS:.0f} s after they were sent)"
            )

    def _expire(self, upload_id: str) -> None:
        pending = self._pending.get(upload_id)
        if pending is not None:
            logger.warning(
                "upload of {}/{} was not signed within {:.0f} s; dropped",
                pending.prepared.folder,
                pending.prepared.name,
                PENDING_SIGNATURE_SECONDS,
            )
            self._drop_pending(upload_id)

    def _drop_pending(self, upload_id: str) -> None:
        pending = self._pending.pop(upload_id)
        pending.expiry.cancel()
        pending.prepared.spooled.close()

    async def _prepare(self, folder: str, name: str, chunks: AsyncIterable[bytes]) -> _Prepared:
        """Encrypt ``chunks`` into a spooled big part and the small part (not stored yet)."""
        check_component(folder, "folder")
        check_component(name, "name")
        small_fragment, big_fragment = keys.generate_fragment(), keys.generate_fragment()
        splitter = _Splitter(stream.Encryptor([small_fragment, big_fragment]))
        with contextlib.ExitStack() as spooled:
            spool = spooled.enter_context(self._cache.spool(folder))
            await asyncio.to_thread(spool.write, _big_prefix(big_fragment))
            size = await _encrypt_into(chunks, splitter, spool)
            await asyncio.to_thread(splitter.finish, spool)
            small = SmallPart(
                small_fragment, spool.sha256.hex(), spool.size, spool.sha256, bytes(splitter.head)
            )
            return _Prepared(folder, name, size, small, spool, spooled.pop_all())
        raise AssertionError("unreachable")  # for mypy: the with block returns or raises

    async def _store(self, prepared: _Prepared, signature: SignatureBlock | None) -> UploadResult:
        """Put the big part on the CDN (and into the cache), then the small part on the API."""
        folder, name, size = prepared.folder, prepared.name, prepared.size
        small = dataclasses.replace(prepared.small, signature=signature)
        big_path = self._cache.commit(prepared.spool, folder, small.big_name)
        self._cache.record_use(folder, name, small.big_name)  # an earlier upload's: orphan
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
            publisher=signature.statement.key_id.hex() if signature else None,
            release=signature.statement.release if signature else None,
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
        trust = self._trust()
        what = f"resource {folder}/{name}"
        trust.admit(small.signature, what)  # unsigned or untrusted: refused before downloading
        self._cache.record_use(folder, name, small.big_name)  # the part it used before: orphan
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
            forget = lambda: self._downloads.forget(path)  # noqa: E731
            kind = _Following if following else Resource
            resource = kind(small, file, forget, self.stats, self.shared)
        except StreamError as exc:
            file.close()
            if not following:
                raise
            self._downloads.forget(path)  # what the CDN sent so far is bad
            raise _Following.blame(exc) from exc
        except BaseException:
            file.close()
            raise
        try:
            _verify_signature(trust, small, resource.size, folder, name)
            await self._check_release(trust, small, folder, name)
        except BaseException:
            await resource.aclose()
            raise
        return resource

    async def _check_release(
        self, trust: TrustStore, small: SmallPart, folder: str, name: str
    ) -> None:
        """Anti-rollback: a verified signed release lower than the newest this device loaded
        is refused; a higher one is recorded before a byte of it is handed out."""
        block = small.signature
        if block is None or block.statement.key_id not in trust.keys:
            return  # nothing verified to compare (signatures not enforced)
        release = block.statement.release
        async with self._recording:
            if self._releases.check(folder, name, release):
                data = self._releases.record(folder, name, release)
                if data is not None:
                    await asyncio.to_thread(self._releases.save, data)

    def _trust(self) -> TrustStore:
        """The publisher keys trusted now, looked at every load (a key installed or removed
        counts from the next load on, as for the unlock): on the loop, as a look at an
        unchanged directory of keys takes ~15 us, less than the hop to a worker thread."""
        if self._publishers_dir is None:
            return TrustStore()
        return TrustStore.current(self._publishers_dir)

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


class LoadBuffers:
    """The one bound on the memory that loads hold: blocks of ciphertext and plaintext.

    Every load takes its blocks from here, one block per step (``BLOCK_CHUNKS`` chunks of
    ciphertext and the room to decrypt them), and gives each back once the caller has it all
    (the socket's kernel buffer took it). The blocks held plus the free ones kept for reuse
    never exceed ``budget`` bytes (setting ``LOADER_LOAD_BUFFER_MIB``; one block bigger than
    the budget is let through alone). Loads asking when the budget is spent wait in one FIFO
    queue, so every load gets blocks in turn whatever its reader's speed: a slow reader holds
    at most the block it is being sent (and the one decrypted ahead), and ``/load`` cuts a
    reader that takes nothing for ``LOADER_BODY_TIMEOUT``. Free blocks are kept (fresh big
    buffers cost page faults) and dropped when a block of another size needs the room.
    ``peak`` is the most ever held at once; ``waits`` counts the requests that had to queue.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self.peak = 0
        self.waits = 0
        self._free: dict[int, list[bytearray]] = {}
        self._free_bytes = 0
        self._queue: collections.deque[tuple[int, asyncio.Future[bytearray]]] = collections.deque()

    async def acquire(self, size: int) -> bytearray:
        """A block of ``size`` bytes, once the budget has room for it and the loads queued
        before have been served. Give it back with ``release``."""
        if not self._queue and self._fits(size):
            return self._take(size)
        self.waits += 1
        granted: asyncio.Future[bytearray] = asyncio.get_running_loop().create_future()
        self._queue.append((size, granted))
        try:
            return await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(granted.result())  # granted as the caller was cancelled
            else:
                self._queue.remove((size, granted))
                self._serve()  # the requests behind it may fit now
            raise

    def release(self, block: bytearray) -> None:
        """Take back a block from ``acquire``: it is kept for reuse and the queue served."""
        self.held -= len(block)
        self._free.setdefault(len(block), []).append(block)
        self._free_bytes += len(block)
        self._serve()

    def _fits(self, size: int) -> bool:
        return self.held + size <= self.budget or self.held == 0

    def _take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            block = free.pop()
            self._free_bytes -= size
        else:
            self._drop_free(self.budget - self.held - size)
            block = bytearray(size)
        self.held += size
        self.peak = max(self.peak, self.held)
        return block

    def _drop_free(self, room: int) -> None:
        """Drop free blocks until at most ``room`` bytes of them are kept."""
        for blocks in self._free.values():
            while blocks and self._free_bytes > max(room, 0):
                self._free_bytes -= len(blocks.pop())

    def _serve(self) -> None:
        while self._queue:
            size, granted = self._queue[0]
            if granted.done():  # cancelled: its acquire is removing it
                self._queue.popleft()
                continue
            if not self._fits(size):
                return
            self._queue.popleft()
            granted.set_result(self._take(size))


class LoadTurns:
    """Turns on the event loop, shared by all loads: the costly steps of all loads together
    (reading and decrypting a block, ~0.15 ms at the default chunk size; sending one) take at
    most about ``TURN_SECONDS`` of each loop iteration, in the order they asked.

    asyncio runs every callback that is ready before it polls its sockets again, so fifty
    loads with a block each to decrypt made one iteration of ~50 steps (~10 ms, several per
    ``/status`` answer: its p99 was 59 ms). A step asks for its turn: it has it at once while
    this iteration's load work is under ``TURN_SECONDS`` and nobody queues; else it queues, and
    the queue is let through one per iteration, so a request arriving meanwhile waits for
    little more than a turn. A load alone is not held back: its step and its send fit in one.
    """

    def __init__(self) -> None:
        self._taken = False  # this iteration has load work (or a queued load was handed a turn)
        self._began = 0.0  # when it began (loop time)
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (a restarted test, say): nothing carries over
            self._loop, self._taken = loop, False
            self._queue.clear()
        if not self._taken:
            self._taken, self._began = True, loop.time()
            loop.call_soon(self._pass_on)  # runs in the next iteration
            return
        if not self._queue and loop.time() - self._began < TURN_SECONDS:
            return
        turn: asyncio.Future[None] = loop.create_future()
        self._queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.done() or turn.cancelled():
                self._queue.remove(turn)
            raise  # a turn handed over as it was cancelled just ends at _pass_on

    def _pass_on(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)  # that load runs in the next iteration...
                self._began = loop.time()
                loop.call_soon(self._pass_on)  # ...with what fits in its turn
                return
        self._taken = False


@dataclass(frozen=True)
class SharedByLoads:
    """What all of a store's loads share: the bound on their memory, and the loop's turns."""

    buffers: LoadBuffers
    turns: LoadTurns


class Resource:
    """A resource being loaded: ``size`` is its plaintext length; iterate for verified blocks.

    The big part is on disk (intact), or being written by its download (``_read`` waits for
    the bytes it needs; only what authenticates is handed out). Each ``__anext__``
    hands out the verified plaintext of up to ``BLOCK_CHUNKS`` chunks of the format, as a
    memoryview into a block of the store's ``LoadBuffers``: valid until the next ``__anext__``
    (or ``aclose``), which gives the block back; copy what must be kept. While the caller
    sends one block, the next is read (see ``_read``) and decrypted with
    ``AESGCM.decrypt_into`` into the block's own plaintext room, no buffer allocated per
    chunk and no join (the previous version's extra copy of every byte). Both run on the loop,
    a block a turn (``LoadTurns``; ~0.15 ms per block): a worker thread decrypting each
    block beside the loop measured slower (1 GiB over the socket, ~0.7x): the GIL is taken
    back after every 64 KiB chunk, and the two threads' handing it to and fro cost more than
    the AES it moved (~15 futex calls per MiB). Should a chunk fail to authenticate (the file
    was altered behind the cache's back), the cached file is dropped and the error raised;
    the block it was part of is never handed out. Always ``aclose`` it
    (or exhaust it): that releases the file and the blocks.
    """

    def __init__(
        self,
        small: SmallPart,
        file: io.BufferedReader,
        forget: Callable[[], None],
        stats: ResourceStats,
        shared: SharedByLoads,
    ) -> None:
        self._file = file
        self._forget = forget
        self._stats = stats
        self._buffers = shared.buffers
        self._turns = shared.turns
        big_fragment = _read_big_prefix(file)
        try:
            self.size = plaintext_size(small, len(big_fragment))
            chunk_size = stream.parse_header(small.head).chunk_size
        except StreamError as exc:
            # The small part's header and sizes were checked at open: what does not fit now is
            # the big part's key fragment (a CDN's garbage, or a cached file altered).
            raise TamperedError(
                f"the big part's key fragment does not fit its small part's record ({exc})"
            ) from exc
        self._decryptor = stream.Decryptor([small.fragment, big_fragment])
        self._decryptor.update(small.head[: stream.HEADER_SIZE])  # the keys; no chunk yet
        self._chunk_size = chunk_size
        self._record_size = chunk_size + stream.TAG_SIZE
        self._batch = max(1, BLOCK_CHUNKS * stream.CHUNK_SIZE // chunk_size)
        # A block: the batch's records and one held back (it may be the final chunk, known
        # only once a byte after it is read), then room for their plaintext.
        self._cipher_size = (self._batch + 1) * self._record_size
        self._block_size = self._cipher_size + (self._batch + 1) * chunk_size
        self._carry = bytes(small.head[stream.HEADER_SIZE :])  # goes before the next read
        self._buffer: memoryview = memoryview(b"")  # where ``_read`` reads into
        self._offset = file.tell()  # where the ciphertext goes on; reads are positional
        self._nowait = True  # page-cache reads on the loop, unless the file system refuses them
        self._reading: asyncio.Future[int] | None = None  # a read in a worker thread
        self._next: asyncio.Task[tuple[bytearray, memoryview]] | None = None  # block ahead
        self._next_acquired = False  # that task holds its block: it runs to its end...
        self._between_reads = False  # ...unless it only waits for a download (no thread runs)
        self._current: bytearray | None = None  # the block the caller holds
        self._exhausted = False  # the final chunk has been read and authenticated
        self._closed = False
        self._decrypted = 0

    @property
    def closed(self) -> bool:
        """Whether the big part's file has been released (``aclose``, or read to the end)."""
        return self._file.closed

    def __aiter__(self) -> Resource:
        return self

    async def turn(self) -> None:
        """Wait for a turn on the loop shared by all loads (``LoadTurns``): for the caller's
        own costly step with a block (its ``send``)."""
        await self._turns.take()

    async def __anext__(self) -> memoryview:
        self._give_back()
        try:
            while not self._closed:
                if self._next is None:
                    if self._exhausted:
                        break
                    self._start_next()
                assert self._next is not None
                # Shielded: a caller that goes away leaves the step to finish with its block
                # (aclose waits for it), rather than a thread writing into a block given back.
                block, plaintext = await asyncio.shield(self._next)
                self._next = None
                self._current = block
                if not self._exhausted:
                    self._start_next()  # decrypt ahead while the caller sends this one
                if plaintext:
                    self._stats.decrypted_bytes += len(plaintext)
                    return plaintext
                self._give_back()
        except StreamError:
            self._forget()
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    def _give_back(self) -> None:
        if self._current is not None:
            self._buffers.release(self._current)
            self._current = None

    def _start_next(self) -> None:
        self._next_acquired = False
        self._next = asyncio.ensure_future(self._step())

    async def _step(self) -> tuple[bytearray, memoryview]:
        """One block: wait for its room in the budget, read, decrypt; its verified plaintext."""
        block = await self._buffers.acquire(self._block_size)
        self._next_acquired = True
        try:
            await self._turns.take()
            view = memoryview(block)
            cipher, plain = view[: self._cipher_size], view[self._cipher_size :]
            filled = len(self._carry)
            cipher[:filled] = self._carry
            while filled < len(cipher):
                self._buffer = cipher[filled:]
                count = await self._read()
                if not count:
                    break
                self._offset += count
                filled += count
            self._buffer = memoryview(b"")
            done = self._open(cipher, filled, plain)
            self._decrypted += done
            if self._exhausted and self._decrypted != self.size:
                raise StreamError("the decrypted resource is not the length its parts record")
        except BaseException:
            self._buffers.release(block)
            raise
        return block, plain[:done]

    def _open(self, cipher: memoryview, filled: int, plain: memoryview) -> int:
        """Decrypt the records in ``cipher[:filled]`` into ``plain``; returns the plaintext
        length. A full block holds its last record back for the next;
        a short one is the end of the stream, and its last record must be the final chunk."""
        ended = filled < len(cipher)
        followed = self._batch if not ended else max(0, (filled - 1) // self._record_size)
        done = self._decryptor.open_followed_into(cipher, followed, plain)
        rest = cipher[followed * self._record_size : filled]
        if not ended:
            self._carry = bytes(rest)
            return done
        self._carry = b""
        self._decryptor.update(rest)  # at most one record: buffered, not opened
        final = self._decryptor.finalize()
        plain[done : done + len(final)] = final
        self._exhausted = True
        return done + len(final)

    async def _read(self) -> int:
        """Fill the buffer from the file: right here if the bytes are in the page cache (a copy
        of 1 MiB, ~0.1 ms), else in a worker thread, as a read from the disk may block."""
        if isinstance(self._file.raw, GrowingFile):  # the download is still writing it
            self._between_reads = True  # aclose may stop the step here: no thread uses its block
            try:
                await self._file.raw.wait_for(self._offset + len(self._buffer))
            finally:
                self._between_reads = False
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
        self._give_back()
        if self._next is not None:  # the step ahead: stop it queueing or waiting for the
            if not self._next_acquired or self._between_reads:  # download, or let it finish
                self._next.cancel()
            [outcome] = await asyncio.gather(self._next, return_exceptions=True)
            if isinstance(outcome, tuple):
                self._buffers.release(outcome[0])
            self._next = None
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

    async def __anext__(self) -> memoryview:
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


def _verify_signature(
    trust: TrustStore, small: SmallPart, size: int, folder: str, name: str
) -> None:
    """Check a signed small part against what this load measures: its own head, the big
    part's recorded length and SHA-256 (which the cache and the download hold the bytes to:
    a part is in the cache only if it matches, and a load following a download gets its
    last bytes only once it does), the plaintext ``size`` and where it is published. A
    load hands out nothing before this passes: from the cache, the whole resource is
    verified before its first byte; following a download, its tail waits for the download's
    check."""
    if small.signature is None:
        return  # admitted: signatures are not enforced
    ciphertext_size, ciphertext_sha256 = small.ciphertext()
    manifest = resource_manifest(folder, name, size, small.signature.statement.release)
    measured = Statement.measured(
        Kind.RESOURCE, ciphertext_size, ciphertext_sha256, hashlib.sha256(manifest).digest()
    )
    trust.verify(small.signature, measured, f"resource {folder}/{name}")


@dataclass
class _Prepared:
    """An upload encrypted and spooled, not stored yet; ``spooled`` drops the spool on close
    unless it was committed to the cache."""

    folder: str
    name: str
    size: int
    small: SmallPart
    spool: Spool
    spooled: contextlib.ExitStack


@dataclass
class _Pending:
    """An upload waiting for its publisher's signature (``upload_for_signing``)."""

    prepared: _Prepared
    statement: Statement
    expiry: asyncio.TimerHandle


@dataclass(frozen=True)
class PendingSignature:
    """What a publisher signs to store an upload: ``statement.encode()``; ``manifest`` is what
    its ``manifest_sha256`` covers, for the signer to check against what it sent."""

    upload_id: str
    statement: Statement
    manifest: bytes
    size: int  # plaintext bytes received
    expires_in: float


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
