"""ResourceStore: the big/small split end to end, against the real dev-api over loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent import stream
from agent.api_client import ResourceApiClient
from agent.errors import (
    BadCredentials,
    CacheError,
    InvalidName,
    StreamError,
    UnsupportedFormatError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
    WrongKeyError,
)
from agent.resources import HEAD_DATA_BYTES, READ_SIZE, Resource, ResourceStore, SmallPart
from agent.retry import RetryPolicy
from tests.fixtures.devapi import DevApi

FAST = RetryPolicy(base_delay=0.0, max_delay=0.0, max_attempts=5, max_total=60.0)
CS = stream.CHUNK_SIZE

StoreFactory = Callable[..., ResourceStore]


@pytest.fixture
async def closing() -> AsyncIterator[list[ResourceApiClient | ResourceStore]]:
    """What a test made, closed after it (last made first: a store before its client)."""
    made: list[ResourceApiClient | ResourceStore] = []
    yield made
    for thing in reversed(made):
        await thing.close()


@pytest.fixture
def make_client(
    shared_dev_api: DevApi, closing: list[ResourceApiClient | ResourceStore]
) -> Callable[..., ResourceApiClient]:
    """API clients logged in as the dev-api's user (or with another ``password``)."""

    def make(password: str | None = None) -> ResourceApiClient:
        client = ResourceApiClient(shared_dev_api.url, policy=FAST)
        client.set_credentials(shared_dev_api.email, password or shared_dev_api.password)
        closing.append(client)
        return client

    return make


@pytest.fixture
def make_store(
    make_client: Callable[..., ResourceApiClient],
    closing: list[ResourceApiClient | ResourceStore],
    tmp_path: Path,
) -> StoreFactory:
    """Stores that act as separate devices: each has its own cache dir and API client (or
    the ``client`` given, and the ``cache_dir`` given: the same device, restarted)."""

    def make(
        password: str | None = None,
        client: ResourceApiClient | None = None,
        cache_dir: Path | None = None,
    ) -> ResourceStore:
        store = ResourceStore(
            client or make_client(password), cache_dir or tmp_path / f"cache-{len(closing)}"
        )
        closing.append(store)
        return store

    return make


@pytest.fixture
def store(make_store: StoreFactory) -> ResourceStore:
    return make_store()


def pattern(size: int, seed: int = 0) -> bytes:
    """Plaintext that is easy to spot in a ciphertext dump, and different at every offset."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += f"azaion plaintext {seed}:{counter:012d}|".encode()
        counter += 1
    return bytes(out[:size])


async def pieces(data: bytes, size: int = 7919) -> AsyncIterator[bytes]:
    """The upload as a client sends it: odd-sized pieces."""
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def read_all(resource: Resource) -> bytes:
    out = bytearray()
    async for chunk in resource:
        out += chunk
    return bytes(out)


async def load(store: ResourceStore, folder: str, name: str) -> bytes:
    resource = await store.open(folder, name)
    data = await read_all(resource)
    assert resource.size == len(data)
    return data


def big_path(api: DevApi, folder: str) -> Path:
    [path] = (api.data_dir / "cdn" / folder).iterdir()
    return path


def small_path(api: DevApi, folder: str, name: str) -> Path:
    return api.data_dir / "small" / folder / name


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        HEAD_DATA_BYTES - stream.TAG_SIZE - 1,
        HEAD_DATA_BYTES - stream.TAG_SIZE,
        HEAD_DATA_BYTES,
        CS - 1,
        CS,
        CS + 1,
        2 * CS + 17,
        READ_SIZE + 1,
    ],
)
async def test_round_trip(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str, size: int
) -> None:
    data = pattern(size)
    uploader, other_device = make_store(), make_store()
    result = await uploader.upload(resource_folder, "model.bin", pieces(data))
    assert result.size == size
    assert (
        result.small_size == small_path(shared_dev_api, resource_folder, "model.bin").stat().st_size
    )
    assert result.big_size == big_path(shared_dev_api, resource_folder).stat().st_size
    assert await load(uploader, resource_folder, "model.bin") == data  # from its cache
    assert await load(other_device, resource_folder, "model.bin") == data  # from the CDN
    assert shared_dev_api.count("GET", "/cdn/") == 1


@pytest.mark.slow
async def test_300_mb_round_trip_in_bounded_memory(
    make_store: StoreFactory, resource_folder: str
) -> None:
    block = os.urandom(1024 * 1024)
    count = 300

    async def plaintext() -> AsyncIterator[bytes]:
        for index in range(count):
            yield index.to_bytes(8, "big") + block[8:]

    expected = hashlib.sha256()
    async for piece in plaintext():
        expected.update(piece)
    uploader, other_device = make_store(), make_store()
    result = await uploader.upload(resource_folder, "big.onnx", plaintext())
    assert result.size == count * len(block)
    for store in (uploader, other_device):
        resource = await store.open(resource_folder, "big.onnx")
        assert resource.size == result.size
        received = hashlib.sha256()
        async for chunk in resource:
            assert len(chunk) <= 2 * READ_SIZE
            received.update(chunk)
        assert received.digest() == expected.digest()


# -- the bound on loads' memory (more in test_load_buffers.py) -------------------------------

BLOCK = 17 * (CS + stream.TAG_SIZE) + 17 * CS  # a load's block at the default chunk size
MiB = 1 << 20


async def test_concurrent_loads_stay_within_the_bound_and_are_exact(
    make_store: StoreFactory,
    make_client: Callable[..., ResourceApiClient],
    tmp_path: Path,
    resource_folder: str,
) -> None:
    data = pattern(3 * MiB + 12345)
    uploader = make_store()
    await uploader.upload(resource_folder, "model.bin", pieces(data, 1 << 20))
    budget = 3 * BLOCK
    store = ResourceStore(make_client(), tmp_path / "bounded", load_buffer_bytes=budget)
    try:
        await load(store, resource_folder, "model.bin")  # downloads it: the loads below are warm
        loads = await asyncio.gather(
            *(load(store, resource_folder, "model.bin") for _ in range(12))
        )
        buffers = store.shared.buffers
        assert all(each == data for each in loads)
        assert buffers.waits > 0  # the bound was reached: loads queued for blocks
        assert 0 < buffers.peak <= budget
        assert buffers.held == 0  # every block came back
    finally:
        await store.close()


async def test_a_closed_load_gives_back_its_blocks(
    store: ResourceStore, resource_folder: str
) -> None:
    data = pattern(5 * MiB)
    await store.upload(resource_folder, "model.bin", pieces(data, 1 << 20))
    resource = await store.open(resource_folder, "model.bin")
    first = await anext(aiter(resource))
    assert bytes(first) == data[: len(first)]
    await resource.aclose()  # with a block in the caller's hands and one decrypted ahead
    assert store.shared.buffers.held == 0


async def test_upload_replaces_a_resource_and_the_new_version_loads(
    store: ResourceStore, resource_folder: str
) -> None:
    await store.upload(resource_folder, "model", pieces(b"version 1"))
    await store.upload(resource_folder, "model", pieces(b"version 2"))
    assert await load(store, resource_folder, "model") == b"version 2"


# -- the split ---------------------------------------------------------------------------------


async def test_neither_part_alone_can_be_decrypted(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str
) -> None:
    data = pattern(3 * CS)
    await store.upload(resource_folder, "secret", pieces(data))
    small = SmallPart.unpack(small_path(shared_dev_api, resource_folder, "secret").read_bytes())
    big = big_path(shared_dev_api, resource_folder).read_bytes()
    big_fragment, tail = big[1 : 1 + big[0]], big[1 + big[0] :]

    for part in (small.pack(), big):  # no plaintext in the clear in either
        assert b"azaion plaintext" not in part

    with pytest.raises(WrongKeyError):  # the small part alone: its fragment is not the key
        stream.Decryptor([small.fragment]).update(small.head + tail)
    with pytest.raises(UnsupportedFormatError):  # the big part alone: not even a stream header
        stream.Decryptor([big_fragment]).update(big)
    with pytest.raises(WrongKeyError):  # the big part with the small part's data, no fragment
        stream.Decryptor([big_fragment]).update(small.head + tail)

    both = stream.Decryptor([small.fragment, big_fragment])  # both parts: the plaintext
    assert both.update(small.head + tail) + both.finalize() == data


async def test_big_parts_are_named_by_their_sha256(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str
) -> None:
    result = await store.upload(resource_folder, "model", pieces(b"x" * 1000))
    path = big_path(shared_dev_api, resource_folder)
    assert path.name == result.big_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (store.cache.root / resource_folder / path.name).read_bytes() == path.read_bytes()


# -- upstream failures -------------------------------------------------------------------------


async def test_bad_credentials_give_bad_credentials(
    make_store: StoreFactory, resource_folder: str
) -> None:
    with pytest.raises(BadCredentials):
        await make_store(password="wrong").open(resource_folder, "model")


async def test_expired_token_is_renewed_transparently(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str
) -> None:
    await store.upload(resource_folder, "model", pieces(b"data"))
    shared_dev_api.faults(expire_tokens=True)
    assert await load(store, resource_folder, "model") == b"data"
    assert shared_dev_api.count("POST", "/login") == 2


async def test_503_three_times_then_success(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str
) -> None:
    await store.upload(resource_folder, "model", pieces(b"data"))
    shared_dev_api.faults(status=503, count=3, path="/resources/", method="GET")
    assert await load(store, resource_folder, "model") == b"data"
    assert shared_dev_api.count("GET", "/resources/") == 4


async def test_404_is_not_retried(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str
) -> None:
    with pytest.raises(UpstreamNotFound):
        await store.open(resource_folder, "absent")
    assert shared_dev_api.count("GET", "/resources/") == 1


async def test_unreadable_small_part_is_an_upstream_error(
    make_client: Callable[..., ResourceApiClient], make_store: StoreFactory, resource_folder: str
) -> None:
    client = make_client()
    # The store's own client stores the junk, as a broken API would.
    await client.put_small_part(resource_folder, "junk", b"not an envelope")
    with pytest.raises(UpstreamError, match="Resource API sent a small part"):
        await make_store(client=client).open(resource_folder, "junk")


@pytest.mark.parametrize("fault", ["truncate", "drop_mid_body"])
async def test_cut_cdn_body_is_detected_and_resumed(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str, fault: str
) -> None:
    data = pattern(5 * CS + 123)
    result = await make_store().upload(resource_folder, "model", pieces(data))
    shared_dev_api.faults(**{fault: True}, path="/cdn/")
    other_device = make_store()
    assert await load(other_device, resource_folder, "model") == data
    ranges = [e["range"] for e in shared_dev_api.log("/cdn/") if e["method"] == "GET"]
    assert ranges[0] is None and len(ranges) == 2
    if fault == "truncate":  # a short body that looks complete: resumed where it ended
        assert ranges[1] == f"bytes={result.big_size // 2}-"
        assert other_device.downloads.stats.retries.items() == []  # progress: no retry
    # A dropped connection resumes after whatever had arrived, which depends on timing.


async def test_partial_download_left_by_a_restart_is_resumed(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str
) -> None:
    data = pattern(4 * CS)
    result = await make_store().upload(resource_folder, "model", pieces(data))
    other_device = make_store()
    big = big_path(shared_dev_api, resource_folder).read_bytes()
    directory = other_device.cache.root / resource_folder
    directory.mkdir(parents=True)
    (directory / f".{result.big_sha256}.part").write_bytes(big[:1000])
    assert await load(other_device, resource_folder, "model") == data
    assert [e["range"] for e in shared_dev_api.log("/cdn/") if e["method"] == "GET"] == [
        "bytes=1000-"
    ]


async def test_cdn_that_keeps_failing_is_tried_only_as_the_policy_allows(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str
) -> None:
    await make_store().upload(resource_folder, "model", pieces(b"data"))
    shared_dev_api.faults(status=503, path="/cdn/", method="GET", count=None)
    other_device = make_store()
    with pytest.raises(UpstreamUnavailable, match="CDN"):
        await other_device.open(resource_folder, "model")
    assert shared_dev_api.count("GET", "/cdn/") == FAST.max_attempts
    # One retry loop: each retry of the download once, as a CDN retry (not a resumption).
    retries = other_device.downloads.stats.retries.items()
    assert retries == [(("cdn", "unavailable"), FAST.max_attempts - 1)]


async def test_garbage_from_the_cdn_is_refused_and_fetched_again(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str
) -> None:
    """The load follows the download: it may meet the garbage before the SHA-256 check does
    (then it is refused, nothing of it handed out, and the partial file is not resumed), or
    after it (then it follows the download fetched afresh)."""
    data = pattern(2 * CS)
    await make_store().upload(resource_folder, "model", pieces(data))
    shared_dev_api.faults(garbage=True, path="/cdn/")
    other_device = make_store()
    try:
        first: bytes | None = await load(other_device, resource_folder, "model")
    except UpstreamError as exc:
        assert "CDN" in str(exc)
        first = None
    assert first in (None, data)
    assert await load(other_device, resource_folder, "model") == data
    assert [e["range"] for e in shared_dev_api.log("/cdn/") if e["method"] == "GET"] == [None] * 2


async def test_cdn_that_keeps_sending_garbage_is_an_upstream_error(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str
) -> None:
    await make_store().upload(resource_folder, "model", pieces(pattern(1000)))
    shared_dev_api.faults(garbage=True, path="/cdn/", count=None)
    other_device = make_store()
    with pytest.raises(UpstreamError, match="CDN served big part"):
        await other_device.open(resource_folder, "model")
    assert not any((other_device.cache.root / resource_folder).iterdir())


async def test_failed_upload_leaves_no_small_part_and_no_cached_big_part(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str
) -> None:
    shared_dev_api.faults(status=503, path="/cdn/", method="PUT", count=None)
    with pytest.raises(UpstreamUnavailable, match="CDN"):
        await store.upload(resource_folder, "model", pieces(b"data"))
    assert not small_path(shared_dev_api, resource_folder, "model").exists()
    assert list((store.cache.root / resource_folder).iterdir()) == []


# -- the cache ---------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_corrupt_cache_file_is_replaced(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str, damage: str
) -> None:
    data = pattern(3 * CS)
    result = await store.upload(resource_folder, "model", pieces(data))
    cached = store.cache.root / resource_folder / result.big_sha256
    if damage == "flip":
        flip_byte(cached, cached.stat().st_size // 2)
    else:
        os.truncate(cached, 100)
    assert await load(store, resource_folder, "model") == data
    assert shared_dev_api.count("GET", "/cdn/") == 1
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == result.big_sha256


async def test_cache_corrupted_while_the_agent_was_off_is_replaced(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str, tmp_path: Path
) -> None:
    data = pattern(2 * CS)
    first = make_store()
    result = await first.upload(resource_folder, "model", pieces(data))
    flip_byte(first.cache.root / resource_folder / result.big_sha256, 500)
    restarted = make_store(cache_dir=first.cache.root)  # knows nothing of earlier checks
    assert await load(restarted, resource_folder, "model") == data
    assert shared_dev_api.count("GET", "/cdn/") == 1


async def test_warm_cache_load_downloads_nothing(
    store: ResourceStore, shared_dev_api: DevApi, resource_folder: str
) -> None:
    await store.upload(resource_folder, "model", pieces(pattern(CS)))
    for _ in range(3):
        await load(store, resource_folder, "model")
    assert shared_dev_api.count("GET", "/cdn/") == 0
    assert shared_dev_api.count("GET", "/resources/") == 3


async def test_chunk_failing_authentication_drops_the_cached_file(
    store: ResourceStore, resource_folder: str
) -> None:
    data = pattern(4 * CS)
    result = await store.upload(resource_folder, "model", pieces(data))
    cached = store.cache.root / resource_folder / result.big_sha256
    resource = await store.open(resource_folder, "model")
    flip_byte(cached, cached.stat().st_size - 100)  # after the check, behind the cache's back
    with pytest.raises(StreamError):
        await read_all(resource)
    assert not cached.exists()


async def test_two_concurrent_loads_download_the_big_part_once(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str
) -> None:
    data = pattern(6 * CS)
    await make_store().upload(resource_folder, "model", pieces(data))
    other_device = make_store()
    shared_dev_api.faults(stall=0.5, path="/cdn/")  # keeps the download in flight
    first, second = await asyncio.gather(
        load(other_device, resource_folder, "model"), load(other_device, resource_folder, "model")
    )
    assert first == second == data
    assert shared_dev_api.count("GET", "/cdn/") == 1


async def test_closing_a_resource_early_releases_its_file(
    store: ResourceStore, resource_folder: str
) -> None:
    await store.upload(resource_folder, "model", pieces(pattern(3 * READ_SIZE)))
    resource = await store.open(resource_folder, "model")
    assert await anext(resource)
    assert not resource.closed
    await resource.aclose()
    assert resource.closed


async def test_unwritable_cache_is_a_clear_error(
    make_store: StoreFactory, shared_dev_api: DevApi, resource_folder: str, tmp_path: Path
) -> None:
    store = make_store()
    store.cache.root.parent.mkdir(parents=True, exist_ok=True)
    store.cache.root.write_bytes(b"a file where the cache directory should be")
    with pytest.raises(CacheError, match="cannot write to the model cache"):
        await store.upload(resource_folder, "model", pieces(b"data"))
    assert shared_dev_api.stats()["requests"] == {}


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("..", "model"),
        ("ok", ".."),
        ("ok", "../model"),
        ("ok/../..", "model"),
        ("ok", ".hidden"),
        ("ok", ""),
        ("", "model"),
        ("ok", "a\x00b"),
        ("ok", "a\\b"),
        ("/etc", "passwd"),
    ],
)
async def test_unsafe_names_are_refused_and_nothing_is_written(
    store: ResourceStore, shared_dev_api: DevApi, folder: str, name: str
) -> None:
    before = sorted(shared_dev_api.data_dir.rglob("*"))
    with pytest.raises(InvalidName):
        await store.upload(folder, name, pieces(b"data"))
    with pytest.raises(InvalidName):
        await store.open(folder, name)
    assert sorted(shared_dev_api.data_dir.rglob("*")) == before
    assert not store.cache.root.exists()
    assert shared_dev_api.stats()["requests"] == {}


# -- the small part envelope -------------------------------------------------------------------


def sample_small_part() -> SmallPart:
    sha = hashlib.sha256(b"big").digest()
    return SmallPart(b"\x01" * 32, sha.hex(), 1234, sha, b"head bytes")


def test_small_part_envelope_round_trips() -> None:
    small = sample_small_part()
    assert SmallPart.unpack(small.pack()) == small


def test_small_part_shows_no_key_fragment() -> None:
    small = sample_small_part()
    for shown in (repr(small), str(small), f"{small}", f"{small!r}"):
        # The fragment is a secret, in any form a repr or a log line may give it.
        for form in (repr(small.fragment), small.fragment.hex(), str(list(small.fragment))):
            assert form not in shown


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-1],  # cut short
        lambda b: b + b"x",  # trailing bytes
        lambda b: b"XXXX" + b[4:],  # not an envelope
        lambda b: b[:4] + b"\x02" + b[5:],  # unknown version
        lambda b: b[:20],
        lambda b: b"",
    ],
)
def test_damaged_small_part_envelopes_are_refused(mangle: Callable[[bytes], bytes]) -> None:
    with pytest.raises(ValueError):
        SmallPart.unpack(mangle(sample_small_part().pack()))


def test_envelope_naming_another_big_part_is_refused() -> None:
    small = sample_small_part()
    for name in ("../../etc/passwd".ljust(64, "a"), "0" * 64):
        forged = SmallPart(small.fragment, name, small.big_size, small.big_sha256, small.head)
        with pytest.raises(ValueError):
            SmallPart.unpack(forged.pack())
