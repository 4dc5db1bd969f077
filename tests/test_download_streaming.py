"""A cold load streams while its big part downloads (agent/download.py ``GrowingFile``).

The CDN is the hostile upstream of ``tests/fixtures/hostile.py`` (real loopback sockets, its
own thread and loop), honest except for the big part's body, which each test holds back, cuts
or corrupts at a point it controls with events: no sleeps. The store is the real one, in this
process, with a fresh cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from agent.api_client import ResourceApiClient
from agent.errors import StreamError, UpstreamError
from agent.resources import Resource, ResourceStore
from agent.retry import RetryPolicy
from tests.fixtures.hostile import Handler, HostileUpstream, answer

FAST = RetryPolicy(base_delay=0.0, max_delay=0.0, max_attempts=5, max_total=60.0)
MIB = 1024 * 1024
DATA = os.urandom(6 * MIB + 12345)
HELD_AT = 3 * MIB  # where the CDN holds the body back (past the first READ_SIZE the load reads)
WAIT = 30.0  # seconds: every wait of these tests has a deadline

StoreFactory = Callable[[], ResourceStore]


@pytest.fixture
async def make_store(hostile: HostileUpstream, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Devices with a cache of their own, all in front of ``hostile``."""
    made: list[tuple[ResourceApiClient, ResourceStore]] = []

    def make() -> ResourceStore:
        client = ResourceApiClient(hostile.url, policy=FAST)
        client.set_credentials(hostile.email, hostile.password)
        store = ResourceStore(client, tmp_path / f"cache-{len(made)}")
        made.append((client, store))
        return store

    yield make
    for client, store in reversed(made):
        await store.close()
        await client.close()


@pytest.fixture
async def big(make_store: StoreFactory, hostile: HostileUpstream) -> bytes:
    """The big part of ``DATA``, uploaded as models/model.bin (the CDN's only one)."""

    async def pieces() -> AsyncIterator[bytes]:
        yield DATA

    await make_store().upload("models", "model.bin", pieces())
    [part] = hostile.big.values()
    return part


def held_back(
    part: bytes, release: threading.Event, *, cut: bool = False, sent: threading.Event | None = None
) -> Handler:
    """A CDN answer that sends ``HELD_AT`` bytes of ``part``, then waits for ``release``; then
    sends the rest (and sets ``sent``), or (``cut``) drops the connection."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(part)
        await response.prepare(request)
        await response.write(part[:HELD_AT])
        if not await asyncio.to_thread(release.wait, WAIT):
            raise RuntimeError("the test never released the CDN body")
        if cut:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(part[HELD_AT:])
        await response.write_eof()
        if sent is not None:
            sent.set()
        return response

    return handle


def in_turn(*handlers: Handler) -> Handler:
    """The CDN's n-th request answered by the n-th handler, the last one's for the rest."""
    calls: list[int] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        return await handlers[min(len(calls), len(handlers)) - 1](request)

    return handle


@contextlib.asynccontextmanager
async def opened(store: ResourceStore, release: threading.Event) -> AsyncIterator[Resource]:
    """models/model.bin opened on ``store``; at the end the CDN body is released (whatever the
    test did) and the resource closed."""
    resource = await asyncio.wait_for(store.open("models", "model.bin"), WAIT)
    try:
        yield resource
    finally:
        release.set()
        await resource.aclose()


async def first_block(resource: Resource) -> bytes:
    return bytes(await asyncio.wait_for(anext(resource), WAIT))


async def the_rest(resource: Resource) -> bytes:
    async def read() -> bytes:
        blocks = [bytes(block) async for block in resource]  # a block is valid until the next
        return b"".join(blocks)

    return await asyncio.wait_for(read(), WAIT)


def cdn_ranges(hostile: HostileUpstream) -> list[str | None]:
    """The Range header of each request the CDN got."""
    return [seen.headers.get("Range") for seen in hostile.requests("cdn_get")]


async def test_first_plaintext_leaves_while_the_cdn_body_is_held_back(
    make_store: StoreFactory, hostile: HostileUpstream, big: bytes
) -> None:
    release, sent = threading.Event(), threading.Event()
    hostile.behave("cdn_get", held_back(big, release, sent=sent))
    async with opened(make_store(), release) as resource:
        first = await first_block(resource)
        assert not sent.is_set()  # the CDN has not sent the rest: this came while it waits
        assert first and DATA.startswith(first)
        release.set()
        assert first + await the_rest(resource) == DATA
    assert len(hostile.requests("cdn_get")) == 1


async def test_a_cut_mid_body_is_resumed_and_the_load_gets_every_byte(
    make_store: StoreFactory, hostile: HostileUpstream, big: bytes
) -> None:
    release = threading.Event()
    cut_once = held_back(big, release, cut=True)
    hostile.behave("cdn_get", in_turn(cut_once, hostile.app_handler("cdn_get")))
    async with opened(make_store(), release) as resource:
        first = await first_block(resource)
        release.set()  # the CDN cuts the connection now, with the load under way
        assert first + await the_rest(resource) == DATA
    ranges = cdn_ranges(hostile)
    assert len(ranges) == 2 and ranges[0] is None
    assert ranges[1] is not None and int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0


async def test_a_download_started_afresh_is_followed_on_its_new_file(
    make_store: StoreFactory, hostile: HostileUpstream, big: bytes
) -> None:
    """Cut mid-body, then a 416 to the resumption: the download drops its partial file and
    starts over; the load, already under way on the old file, goes on on the new one."""
    release = threading.Event()
    cut_once = held_back(big, release, cut=True)
    refuse = answer(416, b"")
    hostile.behave("cdn_get", in_turn(cut_once, refuse, hostile.app_handler("cdn_get")))
    async with opened(make_store(), release) as resource:
        first = await first_block(resource)
        release.set()
        assert first + await the_rest(resource) == DATA
    ranges = cdn_ranges(hostile)
    assert len(ranges) == 3 and ranges[0] is None and ranges[1] and ranges[2] is None


async def test_concurrent_cold_loads_follow_one_download(
    make_store: StoreFactory, hostile: HostileUpstream, big: bytes
) -> None:
    release, sent = threading.Event(), threading.Event()
    hostile.behave("cdn_get", held_back(big, release, sent=sent))
    device = make_store()
    opening = [device.open("models", "model.bin") for _ in range(2)]
    resources = await asyncio.wait_for(asyncio.gather(*opening), WAIT)
    try:
        # Both have their first plaintext while the one download is held back mid-body.
        firsts = [await first_block(resource) for resource in resources]
        assert not sent.is_set()
        release.set()
        for first, resource in zip(firsts, resources, strict=True):
            assert first + await the_rest(resource) == DATA
    finally:
        release.set()
        for resource in resources:
            await resource.aclose()
    assert len(hostile.requests("cdn_get")) == 1


async def test_corrupt_last_bytes_cut_the_load_short_and_leave_nothing_cached(
    make_store: StoreFactory, hostile: HostileUpstream, big: bytes
) -> None:
    part = bytearray(big)
    part[-5] ^= 0x01
    hostile.behave(
        "cdn_get", answer(200, bytes(part), **{"Content-Type": "application/octet-stream"})
    )
    device = make_store()
    handed_out = bytearray()
    with pytest.raises((StreamError, UpstreamError)):
        resource = await asyncio.wait_for(device.open("models", "model.bin"), WAIT)
        async with resource:
            async for block in resource:
                handed_out += block
    # Cut short, and every byte handed out was the resource's own (authenticated).
    assert len(handed_out) < len(DATA)
    assert DATA.startswith(handed_out)
    await device.close()  # any download still running ends (its partial file dropped)
    assert [p for p in device.cache.root.rglob("*") if p.is_file()] == []
