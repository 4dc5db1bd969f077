"""The Docker engine through the Docker SDK, as ``pack-images`` needs it: look up, save.

(The unlock talks to the engine's API directly, without the SDK: ``agent.engine``.) Everything
here is blocking (the Docker SDK is); async callers run it in a worker thread.
Foreign errors are translated in one place, ``_translated``: an engine that cannot be reached
(no socket yet, connection refused) is ``DockerUnavailable``, which callers retry; anything the
engine itself refuses is ``DockerError``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from agent.errors import DockerError, DockerUnavailable, LoaderError, NotFoundError

# One load of a large archive may keep a single request busy for minutes.
REQUEST_TIMEOUT = 900.0
SAVE_CHUNK_SIZE = 1024 * 1024
DEFAULT_UNIX_HOST = "unix:///var/run/docker.sock"
_IMAGE_ID = re.compile(r"^(sha256:)?[0-9a-f]{12,64}$")


@dataclass(frozen=True)
class Reference:
    """An image reference split into its repository and tag (either may be absent)."""

    repository: str | None
    tag: str | None


def parse_reference(ref: str) -> Reference:
    """``registry:5000/team/app:1.2`` -> (``registry:5000/team/app``, ``1.2``); IDs have none."""
    if _IMAGE_ID.match(ref):
        return Reference(None, None)
    name = ref.split("@", 1)[0]
    repository, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:  # the colon belonged to a registry port, not a tag
        return Reference(name, None)
    return Reference(repository, tag)


def _is_connection_failure(exc: BaseException) -> bool:
    """True when the engine could not be reached at all (as opposed to refusing a request)."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn Docker SDK / requests errors raised while doing ``action`` into ours."""
    import docker.errors  # the SDK costs ~0.5 s and ~15 MiB: imported when first used
    import requests

    try:
        yield
    except LoaderError:
        raise
    except docker.errors.ImageNotFound as exc:
        raise NotFoundError(f"cannot {action}: {_explanation(exc)}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        if _is_connection_failure(exc):
            raise DockerUnavailable(
                f"cannot {action}: the Docker engine is not reachable (is dockerd running?)"
            ) from exc
        raise DockerError(f"cannot {action}: {_explanation(exc)}") from exc


def _explanation(exc: Exception) -> str:
    import docker.errors

    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def _probe_unix_socket(host: str) -> None:
    """Fail fast, and without leaking a socket, while a local engine's socket does not answer.

    The SDK leaves a socket unclosed when connecting to a Unix socket fails; at boot we retry
    that many times, so the common case (no socket yet, or refused) is checked here instead.
    """
    if not host.startswith("unix://"):
        return
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(path)
        except OSError as exc:
            raise DockerUnavailable(
                f"cannot connect to the Docker engine at {host}: {exc.strerror or exc} "
                "(is dockerd running?)"
            ) from exc


class ImageEngine:
    """A connection to one Docker engine. Close it when done (it owns an HTTP pool)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    def connect(cls, host: str | None = None) -> ImageEngine:
        """Connect to ``host`` (``unix://...``, ``tcp://...``) or, if None, per ``DOCKER_HOST``.

        Raises ``DockerUnavailable`` while the engine is not up.
        """
        import docker

        _probe_unix_socket(host or os.environ.get("DOCKER_HOST") or DEFAULT_UNIX_HOST)
        with _translated("connect to the Docker engine"):
            if host:
                client = docker.DockerClient(base_url=host, timeout=REQUEST_TIMEOUT)
            else:
                client = docker.from_env(timeout=REQUEST_TIMEOUT)
        return cls(client)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ImageEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def image_id(self, ref: str) -> str:
        """The full ID (``sha256:...``) of ``ref``; ``NotFoundError`` if the engine lacks it."""
        with _translated(f"find image {ref}"):
            return str(self._client.api.inspect_image(ref)["Id"])

    def save(self, refs: Sequence[str], chunk_size: int = SAVE_CHUNK_SIZE) -> Iterator[bytes]:
        """``docker save refs...`` as a stream of tar bytes (one tar; shared layers once)."""
        api = self._client.api
        with _translated("save images"):
            # The SDK's get_image() takes a single name; the engine's /images/get takes many.
            response = api._get(api._url("/images/get"), params={"names": list(refs)}, stream=True)
            api._raise_for_status(response)
        return self._stream(api._stream_raw_result(response, chunk_size, False))

    @staticmethod
    def _stream(chunks: Iterator[bytes]) -> Iterator[bytes]:
        with _translated("save images"):
            yield from chunks
