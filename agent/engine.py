"""The Docker engine's HTTP API, as the unlock needs it, over the aiohttp client on the loop.

The unlock's timed path (check, load, verify) talks to the engine directly: no Docker SDK
import, and the decrypted tar goes to ``POST /images/load`` as a chunked request body from an
async iterator, written without copies. The SDK (``agent.images``) stays for ``pack-images``.

``DOCKER_HOST`` is read as today: ``unix:///path`` (the default, ``/var/run/docker.sock``) or
``tcp://host:port`` (plain HTTP). The engine's answers are parsed with bounds (body sizes, the
load's JSON lines: their length and count) and its text is escaped and cut before it reaches
an error. Every wait has a deadline: ``CALL_TIMEOUT`` for a short call, and for the load
``STALL_TIMEOUT`` without progress (a piece of the body taken, a line of the answer read).

Foreign errors are translated in one place, ``_translated``: an engine that cannot be reached
is ``DockerUnavailable`` (callers retry), anything the engine refuses is ``DockerError``, an
image it does not hold is ``NotFoundError``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import aiohttp

from agent.errors import DockerError, DockerUnavailable, LoaderError, NotFoundError
from agent.logs import one_line

DEFAULT_HOST = "unix:///var/run/docker.sock"
CALL_TIMEOUT = 60.0  # one short call (ping, inspect, list, tag), whole
CONNECT_TIMEOUT = 10.0
STALL_TIMEOUT = 900.0  # the load: longest wait for the engine to take a piece or answer a line
MAX_BODY = 16 * 1024 * 1024  # an answer to a short call (the list of all images is the largest)
MAX_LINE = 64 * 1024  # one line of the load's answer
MAX_LINES = 10_000  # lines of the load's answer (one per image loaded, and progress)
MAX_TEXT = 300  # characters of the engine's own words kept in an error


def _endpoint(host: str) -> tuple[str, aiohttp.BaseConnector]:
    """The base URL and the connector for ``host`` (``unix://...`` or ``tcp://...``)."""
    if host.startswith("unix://"):
        return "http://docker", aiohttp.UnixConnector(path=host.removeprefix("unix://"))
    if host.startswith("tcp://"):
        return "http://" + host.removeprefix("tcp://").rstrip("/"), aiohttp.TCPConnector()
    raise DockerError(
        f"unsupported Docker engine address {one_line(host, MAX_TEXT)} "
        "(DOCKER_HOST must be unix:///path or tcp://host:port)"
    )


def engine_text(text: str) -> str:
    """The engine's own words, as one escaped line of at most ``MAX_TEXT`` characters."""
    return one_line(text.strip(), MAX_TEXT)


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn aiohttp and timeout errors raised while doing ``action`` into ours."""
    try:
        yield
    except LoaderError:
        raise
    except aiohttp.ClientConnectorError as exc:
        raise DockerUnavailable(
            f"cannot {action}: the Docker engine is not reachable "
            f"({exc.os_error.strerror or exc.os_error}; is dockerd running?)"
        ) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise DockerUnavailable(
            f"cannot {action}: the Docker engine closed the connection"
        ) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise DockerError(f"cannot {action}: the Docker engine did not answer in time") from exc
    except aiohttp.ClientError as exc:
        raise DockerError(f"cannot {action}: {type(exc).__name__}") from exc


class Engine:
    """One Docker engine (``host``, or ``DOCKER_HOST``, or the default socket): an async
    context manager that owns one HTTP connection pool."""

    def __init__(
        self,
        host: str | None = None,
        *,
        call_timeout: float = CALL_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self._call_timeout = call_timeout
        self._stall_timeout = stall_timeout
        base_url, connector = _endpoint(self.host)
        self._session = aiohttp.ClientSession(
            base_url=base_url,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT),
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- short calls ---------------------------------------------------------------------------

    async def _call(self, method: str, path: str, action: str, **params: str) -> bytes:
        """One short call: its answer, or the error it means."""
        with _translated(action):
            async with asyncio.timeout(self._call_timeout):
                async with self._session.request(method, path, params=params) as response:
                    body = await _read_bounded(response, MAX_BODY)
        if response.status == 404:
            raise NotFoundError(f"cannot {action}: {_message(body)}")
        if response.status >= 400:
            raise DockerError(f"cannot {action}: {_message(body)}")
        return body

    async def _json(self, method: str, path: str, action: str, **params: str) -> Any:
        """One short call whose answer is JSON."""
        body = await self._call(method, path, action, **params)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise DockerError(f"cannot {action}: the Docker engine's answer is not JSON") from exc

    async def ping(self) -> None:
        await self._call("GET", "/_ping", "reach the Docker engine")

    async def image_ids(self) -> set[str]:
        """The IDs (``sha256:...``) of every image the engine holds."""
        listed = await self._json("GET", "/images/json", "list images", all="1")
        if not isinstance(listed, list):
            raise DockerError("cannot list images: the Docker engine's answer is not a list")
        return {str(image["Id"]) for image in listed if isinstance(image, dict) and "Id" in image}

    async def present(self, image_ids: Iterable[str]) -> set[str]:
        """Which of ``image_ids`` the engine holds."""
        held = await self.image_ids()
        return {image_id for image_id in image_ids if image_id in held}

    async def repo_tags(self, image_id: str) -> set[str]:
        found = await self._json(
            "GET", f"/images/{quote(image_id, safe='')}/json", f"inspect image {image_id}"
        )
        tags = found.get("RepoTags") if isinstance(found, dict) else None
        return {str(tag) for tag in tags} if isinstance(tags, list) else set()

    async def tag(self, image_id: str, repository: str, tag: str) -> None:
        """Point ``repository:tag`` at ``image_id`` (moving the tag if it pointed elsewhere)."""
        path = f"/images/{quote(image_id, safe='')}/tag"
        await self._call("POST", path, f"tag image as {repository}:{tag}", repo=repository, tag=tag)

    # -- the load ------------------------------------------------------------------------------

    async def load(self, tar: AsyncIterator[bytes]) -> list[str]:
        """``docker load`` of the tar that ``tar`` yields (the chunked request body); returns
        the names and IDs the engine reports loaded.

        If ``tar`` raises, the same exception comes out of this call and the connection is
        dropped mid-body (the terminating chunk is never sent): the engine sees a truncated
        upload and keeps nothing of it.
        """
        source = _Recording(tar, self._stall_timeout)
        action = "load images into the Docker engine"
        try:
            with _translated(action):
                async with asyncio.timeout(None) as deadline:
                    source.deadline = deadline
                    source.step()
                    return await self._load(source, deadline)
        except DockerUnavailable:
            if source.error is not None:
                raise source.error from None
            await self._raise_if_dropped_while_up()
            raise
        except Exception:
            if source.error is not None:
                raise source.error from None
            raise

    async def _load(self, source: _Recording, deadline: asyncio.Timeout) -> list[str]:
        async with self._session.post(
            "/images/load",
            params={"quiet": "1"},
            data=source,
            headers={"Content-Type": "application/x-tar"},
        ) as response:
            if response.status >= 400:
                body = await _read_bounded(response, MAX_LINE)
                raise DockerError(f"the Docker engine could not load the images: {_message(body)}")
            loaded = []
            async for line in _lines(response, deadline, self._stall_timeout):
                loaded.extend(_loaded_names(line))
        if source.error is not None:
            raise source.error
        if not source.finished:
            raise DockerError("the Docker engine answered before it had read all the images")
        return loaded

    async def _raise_if_dropped_while_up(self) -> None:
        """The connection broke mid-load: if the engine still answers, it refused the data."""
        try:
            await self.ping()
        except DockerUnavailable:
            return
        raise DockerError("the Docker engine closed the connection while loading the images")


class _Recording:
    """The request body: passes ``tar`` on, remembers the exception it raised (aiohttp wraps it)
    and whether it ended, and pushes the load's deadline on with each piece taken."""

    def __init__(self, tar: AsyncIterator[bytes], stall_timeout: float) -> None:
        self._tar = tar
        self._stall_timeout = stall_timeout
        self.error: BaseException | None = None
        self.finished = False
        self.deadline: asyncio.Timeout | None = None

    def step(self) -> None:
        if self.deadline is not None:
            self.deadline.reschedule(asyncio.get_running_loop().time() + self._stall_timeout)

    def __aiter__(self) -> _Recording:
        return self

    async def __anext__(self) -> bytes:
        try:
            piece = await anext(self._tar)
        except StopAsyncIteration:
            self.finished = True
            raise
        except Exception as exc:  # not a cancellation of the writer: that is aiohttp's
            self.error = exc
            raise
        self.step()
        return piece


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``response``, or ``DockerError`` past ``limit`` bytes."""
    body = bytearray()
    async for piece in response.content.iter_any():
        body += piece
        if len(body) > limit:
            raise DockerError(f"the Docker engine's answer is over {limit} bytes")
    return bytes(body)


async def _lines(
    response: aiohttp.ClientResponse, deadline: asyncio.Timeout, stall_timeout: float
) -> AsyncIterator[Any]:
    """The load's answer, JSON lines, each parsed; at most ``MAX_LINES`` of ``MAX_LINE`` bytes."""
    buffer = bytearray()
    count = 0
    loop = asyncio.get_running_loop()
    deadline.reschedule(loop.time() + stall_timeout)
    async for piece in response.content.iter_any():
        deadline.reschedule(loop.time() + stall_timeout)
        buffer += piece
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LINE:
            raise DockerError(f"the Docker engine's answer has a line over {MAX_LINE} bytes")
        buffer = bytearray(rest)
        for line in lines:
            count += 1
            if count > MAX_LINES or len(line) > MAX_LINE:
                raise DockerError("the Docker engine's answer to the load is too long")
            if line.strip():
                yield _json_line(line)
    if buffer.strip():
        yield _json_line(bytes(buffer))


def _json_line(line: bytes | bytearray) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise DockerError("the Docker engine's answer to the load is not JSON lines") from exc


def _loaded_names(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return []
    if message.get("error"):
        raise DockerError(
            f"the Docker engine could not load the images: {engine_text(str(message['error']))}"
        )
    text = str(message.get("stream", "")).strip()
    for prefix in ("Loaded image ID: ", "Loaded image: "):
        if text.startswith(prefix):
            return [engine_text(text.removeprefix(prefix))]
    return []


def _message(body: bytes) -> str:
    """The engine's error message from its JSON answer (``{"message": ...}``), escaped."""
    try:
        found = json.loads(body)
    except ValueError:
        found = None
    if isinstance(found, dict) and isinstance(found.get("message"), str):
        return engine_text(found["message"])
    return engine_text(body.decode("utf-8", "replace")) or "no reason given"
