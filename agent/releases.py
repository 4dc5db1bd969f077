"""ResourceReleases: the newest signed release of each resource this device has loaded, so
that an older one put back upstream is refused (anti-rollback for resources).

A signed resource names its release (docs/format.md, "Publisher signatures"). Once a load of
release N of ``folder/name`` verified, a later load of a lower release of the same name is a
``RollbackRefused`` (409), unless ``LOADER_ALLOW_DOWNGRADE=1`` (then it loads, the journal says
so at warning, and the record follows it down). Unsigned resources, and signed ones whose key
this device does not trust while signatures are not enforced, carry no release it could trust
and are not recorded.

The record is ``LOADER_STATE_DIR/resource-releases.json``, ``{"version": 1, "releases":
{"folder/name": N}}``, written atomically (``agent.durable``) when a release rises: rarely,
not at every load. Read with bounds (``MAX_FILE_BYTES``, ``MAX_ENTRIES``); beyond
``MAX_ENTRIES`` names, the one whose release rose longest ago is forgotten. A record that cannot
be read is set aside (renamed ``.corrupt``) with a warning and the device starts afresh: a
device that can no longer load any model would be worse than one that forgot which releases it
had seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loguru import logger

from agent.durable import write_atomically
from agent.errors import RollbackRefused, StorageError
from agent.signing import MAX_RELEASE

FILE_NAME = "resource-releases.json"
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_ENTRIES = 20_000
VERSION = 1


class ResourceReleases:
    """See the module docstring. ``state_dir`` None keeps the record in memory only."""

    def __init__(self, state_dir: Path | None, *, allow_downgrade: bool = False) -> None:
        self._path = state_dir / FILE_NAME if state_dir is not None else None
        self._allow_downgrade = allow_downgrade
        self._releases: dict[str, int] = self._read()

    def check(self, folder: str, name: str, release: int) -> bool:
        """Refuse a release lower than the newest loaded (unless downgrades are allowed);
        whether the record changes (then ``save``)."""
        key = f"{folder}/{name}"
        known = self._releases.get(key)
        if known is not None and release < known:
            if not self._allow_downgrade:
                raise RollbackRefused(
                    f"resource {key} is signed as release {release}, older than release "
                    f"{known} this device has loaded; set LOADER_ALLOW_DOWNGRADE=1 for one boot "
                    "to allow it"
                )
            logger.warning(
                "loading resource {} release {} over release {} (LOADER_ALLOW_DOWNGRADE)",
                key,
                release,
                known,
            )
        return known != release

    def record(self, folder: str, name: str, release: int) -> bytes | None:
        """Note ``release`` as the newest of ``folder/name``; the record's new bytes to
        ``save``, or None when kept in memory only."""
        key = f"{folder}/{name}"
        self._releases.pop(key, None)  # re-inserted last: the most recently risen
        self._releases[key] = release
        while len(self._releases) > MAX_ENTRIES:
            del self._releases[next(iter(self._releases))]
        if self._path is None:
            return None
        return json.dumps({"version": VERSION, "releases": self._releases}).encode()

    def save(self, data: bytes) -> None:
        """Write the record (a worker thread's job: it fsyncs)."""
        assert self._path is not None
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(self._path, data)
        except OSError as exc:
            raise StorageError(
                f"cannot record resource releases in {self._path}: {exc.strerror or exc}"
            ) from exc

    def _read(self) -> dict[str, int]:
        if self._path is None:
            return {}
        try:
            with self._path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StorageError(f"cannot read {self._path}: {exc.strerror or exc}") from exc
        try:
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            return _parse(data)
        except (ValueError, RecursionError) as exc:
            aside = self._path.with_name(self._path.name + ".corrupt")
            logger.warning(
                "the record of resource releases {} cannot be read ({}); set aside as {}, "
                "starting afresh",
                self._path,
                exc,
                aside.name,
            )
            os.replace(self._path, aside)
            return {}


def _parse(data: bytes) -> dict[str, int]:
    document = json.loads(data)  # ValueError (JSONDecodeError) if it is not JSON
    if not isinstance(document, dict) or document.get("version") != VERSION:
        raise ValueError("not a record of version 1")
    releases = document.get("releases")
    if not isinstance(releases, dict) or len(releases) > MAX_ENTRIES:
        raise ValueError("no releases, or too many")
    for key, release in releases.items():
        if not isinstance(key, str) or key.count("/") != 1 or len(key) > 512:
            raise ValueError("a name that is not folder/name")
        if type(release) is not int or not 0 <= release <= MAX_RELEASE:
            raise ValueError("a release that is not a release number")  # (names not echoed)
    return dict(releases)
