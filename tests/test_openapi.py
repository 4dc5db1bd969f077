"""The OpenAPI document is generated from the route table: it names every route, and the live
answers conform to the models it is built from."""

from __future__ import annotations

from agent.schemas import HealthResponse, ReadyResponse, StatusResponse, UnlockStatus
from agent.server import ENDPOINTS
from tests.fixtures.agent import AgentProcess


def test_document_lists_every_route_and_only_those(shared_agent: AgentProcess) -> None:
    reply = shared_agent.request("GET", "/openapi.json")
    assert reply.status == 200
    doc = reply.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(e.method, e.path) for e in ENDPOINTS}
    endpoints = {(e.method, e.path): e for e in ENDPOINTS}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert {"400", "403", "500"} <= set(op["responses"]), (method, path)
            ok_status = endpoints[(method.upper(), path)].ok_status
            for status, response in op["responses"].items():
                if int(status) >= 400 and int(status) not in ok_status:
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse")
    # Every $ref resolves.
    schemas = doc["components"]["schemas"]
    text = reply.body.decode()
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in schemas, name


def test_live_answers_conform_to_the_models(shared_agent: AgentProcess) -> None:
    HealthResponse.model_validate(shared_agent.request("GET", "/health").json())
    StatusResponse.model_validate(shared_agent.request("GET", "/status").json())
    UnlockStatus.model_validate(shared_agent.request("GET", "/unlock/status").json())
    ready = shared_agent.request("GET", "/ready")
    assert ready.status == 503  # nothing unlocked on this agent
    assert ReadyResponse.model_validate(ready.json()).ready is False


def test_password_is_write_only_in_the_document(shared_agent: AgentProcess) -> None:
    doc = shared_agent.request("GET", "/openapi.json").json()
    password = doc["components"]["schemas"]["LoginRequest"]["properties"]["password"]
    assert password.get("writeOnly") is True
