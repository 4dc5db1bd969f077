"""Schemathesis against the live agent over loopback TCP, with a real dev-api behind it.

Every operation of ``GET /openapi.json``, every check (no 5xx, response schema, documented
status codes and content types, negative data rejected, positive data accepted, undeclared
methods answered 405, ...), in every phase that applies (the document's examples, the coverage
phase's boundary and negative values, then random fuzzing). The agent is logged in and holds a
resource named by the document's examples, so ``/load`` and ``/upload`` do real work.

Three things JSON Schema cannot express are given to schemathesis as hooks, not exclusions: the
upload's ``folder`` field goes before ``file`` (the agent streams the file, so it must know the
folder first); ``/load``'s optional body ``filename`` must equal the path's; and a generated
``/login`` or ``/unlock`` with random credentials replaces the agent's own, so the hook logs in
again before each ``/load`` and ``/upload``. One check is off for one operation, and only that:
``negative_data_rejection`` on ``/upload`` (see ``CONFIG``: a multipart part is bytes on the wire,
so no server can tell a "negative" file or folder from a valid one).

A fixed seed keeps CI reproducible; ``LOADER_FUZZ_SEED`` and ``LOADER_FUZZ_EXAMPLES`` explore
further (e.g. ``LOADER_FUZZ_SEED=$RANDOM LOADER_FUZZ_EXAMPLES=500``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.server import ENDPOINTS
from tests.fixtures.agent import AgentProcess
from tests.fixtures.devapi import DevApi

try:
    import schemathesis  # noqa: F401 (the CLI runs in a child; this checks it is installed)
except ImportError:  # pragma: no cover
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip("needs schemathesis (the test extra)", allow_module_level=True)

MakeAgent = Callable[..., AgentProcess]
SEED = int(os.environ.get("LOADER_FUZZ_SEED", "20261126"))
MAX_EXAMPLES = int(os.environ.get("LOADER_FUZZ_EXAMPLES", "150"))
RUN_TIMEOUT = 600

# One check cannot apply to one operation: on the wire a multipart part is bytes, so a negative
# "file" (null, an object) arrives as a valid file and a negative "folder" (true, 39167) as a
# valid name. Everything else, 5xx and schema conformance included, still runs on /upload.
CONFIG = """
[checks]
enabled = true  # every check (the same as --checks all, which would override the line below)

[[operations]]
include-path = "/upload/{filename}"
include-method = "POST"
checks.negative_data_rejection.enabled = false

# /ready answers 503 by design while the images are locked (documented in the schema).
[[operations]]
include-path = "/ready"
include-method = "GET"
checks.not_a_server_error.enabled = false
"""

# Runs the schemathesis CLI with the hooks (see the module docstring).
RUNNER = """
import json, os, sys, urllib.request
from urllib.parse import unquote

import schemathesis
from schemathesis.transport.requests import REQUESTS_TRANSPORT, multipart_serializer

LOGIN = urllib.request.Request(
    os.environ["FUZZ_AGENT_URL"] + "/login",
    data=json.dumps(
        {"email": os.environ["FUZZ_EMAIL"], "password": os.environ["FUZZ_PASSWORD"]}
    ).encode(),
    headers={"Content-Type": "application/json"},
)


@REQUESTS_TRANSPORT.serializer("multipart/form-data")
def folder_first(ctx, value):
    if isinstance(value, dict) and "folder" in value:
        value = {"folder": value["folder"], **{k: v for k, v in value.items() if k != "folder"}}
    return multipart_serializer(ctx, value)


@schemathesis.hook
def map_case(context, case):
    body, params = case.body, case.path_parameters or {}
    if case.operation.path == "/load/{filename}" and isinstance(body, dict):
        if isinstance(body.get("filename"), str) and isinstance(params.get("filename"), str):
            body["filename"] = unquote(params["filename"])  # path parameters come encoded
    return case


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.path in ("/load/{filename}", "/upload/{filename}"):
        with urllib.request.urlopen(LOGIN, timeout=30) as answer:
            answer.read()


from schemathesis.cli import schemathesis as cli

sys.exit(cli())
"""


def test_schemathesis_finds_no_failure(
    make_agent: MakeAgent, dev_api: DevApi, tmp_path: Path
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url, LOADER_LOG_LEVEL="INFO")
    login = agent.request("POST", "/login", {"email": dev_api.email, "password": dev_api.password})
    assert login.status == 200, login.body
    example = tmp_path / "model.bin"  # the name and folder the document's examples use
    example.write_bytes(os.urandom(100_000))
    assert agent.cli("upload", str(example), "--folder", "models").returncode == 0

    (tmp_path / "schemathesis.toml").write_text(CONFIG)  # read from the working directory
    url = f"http://127.0.0.1:{agent.port}"
    env = {
        **os.environ,
        "FUZZ_AGENT_URL": url,
        "FUZZ_EMAIL": dev_api.email,
        "FUZZ_PASSWORD": dev_api.password,
        "NO_COLOR": "1",
    }
    env.pop("SCHEMATHESIS_HOOKS", None)
    command = [
        sys.executable, "-c", RUNNER, "run", f"{url}/openapi.json",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",  # a generated /unlock must not swap credentials under a /load
        "--request-timeout", "60",
        "--suppress-health-check", "too_slow",
        "--report", "junit",
        "--report-dir", str(tmp_path / "report"),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"schemathesis found failures (seed {SEED}):\n{output[-20000:]}"
    document = agent.request("GET", "/openapi.json").json()
    operations = sum(len(methods) for methods in document["paths"].values())
    assert operations == len(ENDPOINTS)
    assert f"Selected: {operations}/{operations}" in output  # every operation was selected
    assert f"Tested: {operations}" in output  # ... and tested

    # /load and /upload did real work: generated uploads stored resources, and the examples'
    # load of models/model.bin fetched its small part (and decrypted it).
    assert dev_api.count("PUT", "/resources/") > 1
    assert dev_api.count("GET", "/resources/models/model.bin") >= 1
    log = agent.log()
    assert "unexpected error" not in log, log[-5000:]
    assert agent.request("GET", "/health").status == 200
