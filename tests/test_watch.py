"""``FileWatch``: the images archive put in place while the agent runs (agent/watch.py).

Real inotify on a real directory: each way a file can arrive (rename into place, copy, write
and close), what must not count (another name, a write still open), the directory going away,
and the parser's bounds on hostile records.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent import watch

DEADLINE = 5.0  # seconds to wait for an event that must come


class Changes:
    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.event.wait(), DEADLINE)
        self.event.clear()

    async def none_after(self, marker: Path) -> None:
        """No change was reported for what happened before a marker file was written: the
        kernel queued those events first, so when the marker's watch is ready, this watch's
        descriptor is ready in the same poll and its reader runs in the same loop turn."""
        seen = asyncio.Event()
        sentinel = watch.FileWatch(marker, seen.set)
        assert sentinel.start()
        try:
            marker.write_bytes(b"m")
            await asyncio.wait_for(seen.wait(), DEADLINE)
        finally:
            sentinel.close()
        assert not self.event.is_set()


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[Path, Changes, watch.FileWatch]]:
    target = tmp_path / "images.enc"
    changes = Changes()
    file_watch = watch.FileWatch(target, changes)
    assert file_watch.start() and file_watch.active
    yield target, changes, file_watch
    file_watch.close()


async def test_a_rename_into_place_is_a_change(
    watched: tuple[Path, Changes, watch.FileWatch],
) -> None:
    target, changes, _ = watched
    staged = target.with_name(".images.enc.new")
    staged.write_bytes(b"release 2")
    await changes.none_after(target.with_name("marker-1"))  # writing another name: nothing
    os.replace(staged, target)
    await changes.next()
    assert changes.count == 1


async def test_a_copy_counts_once_it_is_closed(
    watched: tuple[Path, Changes, watch.FileWatch], tmp_path: Path
) -> None:
    target, changes, _ = watched
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(1 << 20))
    with target.open("wb") as file:
        file.write(b"half")
        file.flush()
        await changes.none_after(tmp_path / "marker-2")  # still open: not a change yet
    await changes.next()
    shutil.copyfile(source, target)
    await changes.next()
    assert changes.count == 2


async def test_the_directory_going_away_stops_the_watch_with_a_reason(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "images"
    directory.mkdir()
    file_watch = watch.FileWatch(directory / "images.enc", lambda: None)
    assert file_watch.start()
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    original = file_watch._give_up

    def give_up(problem: str) -> bool:
        loop.call_soon(gone.set)
        return original(problem)

    file_watch._give_up = give_up  # type: ignore[method-assign]
    directory.rename(tmp_path / "moved")
    await asyncio.wait_for(gone.wait(), DEADLINE)
    assert not file_watch.active and "removed or moved" in (file_watch.problem or "")


async def test_an_unwatchable_directory_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    file_watch = watch.FileWatch(tmp_path / "missing" / "images.enc", lambda: None)
    assert not file_watch.start()
    assert not file_watch.active and "cannot watch" in (file_watch.problem or "")


def record(mask: int, name: bytes, padded: int | None = None) -> bytes:
    length = padded if padded is not None else len(name) + 1
    return struct.pack("iIII", 1, mask, 0, length) + name.ljust(length, b"\0")


def test_the_parser_takes_only_the_watched_name() -> None:
    data = record(watch.IN_CLOSE_WRITE, b"other.enc") + record(watch.IN_MOVED_TO, b"images.enc", 16)
    assert watch.parse_events(data, b"images.enc") == (True, False)
    assert watch.parse_events(record(watch.IN_CLOSE_WRITE, b"images.enc.tmp"), b"images.enc") == (
        False,
        False,
    )
    assert watch.parse_events(record(watch.IN_Q_OVERFLOW, b""), b"images.enc") == (True, False)
    assert watch.parse_events(record(watch.IN_DELETE_SELF, b""), b"images.enc") == (False, True)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("iIII", 1, watch.IN_MOVED_TO, 0, 64) + b"images.enc",  # name past the data
        struct.pack("iII", 1, watch.IN_MOVED_TO, 0),  # a cut record
        struct.pack("iIII", 1, watch.IN_MOVED_TO, 0, 2**32 - 1),  # a huge length
    ],
)
def test_the_parser_never_reads_past_the_data(data: bytes) -> None:
    with pytest.raises(ValueError):
        watch.parse_events(data, b"images.enc")
