"""The agent's exceptions, one tree for the whole package, and what each one means.

    LoaderError                     base; its message is safe to show (never a secret)
    +-- ConfigError                 a setting is invalid (CLI exit 2)
    +-- RequestError                a local caller sent something we refuse
    |   +-- InvalidName             unsafe filename/folder (traversal, control chars)
    |   +-- ForbiddenRequest        foreign Host / Origin (DNS rebinding, CSRF guard)
    |   +-- PayloadTooLarge         body over the configured limit
    |   +-- RequestTimeout          the request body stalled (LOADER_BODY_TIMEOUT)
    |   +-- UnsupportedMediaType    a body in a form this API does not take
    +-- NotFoundError               no such resource / archive / endpoint
    +-- ConflictError               the operation clashes with the current state
    +-- NotImplementedYet           routed, not built yet
    +-- AuthError                   credentials missing or refused
    |   +-- NotAuthenticated        no credentials configured
    |   +-- BadCredentials          the Resource API refused them (401)
    +-- UpstreamError               the Resource API or the CDN misbehaved (502)
    |   +-- UpstreamUnavailable     unreachable, 5xx or 429 after retries (503)
    |   |   +-- UpstreamThrottled   429/5xx with Retry-After: wait at least that long
    |   |   +-- BodyInterrupted     a big part's body broke off: resume with a range
    |   +-- UpstreamTimeout         timed out (504)
    |   +-- UpstreamForbidden       403 from upstream
    |   +-- UpstreamNotFound        404 from upstream
    |   +-- RangeNotSatisfiable     416: the CDN cannot resume at that offset
    |   +-- TransferTooSlow         under LOADER_UPSTREAM_MIN_RATE or past its deadline: final
    +-- StreamError                 the encrypted stream format (agent.stream)
    |   +-- WrongKeyError           key fragment(s) do not open this stream
    |   +-- TamperedError           a chunk or the header failed authentication
    |   +-- TruncatedError          the stream ended before its final chunk
    |   +-- TrailingDataError       bytes after the final chunk
    |   +-- UnsupportedFormatError  not this format, or a version we do not know
    +-- SignatureError              a publisher signature is missing, untrusted or wrong
    |   +-- RollbackRefused         a signed release older than the installed one
    +-- DockerError                 the Docker engine failed or is not reachable
    |   +-- DockerUnavailable       engine not up (transient)
    +-- UnlockError                 the unlock workflow failed
    |   +-- UnlockCancelled         stopped (the agent is shutting down)
    +-- StorageError                local disk full or not writable (cache, state, archive)
    |   +-- CacheError              the model cache cannot be written
    +-- AgentError                  the running agent answered the CLI with an error

Foreign exceptions are translated at each boundary (``raise X(...) from exc``). What each class
means is written once, in ``MEANINGS`` below: the HTTP status and short code a local caller gets
(applied in one place, the server's error middleware) and, for the unlock's ``error`` text, the
kind of failure (``describe``). A subclass without a row of its own means what its parent does;
``tests/test_errors.py`` checks that every error class of the package lives here and has a row.
"""

from __future__ import annotations

from dataclasses import dataclass


class LoaderError(Exception):
    """Base of every error the agent raises on purpose.

    ``str(exc)`` is a human sentence that is safe for logs and clients: never put a password,
    token, key fragment or data key into it.
    """

    # The HTTP status an upstream answered with, when the error is that answer (agent.transport).
    upstream_status: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(LoaderError):
    pass


class RequestError(LoaderError):
    pass


class InvalidName(RequestError):
    pass


class ForbiddenRequest(RequestError):
    pass


class PayloadTooLarge(RequestError):
    pass


class RequestTimeout(RequestError):
    pass


class UnsupportedMediaType(RequestError):
    """A body in a form this API does not take (not JSON, not multipart, or compressed).

    Refusing the three content types a web page may send cross-origin without a CORS preflight
    (text/plain, form-urlencoded, multipart to a JSON endpoint) also stops CSRF from browsers
    too old to send ``Origin``.
    """


class NotFoundError(LoaderError):
    pass


class ConflictError(LoaderError):
    pass


class NotImplementedYet(LoaderError):
    pass


class AuthError(LoaderError):
    pass


class NotAuthenticated(AuthError):
    pass


class BadCredentials(AuthError):
    pass


class UpstreamError(LoaderError):
    pass


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamThrottled(UpstreamUnavailable):
    """429 (or a 5xx) that came with ``Retry-After``: ``agent.retry`` waits at least that long."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BodyInterrupted(UpstreamUnavailable):
    """A big part's body broke off after the CDN had started sending it: resume with a range."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamForbidden(UpstreamError):
    pass


class UpstreamNotFound(UpstreamError):
    pass


class RangeNotSatisfiable(UpstreamError):
    """416: the CDN's part is not longer than the offset asked for."""


class TransferTooSlow(UpstreamError):
    """A big part's transfer went below the minimum rate or past its deadline (504). Not a
    transient fault: no retry or resumption may undo it, so it is not an ``UpstreamTimeout``."""


class StreamError(LoaderError):
    pass


class WrongKeyError(StreamError):
    pass


class TamperedError(StreamError):
    pass


class TruncatedError(StreamError):
    pass


class TrailingDataError(StreamError):
    pass


class UnsupportedFormatError(StreamError):
    pass


class SignatureError(LoaderError):
    """A publisher signature is missing (while required), by an untrusted key, or does not
    verify (agent.signing)."""


class RollbackRefused(SignatureError):
    """A signed release number lower than the installed one, and no LOADER_ALLOW_DOWNGRADE."""


class DockerError(LoaderError):
    pass


class DockerUnavailable(DockerError):
    pass


class UnlockError(LoaderError):
    pass


class UnlockCancelled(UnlockError):
    """The workflow was stopped (agent shutting down) while the worker thread was busy."""


class StorageError(LoaderError):
    pass


class CacheError(StorageError):
    """The cache directory cannot be written: disk full, permissions, a read-only file system."""


class AgentError(LoaderError):
    """The running agent answered the CLI with an error; ``code`` is its short error code."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


# ---------------------------------------------------------------------------------------------
# What each error means


@dataclass(frozen=True)
class Meaning:
    """``status`` and ``code``: what a local caller gets over HTTP. ``kind``: what sort of
    failure it is, put before the message in the unlock's ``error`` (``describe``); ``{subject}``
    in it names what was being read."""

    status: int
    code: str
    kind: str | None = None


MEANINGS: dict[type[LoaderError], Meaning] = {
    LoaderError: Meaning(500, "internal_error"),
    ConfigError: Meaning(500, "config_error"),
    RequestError: Meaning(400, "bad_request"),
    InvalidName: Meaning(400, "invalid_name"),
    ForbiddenRequest: Meaning(403, "forbidden"),
    PayloadTooLarge: Meaning(413, "payload_too_large"),
    RequestTimeout: Meaning(408, "request_timeout"),
    UnsupportedMediaType: Meaning(415, "unsupported_media_type"),
    NotFoundError: Meaning(404, "not_found"),
    ConflictError: Meaning(409, "conflict"),
    NotImplementedYet: Meaning(501, "not_implemented"),
    AuthError: Meaning(401, "unauthorized", "not authenticated"),
    NotAuthenticated: Meaning(401, "not_authenticated", "no credentials"),
    BadCredentials: Meaning(401, "bad_credentials", "bad credentials"),
    UpstreamError: Meaning(502, "upstream_error", "the Resource API failed"),
    UpstreamUnavailable: Meaning(503, "upstream_unavailable", "the Resource API failed"),
    UpstreamThrottled: Meaning(503, "upstream_unavailable", "the Resource API failed"),
    BodyInterrupted: Meaning(503, "upstream_unavailable", "the Resource API failed"),
    UpstreamTimeout: Meaning(504, "upstream_timeout", "the Resource API failed"),
    UpstreamForbidden: Meaning(403, "upstream_forbidden", "the Resource API failed"),
    UpstreamNotFound: Meaning(404, "not_found", "the Resource API failed"),
    RangeNotSatisfiable: Meaning(502, "upstream_error", "the Resource API failed"),
    TransferTooSlow: Meaning(504, "upstream_timeout", "the Resource API failed"),
    StreamError: Meaning(502, "integrity_error", "{subject} is not readable"),
    WrongKeyError: Meaning(502, "wrong_key", "wrong key fragment"),
    TamperedError: Meaning(502, "tampered", "{subject} is tampered or corrupt"),
    TruncatedError: Meaning(502, "truncated", "{subject} is truncated"),
    TrailingDataError: Meaning(502, "trailing_data", "{subject} has extra data at its end"),
    UnsupportedFormatError: Meaning(502, "unsupported_format", "{subject} is not readable"),
    SignatureError: Meaning(502, "bad_signature", "{subject} failed its signature check"),
    RollbackRefused: Meaning(409, "rollback_refused", "{subject} is an older release"),
    DockerError: Meaning(502, "docker_error", "Docker load error"),
    DockerUnavailable: Meaning(503, "docker_unavailable", "Docker load error"),
    UnlockError: Meaning(500, "unlock_failed"),
    UnlockCancelled: Meaning(500, "unlock_failed"),
    StorageError: Meaning(507, "insufficient_storage"),
    CacheError: Meaning(507, "insufficient_storage"),
    AgentError: Meaning(502, "agent_error"),
}


def meaning_of(exc: LoaderError) -> Meaning:
    """The row of the nearest class along the exception's MRO."""
    for cls in type(exc).__mro__:
        if cls in MEANINGS:
            return MEANINGS[cls]
    return MEANINGS[LoaderError]


def status_for(exc: LoaderError) -> tuple[int, str]:
    """The HTTP status and short code a local caller gets for ``exc``."""
    meaning = meaning_of(exc)
    return meaning.status, meaning.code


def describe(exc: BaseException, subject: str = "the data") -> str:
    """A failure for a status line: its kind, then its message (never a secret). Anything that
    is not ours is named by its type only (its text may hold anything)."""
    if not isinstance(exc, LoaderError):
        return f"unexpected error: {type(exc).__name__}"
    kind = meaning_of(exc).kind
    return f"{kind.format(subject=subject)}: {exc}" if kind else str(exc)
