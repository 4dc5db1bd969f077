"""The sockets the agent serves on: its Unix socket, a loopback TCP port, or systemd's.

Opened before anything else so that a second agent, a bad path or a taken port stops ``serve``
at once with a clear line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError, ConflictError
from agent.settings import is_loopback

SD_LISTEN_FDS_START = 3
SOCKET_MODE = 0o660


@dataclass
class Listener:
    sock: socket.socket
    description: str
    # The socket file we created and must remove at shutdown (not systemd's).
    owned_path: Path | None = None

    def close(self) -> None:
        self.sock.close()
        if self.owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.owned_path.unlink()


def systemd_sockets(environ: Mapping[str, str]) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (sd_listen_fds(3)), if meant for us."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        return f"a socket of family {sock.family}"
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    host, port = name[0], name[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_unix(path: Path) -> Listener:
    """Bind ``path`` with mode 0660, replacing a stale socket file but never a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # the file is born 0660: no window where others can connect
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    sock.listen(128)
    return Listener(sock, f"unix:{path}", owned_path=path)


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"cannot create socket {path}: a file that is not a socket is in the way")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"cannot check socket {path}: {exc.strerror}") from exc
        path.unlink(missing_ok=True)  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise ConflictError(f"another agent is already serving on {path}")


def bind_tcp(host: str, port: int) -> Listener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {host}:{port} (LOADER_HTTP_PORT): {reason}") from exc
    return Listener(sock, describe(sock))


def check_inherited(sock: socket.socket) -> None:
    """A socket systemd hands over must be one this agent may serve on: a listening stream
    socket, Unix or bound to loopback (the API is for this device only). Anything else is a
    configuration error of the socket unit: exit 2, naming it."""
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        where = describe(sock)
    except OSError as exc:
        raise ConfigError(f"systemd passed a socket that cannot be used: {exc.strerror}") from exc
    if kind != socket.SOCK_STREAM or not listening:
        raise ConfigError(f"systemd passed {where}, which is not a listening stream socket")
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = sock.getsockname()[0]
        if not is_loopback(host):
            raise ConfigError(
                f"systemd passed {where}, which is not on loopback: the local API must not be "
                f"reachable from the network (fix ListenStream= in azaion-loader.socket)"
            )
    elif sock.family != socket.AF_UNIX:
        raise ConfigError(f"systemd passed {where}, which is neither Unix nor TCP")


def open_listeners(
    socket_path: Path, http_host: str, http_port: int, environ: Mapping[str, str]
) -> list[Listener]:
    """systemd's sockets when it passed any, else our Unix socket and (port > 0) TCP."""
    inherited = systemd_sockets(environ)
    if inherited:
        for sock in inherited:
            check_inherited(sock)
        return [Listener(sock, describe(sock) + " (from systemd)") for sock in inherited]
    listeners = [bind_unix(socket_path)]
    if http_port:
        try:
            listeners.append(bind_tcp(http_host, http_port))
        except ConfigError:
            listeners[0].close()
            raise
    return listeners
