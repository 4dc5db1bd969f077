"""Notice when a file is put in place: ``FileWatch`` on Linux's inotify, without polling.

The images archive may be replaced while the agent runs (a package, a USB stick, a copy). A
watch on the file's *directory* sees every way it can arrive: renamed into place
(``IN_MOVED_TO``, what ``mv``, ``rename(2)`` and package managers do), or written in place or
created and closed (``IN_CLOSE_WRITE``, what ``cp`` does). A write still in progress is not a
change: only the close or the rename is. Events for other names in the directory are ignored.

The kernel's event queue is read on the event loop (``add_reader``), at most ``READ_SIZE`` bytes
a read, and every record is parsed with bounds (a name longer than the read is an error, not a
read past the buffer). Overflow of the kernel's queue (``IN_Q_OVERFLOW``) counts as a change,
since a change may have been lost. If the directory itself goes away or inotify is not available
the watch says so once (``problem``) and stops; callers keep their other triggers (boot,
``SIGHUP``, ``POST /unlock``).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

from loguru import logger

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)
READ_SIZE = 64 * 1024  # many events a read; one event is at most 16 + NAME_MAX + 1 bytes


class FileWatch:
    """Calls ``on_change()`` on the event loop each time ``path`` is put in place."""

    def __init__(self, path: Path, on_change: Callable[[], None]) -> None:
        self._path = path
        self._name = os.fsencode(path.name)
        self._on_change = on_change
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self.problem: str | None = None

    @property
    def active(self) -> bool:
        return self._fd >= 0

    def start(self) -> bool:
        """Start watching (on the running loop); False, with ``problem`` set, if it cannot."""
        self._loop = asyncio.get_running_loop()
        try:
            self._fd = _inotify_watch(self._path.parent)
        except OSError as exc:
            return self._give_up(f"cannot watch {self._path.parent} ({exc.strerror})")
        self._loop.add_reader(self._fd, self._read)
        return True

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1

    def _give_up(self, problem: str) -> bool:
        self.close()
        self.problem = problem
        logger.warning(
            "{}; {} is checked at boot, on reload and on unlock only", problem, self._path
        )
        return False

    def _read(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._give_up(f"reading the watch of {self._path.parent} failed ({exc.strerror})")
            return
        try:
            changed, gone = parse_events(data, self._name)
        except ValueError as exc:
            self._give_up(f"the watch of {self._path.parent} read garbage ({exc})")
            return
        if gone:
            self._give_up(f"{self._path.parent} was removed or moved")
        if changed:
            self._on_change()


def parse_events(data: bytes, name: bytes) -> tuple[bool, bool]:
    """(whether ``name`` was put in place, whether the directory went away) from one read of
    inotify records. ``ValueError`` if a record runs past the data (never read beyond it)."""
    changed = gone = False
    offset = 0
    while offset < len(data):
        if offset + _EVENT.size > len(data):
            raise ValueError("a truncated inotify record")
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        if length > len(data) - offset:
            raise ValueError("an inotify record's name runs past the data")
        event_name = data[offset : offset + length].rstrip(b"\0")
        offset += length
        if mask & IN_Q_OVERFLOW:
            changed = True
        elif mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            gone = True
        elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO) and event_name == name:
            changed = True
    return changed, gone


def _inotify_watch(directory: Path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno() or errno.ENOSYS, "inotify_init1")
    if libc.inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK) < 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, "inotify_add_watch")
    return int(fd)
