"""Local connections: how many each listener holds, how long an idle one lives, half-closes.

Each listener (the Unix socket, the loopback port, or each of systemd's sockets) has its own
budget of ``LOADER_MAX_CONNECTIONS`` open connections, so a flood on one of them (any local user
can open TCP connections) never takes what another needs: the Unix socket answers ``/health``
while the port is flooded. ``BoundedSite`` accepts connections itself: within the budget it hands
them to aiohttp; past it, it writes a fixed 503 and closes the connection at once, logging that at
most once per ``LOG_INTERVAL``. With every budget full the agent holds at most
``listeners * LOADER_MAX_CONNECTIONS + RESERVED_DESCRIPTORS`` descriptors, which
``ensure_descriptor_limit`` checks against ``RLIMIT_NOFILE`` at start, so connections alone
never make ``accept()`` fail with EMFILE. Should it fail anyway, the listener pauses for a
second with one log line (asyncio's own accept loop retries at once and logs a traceback for
each failure, which is what filled the journal and took a core under a flood).

A connection that has not sent a complete request head within ``LOADER_IDLE_TIMEOUT`` of its
opening or of its last response is closed: that is aiohttp's keep-alive timer, which starts in
``connection_made`` and closes a connection waiting for a (partial) head.

A caller that half-closes its side (``shutdown(SHUT_WR)``) after complete requests still gets
the answers (aiohttp alone closes on EOF): ``AgentRequestHandler`` keeps the transport open for
writing, answers what was asked, then closes. An EOF with nothing complete to answer (no
request, part of a head, or a body cut short) closes at once, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from loguru import logger

from agent.errors import ConfigError
from agent.listeners import Listener

# Descriptors the agent needs beside its connections: stdio, listeners, epoll, cache and key
# files, upstream (Resource API, CDN) and Docker connections.
RESERVED_DESCRIPTORS = 128
ACCEPT_BATCH = 128  # connections taken per wake-up of a listener: a bounded turn of the loop
ACCEPT_RETRY_DELAY = 1.0  # pause after accept() failed for want of resources
LOG_INTERVAL = 10.0  # a listener's refusal and accept-failure lines: one of each per interval

_BUSY_BODY = (
    b'{"error":"too_many_connections","message":"the agent has as many connections open on this'
    b' listener as it allows (LOADER_MAX_CONNECTIONS); try again later"}'
)
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
    b"Cache-Control: no-store\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n\r\n" + _BUSY_BODY
)


class Throttle:
    """Lets one event through per ``interval`` seconds and counts those it held back.

    Calling it returns ``None`` for an event to hold back, else how many were held back since
    the last one let through.
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self._held_back = 0

    def __call__(self) -> int | None:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            self._held_back += 1
            return None
        self._last = now
        held_back, self._held_back = self._held_back, 0
        return held_back


def descriptors_needed(listeners: int, max_connections: int) -> int:
    return listeners * max_connections + RESERVED_DESCRIPTORS


def ensure_descriptor_limit(listeners: int, max_connections: int) -> None:
    """Make RLIMIT_NOFILE's soft limit hold every connection the budgets allow.

    Raises the soft limit up to the hard one when needed. ``ConfigError`` when even that is not
    enough, or when the agent may not raise it (the unit's ``SystemCallFilter=~@resources``).
    """
    needed = descriptors_needed(listeners, max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    raised = needed if hard == resource.RLIM_INFINITY else hard
    limit = soft
    if raised >= needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        except (OSError, ValueError):
            pass  # not allowed to raise it: the soft limit is the limit
        else:
            return
    else:
        limit = hard
    raise ConfigError(
        f"invalid setting LOADER_MAX_CONNECTIONS: {max_connections} connections on each of "
        f"{listeners} listeners need {needed} file descriptors with the agent's own, more than "
        f"the {limit} it may open (lower it, or raise LimitNOFILE= in the unit)"
    )


class AgentRequestHandler(web.RequestHandler):
    """aiohttp's HTTP protocol, plus: frees its listener's slot when closed, and answers a
    caller that half-closed after complete requests."""

    __slots__ = ("_caller_eof", "_half_closed", "_on_close")

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[], None],
        **options: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **options)
        self._on_close: Callable[[], None] | None = on_close
        self._half_closed = False
        self._caller_eof: asyncio.Future[None] = loop.create_future()

    @property
    def caller_eof(self) -> asyncio.Future[None]:
        """Done once the caller has closed its side (half-closed or gone: TCP cannot tell)."""
        return self._caller_eof

    def _mark_eof(self) -> None:
        if not self._caller_eof.done():
            self._caller_eof.set_result(None)

    def release(self) -> None:
        """Give the slot back (once, however often called)."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._mark_eof()
        super().connection_lost(exc)
        self.release()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio.Protocol: bool | None
        """Keep the write side open (``True``) while there is a request to answer."""
        self._mark_eof()
        waiting = self._waiter is not None and not self._waiter.done()
        if waiting and not self._messages:
            return False  # nothing asked, or only part of a head: asyncio closes as before
        try:
            assert self._parser is not None
            self._parser.feed_eof()
        except PayloadEncodingError:
            # A body cut short: the request cannot be answered sensibly. Closing cancels it,
            # as aiohttp always did.
            return False
        except Exception:
            pass  # part of a head after the complete requests: whatever the parser makes of it
        self._half_closed = True
        if not self._messages:
            self.close()  # after the response in hand
        return True

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if self._half_closed and not self._messages:
            self.close()  # the last pipelined request before the caller's EOF
        return await super().finish_response(request, resp, start_time)


class BoundedSite(web.BaseSite):
    """Serves a runner's app on a bound listener, with at most ``limit`` connections open."""

    __slots__ = (
        "_connecting",
        "_failures",
        "_limit",
        "_listener",
        "_open",
        "_options",
        "_refusals",
        "_retry",
    )

    def __init__(
        self, runner: web.BaseRunner, listener: Listener, limit: int, **handler_options: Any
    ) -> None:
        super().__init__(runner)
        self._listener = listener
        self._limit = limit
        self._options = handler_options
        self._open = 0
        self._connecting: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._refusals = Throttle(LOG_INTERVAL)  # they throttle the log, not the callers
        self._failures = Throttle(LOG_INTERVAL)

    @property
    def name(self) -> str:
        return self._listener.description

    async def start(self) -> None:
        await super().start()
        self._listener.sock.setblocking(False)
        self._resume()

    async def stop(self) -> None:
        self._pause()
        for task in self._connecting:
            task.cancel()
        await super().stop()

    def _resume(self) -> None:
        self._retry = None
        asyncio.get_running_loop().add_reader(self._listener.sock.fileno(), self._accept)

    def _pause(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        asyncio.get_running_loop().remove_reader(self._listener.sock.fileno())

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self._back_off(exc)
                return
            if self._open >= self._limit:
                self._refuse(conn)
            else:
                self._open += 1
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        handler = AgentRequestHandler(server, loop=loop, on_close=self._release, **self._options)
        task = loop.create_task(self._connect(conn, handler))
        self._connecting.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, handler: AgentRequestHandler) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: handler, sock=conn)
        except BaseException:
            handler.release()
            conn.close()
            raise

    def _release(self) -> None:
        self._open -= 1

    def _refuse(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the caller is gone already
            conn.send(BUSY_RESPONSE, socket.MSG_DONTWAIT)  # a fresh socket's buffer takes it
        conn.close()
        held_back = self._refusals()
        if held_back is not None:
            logger.warning(
                "{}: {} connections open, the most allowed (LOADER_MAX_CONNECTIONS): refusing "
                "new ones{}",
                self.name,
                self._limit,
                f" ({held_back} more refused since the last line)" if held_back else "",
            )

    def _back_off(self, exc: OSError) -> None:
        self._pause()
        self._retry = asyncio.get_running_loop().call_later(ACCEPT_RETRY_DELAY, self._resume)
        held_back = self._failures()
        if held_back is not None:
            logger.error(
                "{}: cannot accept connections ({}); trying again in {:.0f} s{}",
                self.name,
                exc.strerror or exc,
                ACCEPT_RETRY_DELAY,
                f" ({held_back} more failures since the last line)" if held_back else "",
            )


def caller_eof(request: web.BaseRequest) -> asyncio.Future[None] | None:
    """The future that ``AgentRequestHandler`` completes when the caller closes its side, or
    None for a connection served otherwise (a test's own server)."""
    protocol = request.protocol
    return protocol.caller_eof if isinstance(protocol, AgentRequestHandler) else None
