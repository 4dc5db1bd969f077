"""Fixtures of the system tests: the .deb, the cached rootfs, and booted machines.

- ``deb_package`` (session): ``$LOADER_TEST_DEB`` if set (CI may build it first with
  ``make deb``), else built once by ``packaging/build-deb.sh`` into a session temp dir.
- ``arm64_deb`` (session): the same for arm64 (``build-deb.sh --arch arm64``, or
  ``$LOADER_TEST_DEB_ARM64``).
- ``old_deb`` (session): the release in the field, 0.1.0 (commit ``OLD_RELEASE``, the layout
  before the environment was built on the device): ``$LOADER_TEST_OLD_DEB``, else built from
  that commit's own sources (``git archive``) once and cached next to the root file systems.
- ``root_of(suite, arch)``: a cached debootstrap root (``machine.base_rootfs``); another
  architecture's is made and run under qemu-user-static.
- ``installed_layer`` (session): the package installed offline into the cached rootfs, kept as
  a read-only overlay layer, so that each test boots a fresh machine in about two seconds.
- ``new_machine(installed=True, layers=None)``: a stopped machine for one test (files may be
  written into ``machine.root`` before ``boot()``), on the given layers or the bookworm root
  (with the package installed offline unless ``installed=False``), destroyed at teardown; its
  journal is printed when the test failed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from tests.system.machine import (
    CACHE_DIR,
    Machine,
    base_rootfs,
    native_arch,
    require_deb_build_tools,
    require_foreign,
    require_tools,
)

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 900.0


# The release in the field: 0.1.0, the whole virtual environment shipped as dpkg's files.
OLD_RELEASE = "cf0cbde2a4acad7415f89edd333383d09c728c59"


def prebuilt(variable: str) -> Path | None:
    value = os.environ.get(variable)
    if not value:
        return None
    path = Path(value)
    assert path.is_file(), f"{variable}={value} is not a file"
    return path


def build_deb(out: Path, *options: str, repo: Path = REPO) -> Path:
    """``packaging/build-deb.sh --out OUT OPTIONS`` of ``repo``; the one .deb it made."""
    require_deb_build_tools()
    result = subprocess.run(
        ["bash", str(repo / "packaging" / "build-deb.sh"), "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, f"build-deb.sh {options} failed:\n{result.stdout}{result.stderr}"
    debs = sorted(out.glob("azaion-loader_*.deb"))
    assert len(debs) == 1, f"build-deb.sh made {debs}"
    return debs[0]


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prebuilt("LOADER_TEST_DEB") or build_deb(tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def arm64_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prebuilt("LOADER_TEST_DEB_ARM64") or build_deb(
        tmp_path_factory.mktemp("deb-arm64"), "--arch", "arm64"
    )


@pytest.fixture(scope="session")
def old_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.1.0 as the field has it. A release does not change: built once per machine."""
    given = prebuilt("LOADER_TEST_OLD_DEB")
    if given:
        return given
    cached = CACHE_DIR / f"deb-{OLD_RELEASE[:12]}-{native_arch()}"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "deb.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it right now
        found = sorted(cached.glob("azaion-loader_*.deb"))
        if not found:
            build_old_release(cached, tmp_path_factory.mktemp("old-release"))
            found = sorted(cached.glob("azaion-loader_*.deb"))
    assert len(found) == 1, found
    return found[0]


def build_old_release(cached: Path, src: Path) -> None:
    """Build OLD_RELEASE from its own sources (``git archive``: no worktree) into ``cached``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", OLD_RELEASE],
        capture_output=True,
        timeout=120,
    )
    assert archive.returncode == 0, (
        f"cannot read commit {OLD_RELEASE} (the 0.1.0 release) from {REPO}: "
        f"{archive.stderr.decode(errors='replace')}; a shallow clone lacks it: fetch it, or set "
        "LOADER_TEST_OLD_DEB to a 0.1.0 package"
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=120)
    partial = cached.with_name(cached.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build_deb(partial, repo=src)
    partial.rename(cached)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    require_tools()
    return base_rootfs()


@pytest.fixture(scope="session")
def root_of() -> Callable[[str, str], Path]:
    """``root_of(suite, arch)``: the cached minimal root file system of that Debian."""

    def get(suite: str, arch: str) -> Path:
        require_tools()
        if arch != native_arch():
            require_foreign(arch)
        return base_rootfs(suite=suite, arch=arch)

    return get


@pytest.fixture(scope="session")
def installed_layer(rootfs: Path, deb_package: Path) -> Iterator[Path]:
    image = Machine.create([rootfs], prefix="al-image")
    try:
        result = image.install_offline(deb_package)
        assert result.returncode == 0, f"dpkg -i failed:\n{result.stdout}{result.stderr}"
        yield image.freeze()
    finally:
        image.destroy()


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


@pytest.fixture
def new_machine(request: pytest.FixtureRequest, rootfs: Path) -> Iterator[Callable[..., Machine]]:
    made: list[Machine] = []

    def make(installed: bool = True, layers: Sequence[Path] | None = None) -> Machine:
        """A stopped machine: on ``layers`` (topmost first) if given, else on the bookworm
        root with (``installed``) or without the package."""
        if layers is None:
            layers = [rootfs]
            if installed:
                layers = [request.getfixturevalue("installed_layer"), rootfs]
        machine = Machine.create(layers)
        made.append(machine)
        return machine

    yield make
    for machine in made:
        if request.node.stash.get(FAILED, False) and machine.running:
            print(f"--- journal of {machine.name}\n{machine.journal(lines=150)}")
            print(f"--- console of {machine.name}\n{machine.console(lines=40)}")
        machine.destroy()
