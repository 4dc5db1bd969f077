"""Fixtures of the system tests: the .deb, the cached rootfs, and booted machines.

- ``deb_package`` (session): ``$LOADER_TEST_DEB`` if set (CI may build it first with
  ``make deb``), else built once by ``packaging/build-deb.sh`` into a session temp dir.
- ``installed_layer`` (session): the package installed offline into the cached rootfs, kept as
  a read-only overlay layer, so that each test boots a fresh machine in about two seconds.
- ``new_machine(installed=True)``: a stopped machine for one test (files may be written into
  ``machine.root`` before ``boot()``), destroyed at teardown; its journal is printed when the
  test failed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.system.machine import Machine, base_rootfs, require_deb_build_tools, require_tools

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 900.0


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("LOADER_TEST_DEB")
    if prebuilt:
        path = Path(prebuilt)
        assert path.is_file(), f"LOADER_TEST_DEB={prebuilt} is not a file"
        return path
    require_deb_build_tools()
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        ["bash", str(REPO / "packaging" / "build-deb.sh"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, f"build-deb.sh failed:\n{result.stdout}{result.stderr}"
    debs = sorted(out.glob("azaion-loader_*.deb"))
    assert len(debs) == 1, f"build-deb.sh made {debs}"
    return debs[0]


@pytest.fixture(scope="session")
def rootfs() -> Path:
    require_tools()
    return base_rootfs()


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

    def make(installed: bool = True) -> Machine:
        layers = [rootfs]
        if installed:
            layers.insert(0, request.getfixturevalue("installed_layer"))
        machine = Machine.create(layers)
        made.append(machine)
        return machine

    yield make
    for machine in made:
        if request.node.stash.get(FAILED, False) and machine.running:
            print(f"--- journal of {machine.name}\n{machine.journal(lines=150)}")
            print(f"--- console of {machine.name}\n{machine.console(lines=40)}")
        machine.destroy()
