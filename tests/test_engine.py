"""agent.engine against a real, private dockerd, and against a hostile one.

The hostile engine is an aiohttp app of the test's own on a Unix socket: it answers the way a
broken or malicious engine could (endless lines, endless answers, huge bodies, control
characters, silence), and the client must stay bounded and clear.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from agent.engine import MAX_BODY, MAX_LINE, Engine
from agent.errors import DockerError, DockerUnavailable, NotFoundError
from agent.images import ImageEngine
from tests.fixtures.dockerd import Dockerd, DockerDaemon, import_image

DEADLINE = 60.0
PIECE = 64 * 1024
END_MARKER = 1024  # two zero blocks end a tar


async def pieces_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), PIECE):
        yield data[start : start + PIECE]


def saved(dockerd: Dockerd, ref: str) -> tuple[str, bytes]:
    """A fresh image ``ref`` as ``docker save`` writes it, removed from the engine again."""
    image_id = import_image(dockerd.client, ref)
    with ImageEngine.connect(dockerd.host) as sdk:
        tar = b"".join(sdk.save([ref]))
    dockerd.client.images.remove(ref)
    assert image_id not in dockerd.image_ids()
    assert tar.endswith(bytes(END_MARKER))
    return image_id, tar


class _Stop(Exception):
    pass


# -- a real engine -----------------------------------------------------------------------------


@pytest.mark.docker
async def test_load_round_trip_then_tag(dockerd: Dockerd) -> None:
    image_id, tar = await asyncio.to_thread(saved, dockerd, "azaion/test-engine:roundtrip")
    async with Engine(dockerd.host) as engine:
        assert await engine.present([image_id]) == set()

        loaded = await engine.load(pieces_of(tar))

        assert loaded == ["azaion/test-engine:roundtrip"]
        assert await engine.present([image_id, "sha256:" + "0" * 64]) == {image_id}
        assert "azaion/test-engine:roundtrip" in await engine.repo_tags(image_id)
        await engine.tag(image_id, "azaion/test-engine", "v9")
        assert "azaion/test-engine:v9" in await engine.repo_tags(image_id)
        await engine.ping()


@pytest.mark.docker
async def test_unknown_image_is_not_found(dockerd: Dockerd) -> None:
    async with Engine(dockerd.host) as engine:
        with pytest.raises(NotFoundError, match="inspect image sha256:0000"):
            await engine.repo_tags("sha256:" + "0" * 64)


@pytest.mark.docker
async def test_a_tar_the_engine_rejects_is_a_docker_error(dockerd: Dockerd) -> None:
    before = dockerd.image_ids()
    async with Engine(dockerd.host) as engine:
        with pytest.raises(DockerError, match="could not load the images") as caught:
            await engine.load(pieces_of(b"this is not a tar archive" * 1000))
    assert not isinstance(caught.value, DockerUnavailable)
    assert dockerd.image_ids() == before


@pytest.mark.docker
async def test_failing_source_aborts_the_upload_and_nothing_is_kept(dockerd: Dockerd) -> None:
    image_id, tar = await asyncio.to_thread(saved, dockerd, "azaion/test-engine:aborted")
    before = dockerd.image_ids()

    async def all_but_the_end_then_fail() -> AsyncIterator[bytes]:
        # Every entry, all but the end-of-archive marker: ended cleanly, the engine loads this
        # (the engine's tar reader takes a clean end of input at an entry's end as the end).
        async for piece in pieces_of(tar[:-END_MARKER]):
            yield piece
        raise _Stop("source failed")

    async with Engine(dockerd.host) as engine:
        with pytest.raises(_Stop, match="source failed"):
            await engine.load(all_but_the_end_then_fail())
        await engine.ping()  # the engine is fine

    assert dockerd.image_ids() == before
    assert image_id not in dockerd.image_ids()


@pytest.mark.docker
async def test_cancelled_upload_leaves_nothing(dockerd: Dockerd) -> None:
    image_id, tar = await asyncio.to_thread(saved, dockerd, "azaion/test-engine:cancelled")
    before = dockerd.image_ids()
    sent_most = asyncio.Event()

    async def most_then_wait() -> AsyncIterator[bytes]:
        async for piece in pieces_of(tar[:-END_MARKER]):
            yield piece
        sent_most.set()
        await asyncio.wait_for(asyncio.Event().wait(), DEADLINE)  # until cancelled
        yield tar[-END_MARKER:]

    async with Engine(dockerd.host) as engine:
        load = asyncio.create_task(engine.load(most_then_wait()))
        await asyncio.wait_for(sent_most.wait(), DEADLINE)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load

    assert dockerd.image_ids() == before
    assert image_id not in dockerd.image_ids()


@pytest.mark.docker
async def test_engine_not_up_is_unavailable(late_dockerd: DockerDaemon) -> None:
    async with Engine(late_dockerd.host) as engine:
        with pytest.raises(DockerUnavailable, match="is dockerd running"):
            await engine.ping()
        with pytest.raises(DockerUnavailable, match="is dockerd running"):
            await engine.load(pieces_of(b"x" * 100))


async def test_nothing_listening_on_tcp_is_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with Engine(f"tcp://127.0.0.1:{port}") as engine:
        with pytest.raises(DockerUnavailable, match="is dockerd running"):
            await engine.image_ids()


async def test_an_unsupported_address_is_a_clear_error() -> None:
    with pytest.raises(DockerError, match="DOCKER_HOST must be unix:///path or tcp://host:port"):
        Engine("ssh://user@host\x1b[31m")


# -- a hostile engine --------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[Callable[[str, str, Handler], str]]:
    """Serve one handler on a Unix socket; returns its ``unix://`` address."""
    runners: list[web.AppRunner] = []

    async def serve(method: str, path: str, handler: Handler) -> str:
        app = web.Application()
        app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        socket_path = tmp_path / f"engine{len(runners)}.sock"
        await web.UnixSite(runner, str(socket_path)).start()
        return f"unix://{socket_path}"

    yield serve  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


def answer_forever(piece: bytes) -> Handler:
    """Take the body, then send ``piece`` until the client goes (or 1 GiB, a safety stop)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range((1 << 30) // len(piece)):
            try:
                await response.write(piece)
            except ConnectionError:
                break
        return response

    return handler


async def test_an_endless_line_is_cut_off(hostile: Callable[..., Awaitable[str]]) -> None:
    host = await hostile("POST", "/images/load", answer_forever(b"x" * 65536))
    async with Engine(host) as engine:
        with pytest.raises(DockerError, match=f"a line over {MAX_LINE} bytes"):
            await asyncio.wait_for(engine.load(pieces_of(b"tar" * 1000)), DEADLINE)


async def test_endless_lines_are_cut_off(hostile: Callable[..., Awaitable[str]]) -> None:
    line = b'{"stream":"Loaded image: azaion/x:1\\n"}\r\n'
    host = await hostile("POST", "/images/load", answer_forever(line * 100))
    async with Engine(host) as engine:
        with pytest.raises(DockerError, match="answer to the load is too long"):
            await asyncio.wait_for(engine.load(pieces_of(b"tar" * 1000)), DEADLINE)


async def test_a_huge_answer_to_a_short_call_is_cut_off(
    hostile: Callable[..., Awaitable[str]],
) -> None:
    host = await hostile("GET", "/images/json", answer_forever(b"[" * 65536))
    async with Engine(host) as engine:
        with pytest.raises(DockerError, match=f"answer is over {MAX_BODY} bytes"):
            await asyncio.wait_for(engine.image_ids(), DEADLINE)


async def test_the_engines_words_are_escaped_and_cut(
    hostile: Callable[..., Awaitable[str]],
) -> None:
    words = "no space left on device\n\x1b[2J" + "y" * 5000

    async def refuse(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"errorDetail": {"message": words}, "error": words})

    host = await hostile("POST", "/images/load", refuse)
    async with Engine(host) as engine:
        with pytest.raises(DockerError) as caught:
            await engine.load(pieces_of(b"tar" * 1000))
    message = str(caught.value)
    assert message.startswith("the Docker engine could not load the images: no space left")
    assert "\n" not in message and "\x1b" not in message
    assert "\\n\\x1b[2J" in message
    assert len(message) < 1000


async def test_an_error_status_is_a_docker_error(hostile: Callable[..., Awaitable[str]]) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"message": "write /var/lib/docker: no space left"}, status=500)

    host = await hostile("POST", "/images/load", fail)
    async with Engine(host) as engine:
        with pytest.raises(DockerError, match="could not load the images: write /var/lib"):
            await engine.load(pieces_of(b"tar" * 1000))


async def test_a_silent_engine_runs_into_the_deadline(
    hostile: Callable[..., Awaitable[str]],
) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(DEADLINE)  # the client gives up long before
        return web.Response()

    host = await hostile("POST", "/images/load", silent)
    async with Engine(host, stall_timeout=0.3) as engine:
        with pytest.raises(DockerError, match="did not answer in time"):
            await asyncio.wait_for(engine.load(pieces_of(b"tar" * 1000)), DEADLINE)


async def test_an_answer_that_is_not_json_lines(hostile: Callable[..., Awaitable[str]]) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(text="<html>not an engine</html>\n")

    host = await hostile("POST", "/images/load", garbage)
    async with Engine(host) as engine:
        with pytest.raises(DockerError, match="not JSON lines"):
            await engine.load(pieces_of(b"tar" * 1000))
