"""``GET /metrics`` on the real agent, with a real dev-api behind it.

Every scrape is parsed with prometheus_client's own parser (the check of the format), and the
numbers are compared before and after real requests: uploads and loads through the agent, a
cache emptied on disk, faults armed on the dev-api, an unlock whose Docker engine is not there.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__, stream
from agent.archive import ArchiveManifest, ImageEntry, payload_head
from tests.fixtures.agent import AgentProcess, login, wait_for
from tests.fixtures.devapi import DevApi
from tests.fixtures.users import AccessUsers, curl_as

MakeAgent = Callable[..., AgentProcess]
Labels = frozenset[tuple[str, str]]


class Scrape:
    """One parsed answer of ``GET /metrics``: samples by name and labels."""

    def __init__(self, agent: AgentProcess) -> None:
        reply = agent.request("GET", "/metrics")
        assert reply.status == 200, reply.body
        assert reply.headers["Content-Type"] == CONTENT_TYPE_LATEST
        self.samples: dict[str, dict[Labels, float]] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(reply.body.decode("utf-8")):
            self.types[family.name] = family.type
            for sample in family.samples:
                labels = frozenset(sample.labels.items())
                self.samples.setdefault(sample.name, {})[labels] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get(name, {}).get(frozenset(labels.items()), 0.0)

    def label_sets(self, name: str) -> set[Labels]:
        return set(self.samples.get(name, {}))


def _upload(agent: AgentProcess, directory: Path, name: str, data: bytes) -> None:
    source = directory / name
    source.write_bytes(data)
    result = agent.cli("upload", str(source), "--folder", "models")
    assert result.returncode == 0, result.stderr


def _empty_cache(agent: AgentProcess) -> None:
    cache = Path(agent.env["MODEL_CACHE_DIR"])
    assert any(path.is_file() for path in cache.rglob("*")), "nothing was cached"
    shutil.rmtree(cache)


def test_scrape_is_prometheus_text_with_build_info(shared_agent: AgentProcess) -> None:
    scrape = Scrape(shared_agent)
    assert scrape.types["azaion_loader_build_info"] == "gauge"  # an Info, in the text format
    assert scrape.samples["azaion_loader_build_info"] == {
        frozenset({("version", __version__), ("python", platform.python_version())}): 1.0
    }
    assert all(name.startswith("azaion_loader_") for name in scrape.samples)
    assert scrape.types["azaion_loader_http_requests"] == "counter"
    assert scrape.types["azaion_loader_http_request_duration_seconds"] == "histogram"
    states = scrape.samples["azaion_loader_unlock_state"]
    assert {dict(labels)["state"] for labels, value in states.items() if value == 1} == {"idle"}
    assert len(states) == 9  # every state, so a query for one never finds nothing
    for kind in ("resource", "images"):
        assert frozenset({("kind", kind)}) in scrape.samples["azaion_loader_decrypted_bytes_total"]


def test_every_local_peer_may_scrape(make_agent: MakeAgent, access_users: AccessUsers) -> None:
    """Read-only and without secrets: open like /health, to a user outside the allowed group,
    over the socket and TCP; the same user's /load is refused (and counted as a 403)."""
    agent = make_agent(LOADER_ALLOWED_GROUPS=access_users.group)
    for directory in (agent.root, agent.socket_path.parent):
        os.chmod(directory, 0o755)
    os.chmod(agent.socket_path, 0o666)  # so that the peer check alone decides
    outsider = access_users.outsider
    listeners = ((f"http://127.0.0.1:{agent.port}", None), ("http://localhost", agent.socket_path))
    for url, socket in listeners:
        unix_socket = None if socket is None else str(socket)
        reply = curl_as(outsider, "GET", f"{url}/metrics", unix_socket=unix_socket)
        assert reply.status == 200, reply
        names = {family.name for family in text_string_to_metric_families(reply.body)}
        assert "azaion_loader_build_info" in names
        load = curl_as(outsider, "POST", f"{url}/load/m.bin", unix_socket=unix_socket, body="{}")
        assert load.status == 403, load
    refused = {"route": "/load/{filename}", "method": "POST", "status": "403"}
    assert Scrape(agent).value("azaion_loader_http_requests_total", **refused) == 2


def test_requests_are_counted_by_route_template_and_status(shared_agent: AgentProcess) -> None:
    before = Scrape(shared_agent)
    name = f"model-{secrets.token_hex(4)}.bin"
    for _ in range(2):
        assert shared_agent.request("GET", "/health").status == 200
    assert shared_agent.request("POST", f"/load/{name}", {"folder": "models"}).status == 401
    assert shared_agent.request("GET", f"/nothing-{secrets.token_hex(4)}").status == 404
    after = Scrape(shared_agent)

    requests = "azaion_loader_http_requests_total"

    def delta(**labels: str) -> float:
        return after.value(requests, **labels) - before.value(requests, **labels)

    assert delta(route="/health", method="GET", status="200") == 2
    assert delta(route="/load/{filename}", method="POST", status="401") == 1
    assert delta(route="unmatched", method="GET", status="404") == 1
    latency = "azaion_loader_http_request_duration_seconds_count"
    health = {"route": "/health", "method": "GET"}
    assert after.value(latency, **health) - before.value(latency, **health) == 2
    # The load was refused before anything happened, and counted so.
    outcomes = "azaion_loader_resource_operations_total"
    refused = {"operation": "load", "outcome": "not_authenticated"}
    assert after.value(outcomes, **refused) - before.value(outcomes, **refused) == 1
    assert name not in str(after.samples)


def test_random_paths_and_methods_add_no_label_values(shared_agent: AgentProcess) -> None:
    def hit_random() -> None:
        token = secrets.token_hex(6)
        assert shared_agent.request("GET", f"/{token}").status == 404
        assert shared_agent.request("GET", f"/load/{token}").status == 405
        # Methods beyond HTTP's own that the parser takes (it refuses made-up ones with 400).
        for method in ("PROPFIND", "MKCOL", "PURGE"):
            assert shared_agent.request(method, f"/x/{token}").status == 404

    hit_random()  # the first ones may add their 'unmatched' series
    before = Scrape(shared_agent)
    for _ in range(20):
        hit_random()
    after = Scrape(shared_agent)
    requests = "azaion_loader_http_requests_total"
    for name in (requests, "azaion_loader_http_request_duration_seconds_count"):
        assert after.label_sets(name) == before.label_sets(name), name
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert after.value(requests, **unmatched) - before.value(requests, **unmatched) == 20
    methods = {dict(labels)["method"] for labels in after.label_sets(requests)}
    assert "other" in methods
    assert methods <= {"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "other"}
    assert not any(word in str(after.samples) for word in ("PROPFIND", "MKCOL", "PURGE", "/x/"))


def test_upload_load_bytes_and_cache(
    make_agent: MakeAgent, dev_api: DevApi, agent_root: Path
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    data = os.urandom(1024 * 1024 + 5)
    start = Scrape(agent)
    _upload(agent, agent_root, "model.bin", data)
    uploaded = Scrape(agent)
    outcomes = "azaion_loader_resource_operations_total"
    assert uploaded.value(outcomes, operation="upload", outcome="ok") == 1
    assert start.value(outcomes, operation="upload", outcome="ok") == 0

    def load() -> Scrape:
        reply = agent.request("POST", "/load/model.bin", {"folder": "models"})
        assert reply.status == 200, reply.body
        assert reply.body == data
        return Scrape(agent)

    decrypted = "azaion_loader_decrypted_bytes_total"
    lookups = "azaion_loader_cache_lookups_total"
    # The upload left its big part in the cache: the first load is a hit.
    first = load()
    assert first.value(outcomes, operation="load", outcome="ok") == 1
    assert first.value(decrypted, kind="resource") == len(data)
    assert first.value(decrypted, kind="images") == 0
    assert (first.value(lookups, result="hit"), first.value(lookups, result="miss")) == (1, 0)
    # An empty cache: a miss, the CDN again; then a hit.
    _empty_cache(agent)
    second = load()
    assert (second.value(lookups, result="hit"), second.value(lookups, result="miss")) == (1, 1)
    third = load()
    assert (third.value(lookups, result="hit"), third.value(lookups, result="miss")) == (2, 1)
    assert third.value(outcomes, operation="load", outcome="ok") == 3
    assert third.value(decrypted, kind="resource") == 3 * len(data)
    ok = {"route": "/load/{filename}", "method": "POST", "status": "200"}
    assert third.value("azaion_loader_http_requests_total", **ok) == 3


def test_refused_and_failed_operations_count_by_error_code(
    make_agent: MakeAgent, dev_api: DevApi
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    assert agent.request("POST", "/load/absent.bin", {"folder": "models"}).status == 404
    assert agent.request("POST", "/load/-bad", {"folder": "models"}).status == 400
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\nabc\r\n--b--\r\n'
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    assert agent.request("POST", "/upload/m.bin", body, headers=headers).status == 400
    scrape = Scrape(agent)
    outcomes = "azaion_loader_resource_operations_total"
    assert scrape.value(outcomes, operation="load", outcome="not_found") == 1
    assert scrape.value(outcomes, operation="load", outcome="invalid_name") == 1
    assert scrape.value(outcomes, operation="upload", outcome="bad_request") == 1
    assert scrape.value(outcomes, operation="load", outcome="ok") == 0
    assert scrape.value(outcomes, operation="upload", outcome="ok") == 0
    assert scrape.value("azaion_loader_decrypted_bytes_total", kind="resource") == 0
    not_found = {"route": "/load/{filename}", "method": "POST", "status": "404"}
    assert scrape.value("azaion_loader_http_requests_total", **not_found) == 1


def test_retries_are_counted_by_upstream_and_cause(
    make_agent: MakeAgent, dev_api: DevApi, agent_root: Path
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    data = os.urandom(10_000)
    _upload(agent, agent_root, "model.bin", data)
    retries = "azaion_loader_retries_total"
    assert Scrape(agent).label_sets(retries) == set()

    small_part = {"path": "/resources/models/model.bin", "method": "GET", "count": 1}
    dev_api.faults(status=503, **small_part)
    assert agent.request("POST", "/load/model.bin", {"folder": "models"}).body == data
    dev_api.faults(status=429, retry_after=0, **small_part)
    assert agent.request("POST", "/load/model.bin", {"folder": "models"}).body == data
    scrape = Scrape(agent)
    assert scrape.samples[retries] == {
        frozenset({("operation", "resource_api"), ("cause", "unavailable")}): 1,
        frozenset({("operation", "resource_api"), ("cause", "throttled")}): 1,
    }


def test_unlock_state_stages_images_bytes_and_docker_retries(
    make_agent: MakeAgent, dev_api: DevApi, agent_root: Path
) -> None:
    """An archive that decrypts, and no Docker engine: the unlock waits for the engine."""
    image = ImageEntry(ref="app:1", id="sha256:" + "ab" * 32, repository="app", api_tag=True)
    head = payload_head(ArchiveManifest(images=(image,)))
    payload = head + os.urandom(200_000)
    agent = make_agent(
        RESOURCE_API_URL=dev_api.url,
        DOCKER_HOST=f"unix://{agent_root}/no-docker.sock",
    )
    archive = Path(agent.env["IMAGES_PATH"])
    archive.write_bytes(b"".join(stream.encrypt_iter([payload], [dev_api.key_fragment])))
    idle = Scrape(agent)
    assert idle.value("azaion_loader_unlock_state", state="idle") == 1
    assert idle.label_sets("azaion_loader_unlock_stage_duration_seconds") == set()

    started = agent.request(
        "POST", "/unlock", {"email": dev_api.email, "password": dev_api.password}
    )
    assert started.status == 202, started.body
    docker_retries = {"operation": "unlock", "cause": "docker_unavailable"}

    def waited_for_docker() -> Scrape | None:
        scrape = Scrape(agent)
        return scrape if scrape.value("azaion_loader_retries_total", **docker_retries) else None

    scrape = wait_for(waited_for_docker, 30, "a retry for want of the Docker engine")
    states = scrape.samples["azaion_loader_unlock_state"]
    current = {dict(labels)["state"] for labels, value in states.items() if value == 1}
    assert current <= {"waiting", "loading"} and len(current) == 1, states
    stages = {
        dict(labels)["stage"]: seconds
        for labels, seconds in scrape.samples["azaion_loader_unlock_stage_duration_seconds"].items()
    }
    assert set(stages) == {"checking", "authenticating", "downloading_key"}  # loading goes on
    assert all(seconds >= 0 for seconds in stages.values())
    # The manifest was decrypted (and checked) before the engine was asked for.
    images = scrape.value("azaion_loader_decrypted_bytes_total", kind="images")
    assert len(head) <= images
    assert scrape.value("azaion_loader_decrypted_bytes_total", kind="resource") == 0
