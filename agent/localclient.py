"""A small synchronous client of the running agent over its Unix socket (used by the CLI).

Plain ``http.client`` over ``AF_UNIX``: streaming both ways, no event loop needed in the CLI.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from agent.errors import AgentError, LoaderError

CHUNK = 256 * 1024
Progress = Callable[[int], None]


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float | None = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        conn = UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
        except FileNotFoundError as exc:
            conn.close()
            raise LoaderError(f"the agent is not running: no socket at {self.socket_path}") from exc
        except ConnectionRefusedError as exc:
            conn.close()
            raise LoaderError(
                f"the agent is not running: nothing listens on {self.socket_path}"
            ) from exc
        except PermissionError as exc:
            conn.close()
            raise LoaderError(
                f"permission denied on {self.socket_path}: run as root or join the socket's group"
            ) from exc
        except TimeoutError as exc:
            conn.close()
            raise LoaderError(f"the agent did not answer within {self.timeout} s") from exc
        except OSError as exc:
            conn.close()
            raise LoaderError(f"cannot talk to the agent at {self.socket_path}: {exc}") from exc
        if response.status >= 400:
            raise _error_from(response)
        return response

    def get_json(self, path: str) -> dict[str, Any]:
        return _json_body(self._request("GET", path))

    def post_json(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps(payload or {}).encode()
        response = self._request("POST", path, body, {"Content-Type": "application/json"})
        return _json_body(response)

    def load(self, folder: str, name: str, out: BinaryIO, progress: Progress | None = None) -> int:
        """Stream resource ``name`` into ``out``; returns the bytes written."""
        body = json.dumps({"folder": folder, "filename": name}).encode()
        response = self._request(
            "POST", f"/load/{name}", body, {"Content-Type": "application/json"}
        )
        expected = int(response.headers.get("Content-Length", "-1"))
        done = 0
        while chunk := response.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            if progress:
                progress(done)
        if expected >= 0 and done != expected:
            raise LoaderError(f"the agent's answer was cut off after {done} of {expected} bytes")
        return done

    def upload(
        self,
        path: Path,
        folder: str,
        name: str,
        progress: Progress | None = None,
        *,
        statement_for: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        """Upload the file; with ``statement_for`` (key id, release), only its first step of a
        signed upload: the agent answers the statement to sign (``/upload/NAME/statement``)."""
        target = f"/upload/{name}"
        if statement_for is not None:
            key_id, release = statement_for
            target += f"/statement?key_id={key_id}&release={release}"
        boundary = uuid.uuid4().hex
        head = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="folder"\r\n\r\n'
            f"{folder}\r\n"
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = path.stat().st_size

        def body() -> Iterator[bytes]:
            yield head
            done = 0
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    done += len(chunk)
                    if progress:
                        progress(done)
                    yield chunk
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + size + len(tail)),
        }
        return _json_body(self._request("POST", target, body(), headers))


def _json_body(response: http.client.HTTPResponse) -> dict[str, Any]:
    try:
        data = json.loads(response.read())
    except ValueError as exc:
        raise LoaderError("the agent answered with something that is not JSON") from exc
    if not isinstance(data, dict):
        raise LoaderError("the agent answered with an unexpected JSON value")
    return data


def _error_from(response: http.client.HTTPResponse) -> AgentError:
    raw = response.read(64 * 1024)
    try:
        data = json.loads(raw)
        return AgentError(str(data["message"]), str(data["error"]), response.status)
    except (ValueError, KeyError, TypeError):
        return AgentError(
            f"the agent answered {response.status} {response.reason}", "http", response.status
        )
