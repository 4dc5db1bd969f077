"""The agent's exceptions, one tree for the whole package.

    LoaderError                     base; its message is safe to show (never a secret)
    +-- ConfigError                 a setting is invalid (CLI exit 2)
    +-- RequestError                a local caller sent something we refuse
    |   +-- InvalidName             unsafe filename/folder (traversal, control chars)
    |   +-- ForbiddenRequest        foreign Host / Origin (DNS rebinding, CSRF guard)
    |   +-- PayloadTooLarge         body over the configured limit
    |   +-- RequestTimeout          the request body stalled (LOADER_BODY_TIMEOUT)
    +-- NotFoundError               no such resource / archive / endpoint
    +-- ConflictError               the operation clashes with the current state
    +-- NotImplementedYet           routed, not built yet
    +-- AuthError                   credentials missing or refused
    |   +-- NotAuthenticated        no credentials configured
    |   +-- BadCredentials          the Resource API refused them (401)
    +-- UpstreamError               the Resource API or the CDN misbehaved (502)
    |   +-- UpstreamUnavailable     unreachable, 5xx or 429 after retries (503)
    |   +-- UpstreamTimeout         timed out (504)
    |   +-- UpstreamForbidden       403 from upstream
    |   +-- UpstreamNotFound        404 from upstream
    +-- StreamError                 the encrypted stream format (agent.stream)
    |   +-- WrongKeyError           key fragment(s) do not open this stream
    |   +-- TamperedError           a chunk or the header failed authentication
    |   +-- TruncatedError          the stream ended before its final chunk
    |   +-- TrailingDataError       bytes after the final chunk
    |   +-- UnsupportedFormatError  not this format, or a version we do not know
    +-- DockerError                 the Docker engine failed or is not reachable
    |   +-- DockerUnavailable       engine not up (transient)
    +-- UnlockError                 the unlock workflow failed
    +-- StorageError                local disk full or not writable (cache, state)

Foreign exceptions are translated at each boundary (``raise X(...) from exc``); the mapping of
these classes to HTTP statuses lives in exactly one place: ``agent.server.ERROR_STATUS``.
"""

from __future__ import annotations


class LoaderError(Exception):
    """Base of every error the agent raises on purpose.

    ``str(exc)`` is a human sentence that is safe for logs and clients: never put a password,
    token, key fragment or data key into it.
    """

    # The HTTP status an upstream answered with, when the error is that answer (api_client).
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


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamForbidden(UpstreamError):
    pass


class UpstreamNotFound(UpstreamError):
    pass


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


class DockerError(LoaderError):
    pass


class DockerUnavailable(DockerError):
    pass


class UnlockError(LoaderError):
    pass


class StorageError(LoaderError):
    pass
