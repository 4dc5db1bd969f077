"""The model cache's bound (``LOADER_CACHE_MAX_BYTES``), eviction, orphans and index, end to end:
real agent processes over their sockets, the real dev-api over loopback. A device under test
(``device``) loads what another device (``publisher``, its own agent and cache) uploaded; which
big parts stay is read from the device's cache directory, its ``/status`` and its journal."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cache import INDEX_MAX_BYTES, INDEX_NAME, BigPartCache, default_max_bytes
from agent.errors import ConfigError
from agent.localclient import UnixConnection
from agent.settings import load_settings
from tests.fixtures.agent import AgentProcess, agent_env, short_tmpdir, wait_for
from tests.fixtures.devapi import DevApi
from tests.test_resources import pattern

MiB = 1 << 20
FOLDER = "models"

Device = Callable[..., AgentProcess]


@pytest.fixture
def make_device(dev_api: DevApi) -> Iterator[Device]:
    """Agents that act as separate devices (each its own socket, state and cache), logged in
    to the test's dev-api; stopped and removed at teardown."""
    made: list[tuple[AgentProcess, Path]] = []

    def make(**overrides: str) -> AgentProcess:
        root = short_tmpdir()
        env = agent_env(
            root,
            RESOURCE_API_URL=dev_api.url,
            AZAION_EMAIL=dev_api.email,
            AZAION_PASSWORD=dev_api.password,
            **overrides,
        )
        agent = AgentProcess(root, env)
        made.append((agent, root))
        return agent.start()

    yield make
    for agent, root in made:
        try:
            agent.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def publisher(make_device: Device) -> AgentProcess:
    return make_device()


def upload(agent: AgentProcess, name: str, data: bytes) -> str:
    """Upload ``data`` as ``FOLDER/name`` through ``agent``; the big part's name."""
    source = agent.root / "uploads" / name  # the resource is named after the file
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    result = agent.cli("upload", str(source), "--folder", FOLDER, "--json")
    assert result.returncode == 0, result.stderr
    big: str = json.loads(result.stdout)["big_sha256"]
    return big


def load(agent: AgentProcess, name: str) -> bytes:
    reply = agent.request("POST", f"/load/{name}", {"folder": FOLDER}, timeout=60)
    assert reply.status == 200, reply.body
    return reply.body


def cache_dir(agent: AgentProcess) -> Path:
    return Path(agent.env["MODEL_CACHE_DIR"])


def cached(agent: AgentProcess) -> set[str]:
    """The complete big parts in the device's cache (partial files and the index left out)."""
    folder = cache_dir(agent) / FOLDER
    if not folder.exists():
        return set()
    return {path.name for path in folder.iterdir() if not path.name.startswith(".")}


def cache_status(agent: AgentProcess) -> dict[str, int]:
    reply = agent.request("GET", "/status")
    assert reply.status == 200
    status: dict[str, int] = reply.json()["cache"]
    return status


def disk_bytes(agent: AgentProcess) -> int:
    return sum(p.stat().st_size for p in (cache_dir(agent) / FOLDER).iterdir())


def age(agent: AgentProcess, big: str, seconds_ago: float) -> None:
    """Give a cached part's file older access and modification times (what the LRU order
    falls back to without an index)."""
    when = time.time() - seconds_ago
    os.utime(cache_dir(agent) / FOLDER / big, (when, when))


def metric(agent: AgentProcess, line_start: str) -> float:
    body = agent.request("GET", "/metrics").body.decode()
    return next(
        float(line.split()[-1]) for line in body.splitlines() if line.startswith(line_start)
    )


# -- the bound and the LRU order ---------------------------------------------------------------


def test_bound_holds_and_the_least_recently_loaded_part_goes(
    make_device: Device, publisher: AgentProcess, dev_api: DevApi
) -> None:
    data = {name: pattern(MiB, seed) for seed, name in enumerate("abc")}
    big = {name: upload(publisher, name, content) for name, content in data.items()}
    bound = 5 * MiB // 2  # two parts of ~1 MiB fit, three do not
    device = make_device(LOADER_CACHE_MAX_BYTES=str(bound))
    assert load(device, "a") == data["a"]
    assert load(device, "b") == data["b"]
    assert load(device, "a") == data["a"]  # a is now more recent than b
    assert cached(device) == {big["a"], big["b"]}
    assert load(device, "c") == data["c"]
    assert cached(device) == {big["a"], big["c"]}  # b, the least recently loaded, went
    status = cache_status(device)
    assert status["max_bytes"] == bound
    assert status["used_bytes"] == disk_bytes(device) <= bound
    assert status["parts"] == 2
    assert status["evictions"] == 1 and status["orphans_removed"] == 0
    assert f'removed big part "{FOLDER}/{big["b"]}"' in device.log()
    assert metric(device, "azaion_loader_cache_bytes ") == status["used_bytes"]
    assert metric(device, "azaion_loader_cache_limit_bytes ") == bound
    assert metric(device, 'azaion_loader_cache_removals_total{reason="evicted"}') == 1
    human = device.cli("status").stdout
    used_mb, bound_mb = status["used_bytes"] / 1e6, bound / 1e6
    assert (
        f"model cache:   {cache_dir(device)} ({used_mb:.1f} MB of {bound_mb:.1f} MB, 2 parts)"
        in human
    )
    cdn_gets = dev_api.count("GET", "/cdn/")
    assert load(device, "b") == data["b"]  # evicted: from the CDN again
    assert dev_api.count("GET", "/cdn/") == cdn_gets + 1
    assert cached(device) == {big["c"], big["b"]}


def test_a_part_a_slow_load_reads_is_not_evicted(
    make_device: Device, publisher: AgentProcess
) -> None:
    held_data = pattern(24 * MiB, 1)
    small = {name: pattern(4 * MiB, seed) for seed, name in enumerate("bc", start=2)}
    held_big = upload(publisher, "held", held_data)
    big = {name: upload(publisher, name, content) for name, content in small.items()}
    device = make_device(LOADER_CACHE_MAX_BYTES=str(30 * MiB))  # held + one small part fit
    assert load(device, "held") == held_data  # in the cache: the load below reads the file
    reader = UnixConnection(device.socket_path, timeout=60)
    try:
        reader.request(
            "POST", "/load/held", b'{"folder": "models"}', {"Content-Type": "application/json"}
        )
        answer = reader.getresponse()  # the load has its part open; the client stops reading
        assert answer.status == 200
        first = answer.read(1000)
        assert load(device, "b") == small["b"]
        assert load(device, "c") == small["c"]  # over the bound: held is least recently used
        assert cached(device) == {held_big, big["c"]}  # ... but being read: b went instead
        assert first + answer.read() == held_data
    finally:
        reader.close()
    assert held_big in cached(device)
    assert cache_status(device)["evictions"] == 1


def test_a_part_larger_than_the_bound_is_loaded_and_not_kept(
    make_device: Device, publisher: AgentProcess
) -> None:
    data = pattern(2 * MiB, 7)
    upload(publisher, "huge", data)
    device = make_device(LOADER_CACHE_MAX_BYTES=str(MiB))
    assert load(device, "huge") == data
    assert "larger than the whole model cache" in device.log()

    def gone() -> bool:  # removed once its load has let go of it (after the last byte went)
        return not cached(device) and cache_status(device)["used_bytes"] == 0

    wait_for(gone, 10, "the oversized part to be removed")
    assert cache_status(device)["evictions"] == 1


# -- orphans -----------------------------------------------------------------------------------


def test_a_re_upload_removes_the_old_big_part(make_device: Device) -> None:
    device = make_device()
    first = upload(device, "model", pattern(MiB, 1))
    assert cached(device) == {first}
    second_data = pattern(MiB, 2)
    second = upload(device, "model", second_data)
    assert cached(device) == {second}
    assert cache_status(device)["orphans_removed"] == 1
    assert "no resource uses it any more" in device.log()
    assert load(device, "model") == second_data


def test_a_resource_replaced_by_another_device_leaves_an_orphan_the_next_load_removes(
    make_device: Device, publisher: AgentProcess
) -> None:
    device = make_device()
    old = upload(publisher, "model", pattern(MiB, 1))
    keep = upload(publisher, "other", pattern(MiB, 3))
    load(device, "model")
    load(device, "other")
    assert cached(device) == {old, keep}
    new_data = pattern(MiB, 2)
    new = upload(publisher, "model", new_data)  # the device does not know yet
    assert cached(device) == {old, keep}
    assert load(device, "model") == new_data
    assert cached(device) == {new, keep}
    status = cache_status(device)
    assert status["orphans_removed"] == 1 and status["evictions"] == 0


def test_an_orphan_a_load_reads_goes_when_that_load_ends(
    make_device: Device, publisher: AgentProcess
) -> None:
    old_data = pattern(24 * MiB, 1)
    old = upload(publisher, "model", old_data)
    device = make_device()
    assert load(device, "model") == old_data
    reader = UnixConnection(device.socket_path, timeout=60)
    try:
        reader.request(
            "POST", "/load/model", b'{"folder": "models"}', {"Content-Type": "application/json"}
        )
        answer = reader.getresponse()  # reads the old part; the client stops reading
        assert answer.status == 200
        first = answer.read(1000)
        new_data = pattern(MiB, 2)
        new = upload(publisher, "model", new_data)
        assert load(device, "model") == new_data
        assert cached(device) == {old, new}  # the old part is an orphan, but being read
        assert cache_status(device)["orphans_removed"] == 0
        assert first + answer.read() == old_data
    finally:
        reader.close()
    wait_for(lambda: cached(device) == {new}, 10, "the orphan to go once its load ended")
    assert cache_status(device)["orphans_removed"] == 1


# -- the index ---------------------------------------------------------------------------------


def two_of_three(
    make_device: Device, publisher: AgentProcess
) -> tuple[dict[str, bytes], dict[str, str], AgentProcess]:
    """Resources a, b and c of 1 MiB uploaded (their data, their big parts' names), and a
    device whose cache holds two of them."""
    data = {name: pattern(MiB, seed) for seed, name in enumerate("abc")}
    big = {name: upload(publisher, name, content) for name, content in data.items()}
    return data, big, make_device(LOADER_CACHE_MAX_BYTES=str(5 * MiB // 2))


def test_the_lru_order_and_the_resources_survive_a_restart(
    make_device: Device, publisher: AgentProcess
) -> None:
    data, big, device = two_of_three(make_device, publisher)
    load(device, "b")
    load(device, "a")
    load(device, "b")  # b most recent, a least
    device.stop()
    index = json.loads((cache_dir(device) / INDEX_NAME).read_bytes())
    assert sorted(entry[1] for entry in index["parts"]) == sorted([big["a"], big["b"]])
    # The files' times say the opposite of the index: the index must decide.
    age(device, big["b"], 2000)
    age(device, big["a"], 1000)
    device.start()
    assert load(device, "c") == data["c"]
    assert cached(device) == {big["b"], big["c"]}
    # Which part each resource uses survived too: a replaced b leaves an orphan.
    new_b = pattern(MiB, 9)
    upload(publisher, "b", new_b)
    assert load(device, "b") == new_b
    assert big["b"] not in cached(device)
    assert cache_status(device)["orphans_removed"] == 1


@pytest.mark.parametrize(
    "damage",
    [
        b"\x00garbage, not JSON",
        b'{"version": 1, "clock": 5, "parts": [["models", "../../etc", 1, false]], "refs": []}',
        b'{"version": 1, "clock": 1, "parts": [["models", "x", 2, false]], "refs": []}',
        b'{"version": 1, "clock": 1, "parts": {}, "refs": []}',
        b"[" * 100_000,
        b" " * (INDEX_MAX_BYTES + 1),
    ],
    ids=["garbage", "traversal", "clock", "shape", "deep", "huge"],
)
def test_an_unreadable_index_is_rebuilt_from_the_files(
    make_device: Device, publisher: AgentProcess, damage: bytes
) -> None:
    data, big, device = two_of_three(make_device, publisher)
    load(device, "a")
    load(device, "b")
    load(device, "a")  # by the index, b is least recently used
    device.stop()
    (cache_dir(device) / INDEX_NAME).write_bytes(damage)
    age(device, big["a"], 2000)  # by the files' times, a is
    age(device, big["b"], 1000)
    device.start()
    assert "model cache index unreadable" in device.log()
    assert cache_status(device)["parts"] == 2
    assert load(device, "c") == data["c"]
    assert cached(device) == {big["b"], big["c"]}  # the fallback order decided
    device.stop()
    index = json.loads((cache_dir(device) / INDEX_NAME).read_bytes())  # written anew
    assert sorted(entry[1] for entry in index["parts"]) == sorted([big["b"], big["c"]])


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=512),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=70),
            lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=30,
        ).map(lambda value: json.dumps({"version": 1, "clock": 9, "parts": value}).encode()),
    )
)
def test_no_index_content_stops_the_cache_from_opening(content: bytes) -> None:
    root = short_tmpdir()
    try:
        part = root / FOLDER / ("f" * 64)
        part.parent.mkdir()
        part.write_bytes(b"ciphertext")
        (root / INDEX_NAME).write_bytes(content)
        usage = BigPartCache(root, max_bytes=MiB).usage()
        assert (usage.parts, usage.used_bytes) == (1, len(b"ciphertext"))
        assert part.exists()
    finally:
        shutil.rmtree(root)


# -- the setting and /status -------------------------------------------------------------------


def test_without_the_setting_the_bound_is_a_quarter_of_the_file_system(
    make_device: Device,
) -> None:
    device = make_device()
    status = cache_status(device)
    assert status["max_bytes"] == default_max_bytes(cache_dir(device))
    fs = os.statvfs(cache_dir(device).parent)
    assert status["max_bytes"] == fs.f_blocks * fs.f_frsize // 4
    assert status["used_bytes"] == status["parts"] == 0


@pytest.mark.parametrize("value", ["0", "-5", "10G", "1.5"])
def test_a_bad_bound_is_a_config_error_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError, match="LOADER_CACHE_MAX_BYTES"):
        load_settings({"LOADER_CACHE_MAX_BYTES": value})
    assert load_settings({"LOADER_CACHE_MAX_BYTES": "1000"}).loader_cache_max_bytes == 1000
