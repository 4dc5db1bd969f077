"""The OpenAPI 3.1 document of the local API, generated from the route table and the models."""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from agent import __version__
from agent.server import SAFE_NAME, SAFE_NAME_RULE

if TYPE_CHECKING:
    from agent.server import Endpoint

REF = "#/components/schemas/{model}"
PATH_PARAM = re.compile(r"{(\w+)}")


def _schema_ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF)
    for name, definition in schema.pop("$defs", {}).items():
        schemas[name] = definition
    schemas[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(endpoint: Endpoint, schemas: dict[str, Any]) -> dict[str, Any]:
    from agent.server import COMMON_ERRORS, ERROR_SCHEMA

    op: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.handler.__name__,
        "responses": {},
    }
    params = PATH_PARAM.findall(endpoint.path)
    if params:
        op["parameters"] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": f"{name} {SAFE_NAME_RULE}",
                "schema": {"type": "string", "pattern": f"^{SAFE_NAME.pattern}$"},
            }
            for name in params
        ]
    if endpoint.request is not None:
        op["requestBody"] = {
            "required": False,
            "content": _json(_schema_ref(endpoint.request, schemas)),
        }
    elif endpoint.multipart_request:
        op["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "folder": {"type": "string", "description": "send before file"},
                            "file": {"type": "string", "format": "binary"},
                        },
                    }
                }
            },
        }
    for status in endpoint.ok_status:
        response: dict[str, Any] = {"description": HTTPStatus(status).phrase}
        if endpoint.binary_response:
            response["content"] = {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        elif endpoint.response is not None:
            response["content"] = _json(_schema_ref(endpoint.response, schemas))
        else:
            response["content"] = _json({"type": "object"})
        op["responses"][str(status)] = response
    error_ref = _schema_ref(ERROR_SCHEMA, schemas)
    for status in sorted({*COMMON_ERRORS, *endpoint.errors}):
        op["responses"][str(status)] = {
            "description": HTTPStatus(status).phrase,
            "content": _json(error_ref),
        }
    return op


def build_document(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "azaion-loader local API",
            "version": __version__,
            "description": (
                "For programs on this device only: over the Unix socket or loopback. "
                "Errors are JSON {error, message}."
            ),
        },
        "servers": [{"url": "http://localhost:8765"}],
        "paths": paths,
        "components": {"schemas": schemas},
    }
