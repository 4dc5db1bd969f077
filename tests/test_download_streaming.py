"""A cold load streams while its big part downloads (agent/download.py ``GrowingFile``).

The CDN is the hostile upstream of ``tests/fixtures/hostile.py`` (real loopback sockets, its
own thread and loop), honest except for the big part's body, which each test holds back, cuts
or corrupts at a point it controls with events: no sleeps. The store is the real one, in this
process, with a fresh cache.
"""

from __future__ import annotations

import asyncio
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
from tests.fixtures.hostile import Handler, HostileUpstream

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


async def uploaded(make_store: StoreFactory) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield DATA

    await make_store().upload("models", "model.bin", pieces())


def big_part(hostile: HostileUpstream) -> bytes:
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


async def read_rest(resource: Resource) -> bytes:
    blocks = [bytes(block) async for block in resource]  # a block is valid until the next
    return b"".join(blocks)


async def test_first_plaintext_leaves_while_the_cdn_body_is_held_back(
    make_store: StoreFactory, hostile: HostileUpstream
) -> None:
    await uploaded(make_store)
    release, sent = threading.Event(), threading.Event()
    hostile.behave("cdn_get", held_back(big_part(hostile), release, sent=sent))
    resource = await asyncio.wait_for(make_store().open("models", "model.bin"), WAIT)
    try:
        first = bytes(await asyncio.wait_for(anext(resource), WAIT))
        assert not sent.is_set()  # the CDN has not sent the rest: this came while it waits
        assert first and DATA.startswith(first)
        release.set()
        assert first + await asyncio.wait_for(read_rest(resource), WAIT) == DATA
    finally:
        release.set()
        await resource.aclose()
    assert len(hostile.requests("cdn_get")) == 1


async def test_a_cut_mid_body_is_resumed_and_the_load_gets_every_byte(
    make_store: StoreFactory, hostile: HostileUpstream
) -> None:
    await uploaded(make_store)
    part = big_part(hostile)
    release = threading.Event()
    cut_once = held_back(part, release, cut=True)
    honest = hostile.app_handler("cdn_get")

    async def cut_then_honest(request: web.Request) -> web.StreamResponse:
        if len(hostile.requests("cdn_get")) == 1:
            return await cut_once(request)
        return await honest(request)

    hostile.behave("cdn_get", cut_then_honest)
    resource = await asyncio.wait_for(make_store().open("models", "model.bin"), WAIT)
    try:
        first = bytes(await asyncio.wait_for(anext(resource), WAIT))
        release.set()  # the CDN cuts the connection now, with the load under way
        assert first + await asyncio.wait_for(read_rest(resource), WAIT) == DATA
    finally:
        release.set()
        await resource.aclose()
    ranges = [seen.headers.get("Range") for seen in hostile.requests("cdn_get")]
    assert len(ranges) == 2 and ranges[0] is None
    assert ranges[1] is not None and int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0


async def test_a_download_started_afresh_is_followed_on_its_new_file(
    make_store: StoreFactory, hostile: HostileUpstream
) -> None:
    """Cut mid-body, then a 416 to the resumption: the download drops its partial file and
    starts over; the load, already under way on the old file, goes on on the new one."""
    await uploaded(make_store)
    part = big_part(hostile)
    release = threading.Event()
    cut_once = held_back(part, release, cut=True)
    honest = hostile.app_handler("cdn_get")

    async def cut_then_416_then_honest(request: web.Request) -> web.StreamResponse:
        count = len(hostile.requests("cdn_get"))
        if count == 1:
            return await cut_once(request)
        if count == 2:
            return web.Response(status=416)
        return await honest(request)

    hostile.behave("cdn_get", cut_then_416_then_honest)
    resource = await asyncio.wait_for(make_store().open("models", "model.bin"), WAIT)
    try:
        first = bytes(await asyncio.wait_for(anext(resource), WAIT))
        release.set()
        assert first + await asyncio.wait_for(read_rest(resource), WAIT) == DATA
    finally:
        release.set()
        await resource.aclose()
    ranges = [seen.headers.get("Range") for seen in hostile.requests("cdn_get")]
    assert len(ranges) == 3 and ranges[0] is None and ranges[1] and ranges[2] is None


async def test_concurrent_cold_loads_follow_one_download(
    make_store: StoreFactory, hostile: HostileUpstream
) -> None:
    await uploaded(make_store)
    release, sent = threading.Event(), threading.Event()
    hostile.behave("cdn_get", held_back(big_part(hostile), release, sent=sent))
    device = make_store()
    opening = [device.open("models", "model.bin") for _ in range(2)]
    resources = await asyncio.wait_for(asyncio.gather(*opening), WAIT)
    try:
        # Both have their first plaintext while the one download is held back mid-body.
        firsts = [bytes(await asyncio.wait_for(anext(resource), WAIT)) for resource in resources]
        assert not sent.is_set()
        release.set()
        for first, resource in zip(firsts, resources, strict=True):
            assert first + await asyncio.wait_for(read_rest(resource), WAIT) == DATA
    finally:
        release.set()
        for resource in resources:
            await resource.aclose()
    assert len(hostile.requests("cdn_get")) == 1


async def test_corrupt_last_bytes_cut_the_load_short_and_leave_nothing_cached(
    make_store: StoreFactory, hostile: HostileUpstream
) -> None:
    await uploaded(make_store)
    part = bytearray(big_part(hostile))
    part[-5] ^= 0x01
    hostile.behave("cdn_get", answer_bytes(bytes(part)))
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


def answer_bytes(body: bytes) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    return handle
