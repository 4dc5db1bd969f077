"""The Docker engine's HTTP API, as the unlock needs it: list, inspect, tag, and the image load.

The unlock talks to the engine directly, without the Docker SDK (``agent.images``, which stays
for ``pack-images``): the SDK's import and its request machinery were on the unlock's timed
path. Everything here is blocking, over one socket per call, and runs in the unlock's worker
thread: the load is one chunked ``POST /images/load`` whose body is written piece by piece with
``sendmsg`` (the chunk's size line, the piece, its end: no copy, no event loop in between), the
cheapest way measured to hand the decrypted tar to the engine (bench/README.md).

``DOCKER_HOST`` is read as before: ``unix:///path`` (the default, ``/var/run/docker.sock``) or
``tcp://host:port`` (plain HTTP). The engine's answers are parsed with bounds (sizes of bodies,
and of the load's JSON lines, their length and count; ``http.client`` bounds the status line and
headers) and its words are escaped and cut before they reach an error. Every wait has a deadline:
``CALL_TIMEOUT`` for a short call, whole; ``STALL_TIMEOUT`` for each step of the load (a piece
sent, a piece of the answer received).

Foreign errors are translated in one place, ``_translated``: an engine that cannot be reached is
``DockerUnavailable`` (callers retry), anything the engine refuses is ``DockerError``, an image
it does not hold is ``NotFoundError``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlencode

from agent.errors import (
    ConflictError,
    DockerError,
    DockerUnavailable,
    LoaderError,
    NotFoundError,
)
from agent.logs import one_line

DEFAULT_HOST = "unix:///var/run/docker.sock"
CALL_TIMEOUT = 60.0  # one short call (ping, list, inspect, tag), whole
STALL_TIMEOUT = 900.0  # the load: longest wait for the engine to take a piece or say a word
ANSWER_TIMEOUT = 5.0  # after the engine stopped taking the load: how long to wait for its reason
MAX_BODY = 16 * 1024 * 1024  # an answer to a short call (the list of all images is the largest)
MAX_LINE = 64 * 1024  # one line of the load's answer
MAX_LINES = 10_000  # lines of the load's answer (one per image loaded, and progress)
MAX_TEXT = 300  # characters of the engine's own words kept in an error
READ_SIZE = 64 * 1024
LOAD_HEAD = (
    b"POST /images/load?quiet=1 HTTP/1.1\r\n"
    b"Host: docker\r\n"
    b"Content-Type: application/x-tar\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


def engine_text(text: str) -> str:
    """The engine's own words, as one escaped line of at most ``MAX_TEXT`` characters."""
    return one_line(text.strip(), MAX_TEXT)


def _address(host: str) -> str | tuple[str, int]:
    """The socket address of ``host``: a path (``unix:///path``) or (name, port) (``tcp://``)."""
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    if host.startswith("tcp://"):
        name, _, port = host.removeprefix("tcp://").rstrip("/").rpartition(":")
        if name and port.isdigit():
            return name.strip("[]"), int(port)
    raise DockerError(
        f"unsupported Docker engine address {one_line(host, MAX_TEXT)} "
        "(DOCKER_HOST must be unix:///path or tcp://host:port)"
    )


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn socket and ``http.client`` errors raised while doing ``action`` into ours."""
    try:
        yield
    except LoaderError:
        raise
    except TimeoutError as exc:
        raise DockerError(f"cannot {action}: the Docker engine did not answer in time") from exc
    except ConnectionError as exc:  # http.client's RemoteDisconnected among them
        raise DockerUnavailable(
            f"cannot {action}: the Docker engine closed the connection ({exc.strerror or exc})"
        ) from exc
    except (http.client.HTTPException, ValueError) as exc:
        raise DockerError(
            f"cannot {action}: the Docker engine's answer is not HTTP ({type(exc).__name__})"
        ) from exc
    except OSError as exc:
        raise DockerUnavailable(
            f"cannot {action}: the Docker engine closed the connection ({exc.strerror or exc})"
        ) from exc


class Engine:
    """One Docker engine: ``host``, or ``DOCKER_HOST``, or the default socket. Holds no
    connection between calls; a context manager for symmetry with its callers' ``with``."""

    def __init__(
        self,
        host: str | None = None,
        *,
        call_timeout: float = CALL_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self._address = _address(self.host)
        self._call_timeout = call_timeout
        self._stall_timeout = stall_timeout

    def close(self) -> None:
        """Nothing to release: every call closes its own connection."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connect(self, timeout: float) -> socket.socket:
        """A connected socket, or ``DockerUnavailable`` while the engine is not up."""
        address = self._address
        try:
            if isinstance(address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(min(timeout, CALL_TIMEOUT))
                    sock.connect(address)
                except OSError:
                    sock.close()
                    raise
            else:  # IPv4 or IPv6, as the name resolves
                sock = socket.create_connection(address, min(timeout, CALL_TIMEOUT))
            sock.settimeout(timeout)
        except OSError as exc:
            raise DockerUnavailable(
                f"cannot connect to the Docker engine at {one_line(self.host, MAX_TEXT)}: "
                f"{exc.strerror or exc} (is dockerd running?)"
            ) from exc
        return sock

    # -- short calls ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, action: str, **params: str) -> bytes:
        """One short call on a connection of its own: the answer's body, or what it means."""
        deadline = time.monotonic() + self._call_timeout
        target = f"{path}?{urlencode(params)}" if params else path
        request = (
            f"{method} {target} HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n"
        )
        with self._connect(self._call_timeout) as sock, _translated(action):
            sock.sendall(request.encode("ascii"))
            response = http.client.HTTPResponse(sock, method=method)
            try:
                response.begin()
                body = _read_bounded(response, MAX_BODY, deadline)
            finally:
                response.close()  # its file of the socket, which else keeps the socket open
        if response.status == 404:
            raise NotFoundError(f"cannot {action}: {_message(body)}")
        if response.status == 409:
            raise ConflictError(f"cannot {action}: {_message(body)}")
        if response.status >= 400:
            raise DockerError(f"cannot {action}: {_message(body)}")
        return body

    def _json(self, method: str, path: str, action: str, **params: str) -> Any:
        """One short call whose answer is JSON."""
        body = self._call(method, path, action, **params)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise DockerError(f"cannot {action}: the Docker engine's answer is not JSON") from exc

    def ping(self) -> None:
        self._call("GET", "/_ping", "reach the Docker engine")

    def data_root(self) -> str | None:
        """Where the engine keeps its images (``DockerRootDir`` of ``/info``), if it says."""
        info = self._json("GET", "/info", "ask the Docker engine about itself")
        root = info.get("DockerRootDir") if isinstance(info, dict) else None
        return root if isinstance(root, str) and root.startswith("/") else None

    def image_ids(self) -> set[str]:
        """The IDs (``sha256:...``) of every image the engine holds."""
        listed = self._json("GET", "/images/json", "list images", all="1")
        if not isinstance(listed, list):
            raise DockerError("cannot list images: the Docker engine's answer is not a list")
        return {str(image["Id"]) for image in listed if isinstance(image, dict) and "Id" in image}

    def present(self, image_ids: Iterable[str]) -> set[str]:
        """Which of ``image_ids`` the engine holds."""
        held = self.image_ids()
        return {image_id for image_id in image_ids if image_id in held}

    def repo_tags(self, image_id: str) -> set[str]:
        path = f"/images/{quote(image_id, safe='')}/json"
        found = self._json("GET", path, f"inspect image {engine_text(image_id)}")
        tags = found.get("RepoTags") if isinstance(found, dict) else None
        return {str(tag) for tag in tags} if isinstance(tags, list) else set()

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        """Point ``repository:tag`` at ``image_id`` (moving the tag if it pointed elsewhere)."""
        path = f"/images/{quote(image_id, safe='')}/tag"
        action = f"tag image as {engine_text(repository)}:{engine_text(tag)}"
        self._call("POST", path, action, repo=repository, tag=tag)

    def remove_unused(self, image_id: str) -> bool:
        """Remove ``image_id`` unless a container (running or stopped) uses it; never forced.
        Its tags go one by one (a tag that has moved to another image is not its own any more
        and stays); the last one takes the image with it. True once the image is gone, False if
        it is in use (the engine's 409): the caller tries again later."""
        try:
            tags = self.repo_tags(image_id)
        except NotFoundError:
            return True
        for name in sorted(tags) or [image_id]:
            path = f"/images/{quote(name, safe='')}"
            try:
                self._call("DELETE", path, f"remove image {engine_text(name)}")
            except NotFoundError:
                continue
            except ConflictError:  # a container uses it
                return False
        try:
            self.repo_tags(image_id)
        except NotFoundError:
            return True
        return False

    # -- the load ------------------------------------------------------------------------------

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        """``docker load`` of the tar that ``chunks`` yields; returns the names and IDs the
        engine reports loaded.

        ``chunks`` is the chunked request body, sent as it comes. If it raises, the same
        exception comes out of this call and the connection is closed before the body's end
        (the last, empty chunk is never sent): the engine sees a truncated upload and keeps
        nothing of it.
        """
        action = "load images into the Docker engine"
        with self._connect(self._stall_timeout) as sock:
            _blocking_sends(sock, self._stall_timeout)
            stopped = _send_body(sock, chunks)  # the source's own errors come out as they are
            sock.settimeout(self._stall_timeout)
            try:
                with _translated(action):
                    return self._answer(sock, stopped)
            except DockerUnavailable:
                if stopped is None:
                    raise
                self._raise_if_dropped_while_up()
                raise

    def _answer(self, sock: socket.socket, stopped: OSError | None) -> list[str]:
        """The engine's answer to the load: names loaded, or the error it gave."""
        if stopped is not None:  # it stopped taking the body: perhaps it says why
            if isinstance(stopped, TimeoutError):
                raise DockerError(
                    f"the Docker engine took nothing of the images for {self._stall_timeout:g} s"
                ) from stopped
            sock.settimeout(ANSWER_TIMEOUT)
        response = http.client.HTTPResponse(sock, method="POST")
        try:
            response.begin()
            if response.status >= 400:
                body = _read_bounded(response, MAX_LINE, time.monotonic() + self._stall_timeout)
                raise DockerError(f"the Docker engine could not load the images: {_message(body)}")
            loaded = [name for line in _lines(response) for name in _loaded_names(line)]
        finally:
            response.close()
        if stopped is not None:
            raise DockerError("the Docker engine closed the connection while loading the images")
        return loaded

    def _raise_if_dropped_while_up(self) -> None:
        """The connection broke mid-load: if the engine still answers, it refused the data."""
        try:
            self.ping()
        except DockerUnavailable:
            return
        raise DockerError("the Docker engine closed the connection while loading the images")


def _blocking_sends(sock: socket.socket, timeout: float) -> None:
    """Let each send block in the kernel (no poll before it, no partial sends: measured, a
    quarter less CPU for the load), bounded by ``SO_SNDTIMEO`` instead. Where the option
    cannot be set, the socket keeps its Python timeout."""
    seconds = int(timeout)
    microseconds = max(int((timeout - seconds) * 1_000_000), 0 if seconds else 1)  # 0 0: none
    try:
        timeval = struct.pack("@ll", seconds, microseconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except (OSError, struct.error):
        return
    sock.settimeout(None)


def _send_body(sock: socket.socket, chunks: Iterable[bytes]) -> OSError | None:
    """Send the request and ``chunks`` as its chunked body; the error that stopped the sending,
    if the engine stopped taking it (the source's errors are raised as they are)."""
    try:
        sock.sendall(LOAD_HEAD)
    except OSError as exc:
        return exc
    for piece in chunks:
        if not piece:
            continue  # an empty chunk would end the body
        size_line = b"%x\r\n" % len(piece)
        parts = (size_line, piece, b"\r\n")
        try:
            sent = sock.sendmsg(parts)
            if sent < len(size_line) + len(piece) + 2:  # a partial send (after a timeout wait)
                sock.sendall(memoryview(b"".join(parts))[sent:])
        except BlockingIOError as exc:  # SO_SNDTIMEO ran out
            return TimeoutError(str(exc))
        except OSError as exc:
            return exc
    try:
        sock.sendall(LAST_CHUNK)
    except BlockingIOError as exc:
        return TimeoutError(str(exc))
    except OSError as exc:
        return exc
    return None


def _read_bounded(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    """The whole body of ``response``: ``DockerError`` past ``limit`` bytes or ``deadline``."""
    body = bytearray()
    while piece := response.read1(READ_SIZE):
        body += piece
        if len(body) > limit:
            raise DockerError(f"the Docker engine's answer is over {limit} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took too long")
    return bytes(body)


def _lines(response: http.client.HTTPResponse) -> Iterator[Any]:
    """The load's answer, JSON lines, each parsed; at most ``MAX_LINES`` of ``MAX_LINE`` bytes."""
    buffer = bytearray()
    count = 0
    while piece := response.read1(READ_SIZE):
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
        yield _json_line(buffer)


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
