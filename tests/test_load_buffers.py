"""The one bound on what loads hold in memory (``LoadBuffers``): its queue, and a real agent
over its socket with a reader that stalls; no timing asserted. (Many concurrent loads within
the bound, byte-exact: tests/test_resources.py.)"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.localclient import UnixConnection
from agent.resources import LoadBuffers
from azaion_loader_dev.harness.agent import AgentProcess
from tests.fixtures.devapi import DevApi
from tests.test_resources import pattern

MiB = 1 << 20
# A block at the default chunk size: 16 records and one held back, and room for their plaintext.
BLOCK = 17 * (65536 + 16) + 17 * 65536

MakeAgent = Callable[..., AgentProcess]


async def test_blocks_are_granted_first_come_first_served() -> None:
    buffers = LoadBuffers(2 * BLOCK)
    first, second = await buffers.acquire(BLOCK), await buffers.acquire(BLOCK)
    big = asyncio.ensure_future(buffers.acquire(2 * BLOCK))  # waits for both blocks
    small = asyncio.ensure_future(buffers.acquire(1024))  # asked later: must not overtake
    await asyncio.sleep(0)
    buffers.release(first)
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    buffers.release(second)
    granted = await big
    assert len(granted) == 2 * BLOCK and not small.done()
    buffers.release(granted)
    assert len(await small) == 1024
    assert buffers.peak == 2 * BLOCK and buffers.waits == 2


async def test_a_cancelled_request_leaves_the_queue_and_holds_nothing() -> None:
    buffers = LoadBuffers(BLOCK)
    block = await buffers.acquire(BLOCK)
    waiting = asyncio.ensure_future(buffers.acquire(BLOCK))
    behind = asyncio.ensure_future(buffers.acquire(BLOCK))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    buffers.release(block)
    buffers.release(await behind)  # served once the cancelled one was gone
    assert buffers.held == 0


def test_a_reader_that_stalls_is_cut_and_does_not_hold_the_budget(
    make_agent: MakeAgent, dev_api: DevApi, tmp_path: Path
) -> None:
    # A budget of one block at a time, and a short stall limit: the stalled reader holds the
    # only block until it is cut; the other load completes after that, exact.
    agent = make_agent(
        RESOURCE_API_URL=dev_api.url,
        AZAION_EMAIL=dev_api.email,
        AZAION_PASSWORD=dev_api.password,
        LOADER_LOAD_BUFFER_MIB="4",
        LOADER_BODY_TIMEOUT="1",
    )
    source = tmp_path / "model.bin"
    data = pattern(24 * MiB)
    source.write_bytes(data)
    up = agent.cli("upload", str(source), "--folder", "models")
    assert up.returncode == 0, up.stderr
    stalled = UnixConnection(agent.socket_path, timeout=30)
    stalled.request(
        "POST", "/load/model.bin", b'{"folder": "models"}', {"Content-Type": "application/json"}
    )
    answer = stalled.getresponse()  # headers read; the body is left in the socket
    assert answer.status == 200
    exact: list[bool] = []

    def other_load() -> None:
        reply = agent.request("POST", "/load/model.bin", {"folder": "models"}, timeout=30)
        exact.append(reply.status == 200 and reply.body == data)

    other = threading.Thread(target=other_load)
    other.start()
    other.join(timeout=60)
    assert not other.is_alive() and exact == [True]
    with pytest.raises(http.client.IncompleteRead):
        answer.read()  # cut short: fewer bytes than Content-Length
    stalled.close()
    metrics = agent.request("GET", "/metrics").body.decode()
    peak = next(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("azaion_loader_load_buffer_peak_bytes ")
    )
    assert 0 < peak <= 4 * MiB
