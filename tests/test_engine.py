"""agent.engine against a real, private dockerd, and against a hostile one.

The hostile engine is an aiohttp app of the test's own on a Unix socket: it answers the way a
broken or malicious engine could (endless lines, endless answers, huge bodies, control
characters, silence, a body it stops taking), and the client (blocking: run in a thread here, as
the unlock runs it) must stay bounded and clear.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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


def pieces_of(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), PIECE):
        yield data[start : start + PIECE]


def zeros(count: int) -> Iterator[bytes]:
    """``count`` pieces of zeros (one piece, sent ``count`` times)."""
    piece = bytes(PIECE)
    for _ in range(count):
        yield piece


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
def test_load_round_trip_then_tag(dockerd: Dockerd) -> None:
    image_id, tar = saved(dockerd, "azaion/test-engine:roundtrip")
    with Engine(dockerd.host) as engine:
        assert engine.present([image_id]) == set()

        loaded = engine.load(pieces_of(tar))

        assert loaded == ["azaion/test-engine:roundtrip"]
        assert engine.present([image_id, "sha256:" + "0" * 64]) == {image_id}
        assert "azaion/test-engine:roundtrip" in engine.repo_tags(image_id)
        engine.tag(image_id, "azaion/test-engine", "v9")
        assert "azaion/test-engine:v9" in engine.repo_tags(image_id)
        engine.ping()


@pytest.mark.docker
def test_unknown_image_is_not_found(dockerd: Dockerd) -> None:
    with pytest.raises(NotFoundError, match="inspect image sha256:0000"):
        Engine(dockerd.host).repo_tags("sha256:" + "0" * 64)


@pytest.mark.docker
def test_a_tar_the_engine_rejects_is_a_docker_error(dockerd: Dockerd) -> None:
    before = dockerd.image_ids()
    with pytest.raises(DockerError, match="could not load the images") as caught:
        Engine(dockerd.host).load(pieces_of(b"this is not a tar archive" * 1000))
    assert not isinstance(caught.value, DockerUnavailable)
    assert dockerd.image_ids() == before


@pytest.mark.docker
def test_failing_source_aborts_the_upload_and_nothing_is_kept(dockerd: Dockerd) -> None:
    image_id, tar = saved(dockerd, "azaion/test-engine:aborted")
    before = dockerd.image_ids()

    def all_but_the_end_then_fail() -> Iterator[bytes]:
        # Every entry, all but the end-of-archive marker: ended cleanly, the engine loads this
        # (its tar reader takes a clean end of input at an entry's end as the end).
        yield from pieces_of(tar[:-END_MARKER])
        raise _Stop("source failed")

    engine = Engine(dockerd.host)
    with pytest.raises(_Stop, match="source failed"):
        engine.load(all_but_the_end_then_fail())
    engine.ping()  # the engine is fine

    assert dockerd.image_ids() == before
    assert image_id not in dockerd.image_ids()


@pytest.mark.docker
def test_engine_not_up_is_unavailable(late_dockerd: DockerDaemon) -> None:
    engine = Engine(late_dockerd.host)
    with pytest.raises(DockerUnavailable, match="is dockerd running"):
        engine.ping()
    with pytest.raises(DockerUnavailable, match="is dockerd running"):
        engine.load(pieces_of(b"x" * 100))


def test_nothing_listening_on_tcp_is_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DockerUnavailable, match="is dockerd running"):
        Engine(f"tcp://127.0.0.1:{port}").image_ids()


@pytest.mark.parametrize("host", ["ssh://user@host\x1b[31m", "tcp://no-port", "/var/run/d.sock"])
def test_an_unsupported_address_is_a_clear_error(host: str) -> None:
    with pytest.raises(DockerError, match="DOCKER_HOST must be unix:///path or tcp://host:port"):
        Engine(host)


# -- a hostile engine --------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[str, str, Handler], Awaitable[str]]


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[Serve]:
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

    yield serve
    for runner in runners:
        await runner.cleanup()
    # The transports closed just now lose their sockets on the loop's next turn: give it
    # that turn before the test's loop ends (else they warn, unclosed, in a later test).
    await asyncio.sleep(0)


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


async def load_in_thread(engine: Engine, body: Iterator[bytes] | None = None) -> list[str]:
    tar = body if body is not None else pieces_of(b"tar" * 1000)
    return await asyncio.wait_for(asyncio.to_thread(engine.load, tar), DEADLINE)


async def test_an_endless_line_is_cut_off(hostile: Serve) -> None:
    host = await hostile("POST", "/images/load", answer_forever(b"x" * 65536))
    with pytest.raises(DockerError, match=f"a line over {MAX_LINE} bytes"):
        await load_in_thread(Engine(host))


async def test_endless_lines_are_cut_off(hostile: Serve) -> None:
    line = b'{"stream":"Loaded image: azaion/x:1\\n"}\r\n'
    host = await hostile("POST", "/images/load", answer_forever(line * 100))
    with pytest.raises(DockerError, match="answer to the load is too long"):
        await load_in_thread(Engine(host))


async def test_a_huge_answer_to_a_short_call_is_cut_off(hostile: Serve) -> None:
    host = await hostile("GET", "/images/json", answer_forever(b"[" * 65536))
    with pytest.raises(DockerError, match=f"answer is over {MAX_BODY} bytes"):
        await asyncio.wait_for(asyncio.to_thread(Engine(host).image_ids), DEADLINE)


async def test_the_engines_words_are_escaped_and_cut(hostile: Serve) -> None:
    words = "no space left on device\n\x1b[2J" + "y" * 5000

    async def refuse(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"errorDetail": {"message": words}, "error": words})

    host = await hostile("POST", "/images/load", refuse)
    with pytest.raises(DockerError) as caught:
        await load_in_thread(Engine(host))
    message = str(caught.value)
    assert message.startswith("the Docker engine could not load the images: no space left")
    assert "\n" not in message and "\x1b" not in message
    assert "\\n\\x1b[2J" in message
    assert len(message) < 1000


async def test_an_error_status_is_a_docker_error(hostile: Serve) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"message": "write /var/lib/docker: no space left"}, status=500)

    host = await hostile("POST", "/images/load", fail)
    with pytest.raises(DockerError, match="could not load the images: write /var/lib/docker"):
        await load_in_thread(Engine(host))


async def test_an_engine_that_refuses_early_is_heard(hostile: Serve) -> None:
    """It answers without taking the (large) body and drops the connection: its words count."""

    async def refuse_at_once(request: web.Request) -> web.StreamResponse:
        return web.json_response({"message": "unsupported archive"}, status=400)

    host = await hostile("POST", "/images/load", refuse_at_once)
    with pytest.raises(DockerError, match="could not load the images: unsupported archive"):
        await load_in_thread(Engine(host), zeros(1024))


async def test_a_silent_engine_runs_into_the_deadline(hostile: Serve) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(DEADLINE)  # the client gives up long before
        return web.Response()

    host = await hostile("POST", "/images/load", silent)
    with pytest.raises(DockerError, match="did not answer in time"):
        await load_in_thread(Engine(host, stall_timeout=0.3))


async def test_an_engine_that_stops_taking_the_body_runs_into_the_deadline(
    hostile: Serve,
) -> None:
    async def stalled(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(DEADLINE)  # reads nothing: the socket fills up
        return web.Response()

    host = await hostile("POST", "/images/load", stalled)
    with pytest.raises(DockerError, match="took nothing of the images for"):
        await load_in_thread(Engine(host, stall_timeout=0.3), zeros(4096))


async def test_an_answer_that_is_not_json_lines(hostile: Serve) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(text="<html>not an engine</html>\n")

    host = await hostile("POST", "/images/load", garbage)
    with pytest.raises(DockerError, match="not JSON lines"):
        await load_in_thread(Engine(host))


async def test_a_tcp_engine_is_reached() -> None:
    async def images(request: web.Request) -> web.StreamResponse:
        assert request.query["all"] == "1"
        return web.json_response([{"Id": "sha256:" + "a" * 64}, {"no": "id"}, "junk"])

    app = web.Application()
    app.router.add_get("/images/json", images)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        held = await asyncio.to_thread(Engine(f"tcp://127.0.0.1:{port}").image_ids)
    finally:
        await runner.cleanup()
        await asyncio.sleep(0)  # the closed transports' last turn (see ``hostile``)
    assert held == {"sha256:" + "a" * 64}
