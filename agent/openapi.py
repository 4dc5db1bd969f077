"""The OpenAPI 3.1 document of the local API, generated from the route table and the models."""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel

from agent import __version__
from agent.defaults import NAME_MAX_LENGTH
from agent.routes import COMMON_ERRORS, ERROR_SCHEMA, LOOPBACK_AUTHORITY, SAFE_NAME_RULE, Endpoint
from agent.schemas import NAME_PATTERN

REF = "#/components/schemas/{model}"
PATH_PARAM = re.compile(r"{(\w+)}")
NAME_SCHEMA = {"type": "string", "pattern": f"^{NAME_PATTERN}$", "maxLength": NAME_MAX_LENGTH}
# The local-only guard, as parameters: any other Host or Origin gets 403.
GUARD_PARAMETERS = [
    {
        "name": "Host",
        "in": "header",
        "required": False,
        "description": (
            "localhost, 127.0.0.1 or [::1], with an optional port (over the Unix socket also "
            "'unix' or 'azaion-loader'); anything else is refused with 403 (DNS-rebinding guard)"
        ),
        "schema": {"type": "string", "pattern": f"^{LOOPBACK_AUTHORITY}$"},
    },
    {
        "name": "Origin",
        "in": "header",
        "required": False,
        "description": "only http(s) origins on this machine; others get 403 (CSRF guard)",
        "schema": {"type": "string", "pattern": f"^https?://{LOOPBACK_AUTHORITY}$"},
    },
]


def _schema_ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF)
    for name, definition in schema.pop("$defs", {}).items():
        schemas[name] = definition
    schemas[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(endpoint: Endpoint, schemas: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.handler.__name__,
        "responses": {},
    }
    op["parameters"] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": f"{name} {SAFE_NAME_RULE}",
            "schema": NAME_SCHEMA,
            "example": "model.bin",
        }
        for name in PATH_PARAM.findall(endpoint.path)
    ]
    op["parameters"] += [
        {
            "name": name,
            "in": "query",
            "required": True,
            "description": description,
            "schema": schema,
        }
        for name, description, schema in endpoint.query
    ]
    op["parameters"] += GUARD_PARAMETERS
    if endpoint.request is not None:
        op["requestBody"] = {
            # Required when the model has a required field; otherwise no body means {}.
            "required": any(f.is_required() for f in endpoint.request.model_fields.values()),
            "content": _json(_schema_ref(endpoint.request, schemas)),
        }
    elif endpoint.multipart_request:
        op["requestBody"] = {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["folder", "file"],
                        "additionalProperties": False,
                        "properties": {
                            "folder": {
                                **NAME_SCHEMA,
                                "description": (
                                    "send it before 'file' (or instead as the query parameter "
                                    "?folder=, for clients that cannot order form fields)"
                                ),
                            },
                            # OpenAPI 3.1 spelling of a file part (3.0 used format: binary)
                            "file": {
                                "type": "string",
                                "contentMediaType": "application/octet-stream",
                            },
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
        elif endpoint.text_response is not None:
            response["content"] = {endpoint.text_response: {"schema": {"type": "string"}}}
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
