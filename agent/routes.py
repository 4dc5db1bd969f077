"""The local API's route table, as types: what one route is (``Endpoint``), what the handlers
share (``Services``), and the rules that both the server enforces and the OpenAPI document
states (the loopback authority, the name rule, the errors every endpoint may answer).

``agent.server`` fills the table with its handlers; ``agent.openapi`` and ``agent.metrics``
read it. This module imports neither, so the three stay free of import circles.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import BaseModel

from agent.defaults import NAME_MAX_LENGTH
from agent.schemas import ErrorResponse

if TYPE_CHECKING:
    from agent.api_client import ResourceApiClient
    from agent.peers import AccessPolicy
    from agent.resources import ResourceStore
    from agent.settings import Settings
    from agent.unlock import UnlockManager

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What a local client puts in Host (and a page on this machine in Origin): localhost, 127.0.0.1
# or [::1], with an optional port. Nothing else over TCP: any other name may be an attacker's
# DNS name rebound to 127.0.0.1.
LOOPBACK_AUTHORITY = (
    r"(?:[Ll][Oo][Cc][Aa][Ll][Hh][Oo][Ss][Tt]|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?"
)
SAFE_NAME_RULE = (
    "must be a plain name: letters, digits, '.', '_', '-', '+', starting with a letter or digit, "
    f"at most {NAME_MAX_LENGTH} characters, no '..' or path separators"
)
# Every endpoint may also answer these: 400 (bad path), 403 (foreign Host/Origin), 500.
COMMON_ERRORS = (400, 403, 500)
ERROR_SCHEMA = ErrorResponse


@dataclass
class Services:
    """What the handlers use; built and closed by ``agent.service``."""

    settings: Settings
    api: ResourceApiClient
    resources: ResourceStore
    unlock: UnlockManager
    access: AccessPolicy


SERVICES = web.AppKey("services", Services)


@dataclass(frozen=True)
class Endpoint:
    """One route of the local API; the router and the OpenAPI document are both built from
    the table of these, so they cannot disagree."""

    method: str
    path: str
    handler: Handler
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    ok_status: tuple[int, ...] = (200,)
    errors: tuple[int, ...] = ()
    binary_response: bool = False
    # The media type of a text answer that is not JSON (as documented: no parameters).
    text_response: str | None = None
    multipart_request: bool = False
    # Query parameters it requires: (name, description, JSON schema).
    query: tuple[tuple[str, str, dict[str, object]], ...] = ()
    # Open to every local peer: read-only, reveals no secret and no protected data. Any other
    # endpoint needs an allowed peer (``PeerCheck``), so a new endpoint is closed by default.
    open_to_all: bool = False
