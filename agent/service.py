"""``azaion-loader serve``: the service's lifecycle, apart from what it serves.

Open listeners -> check the descriptor limit holds their connections -> build services -> serve
-> READY=1 -> (auto unlock) -> wait for SIGTERM -> STOPPING=1 -> finish responses in flight
(bounded) -> close everything -> remove the socket. Connection limits and timeouts: see
``agent.connections``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from loguru import logger

from agent import __version__, startup
from agent.api_client import ResourceApiClient
from agent.connections import BoundedSite, Throttle, ensure_descriptor_limit
from agent.errors import LoaderError, NotFoundError
from agent.listeners import Listener, open_listeners
from agent.logs import register_secret
from agent.notify import Notifier
from agent.peers import AccessPolicy
from agent.resources import ResourceStore
from agent.routes import Services
from agent.server import create_app
from agent.settings import MiB, Settings
from agent.transport import TransferLimits
from agent.unlock import UnlockManager
from agent.watch import FileWatch

# Debug-only hook for the watchdog system test: SIGUSR2 blocks the event loop.
DEBUG_BLOCK_ENV = "LOADER_DEBUG_BLOCK_LOOP_ON_SIGUSR2"
DEBUG_BLOCK_SECONDS = 600
# Errors that reach the event loop (a failed accept(), a task nobody awaited) may repeat in a
# tight loop: one line per this many seconds at most, with a count of the rest.
LOOP_ERROR_LOG_INTERVAL = 5.0

LoopExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]

# Imported only when first used, after READY=1 (prometheus_client by the first request for
# /metrics, see agent.metrics): whether they are installed is checked at start instead, so a
# broken installation stops ``serve`` with one line rather than failing a later request. The
# unlock needs no Docker SDK (agent.engine).
DEFERRED_IMPORTS = {"prometheus_client": "prometheus-client"}


def resource_api_client(settings: Settings) -> ResourceApiClient:
    """The Resource API client the settings describe, holding their credentials if any."""
    api = ResourceApiClient(
        settings.resource_api_url,
        limits=TransferLimits(
            min_rate=settings.loader_upstream_min_rate,
            window=settings.loader_upstream_rate_window,
            deadline=settings.loader_upstream_deadline,
        ),
    )
    if settings.azaion_email and settings.azaion_password:
        password = settings.azaion_password.get_secret_value()
        register_secret(password)
        api.set_credentials(settings.azaion_email, password)
    return api


def build_services(settings: Settings, notifier: Notifier, access: AccessPolicy) -> Services:
    api = resource_api_client(settings)
    unlock: UnlockManager

    def on_unlock_change() -> None:
        notifier.status(serving_status(unlock))

    unlock = UnlockManager(settings, api, on_change=on_unlock_change)
    resources = ResourceStore(
        api,
        settings.model_cache_dir,
        max_resource_bytes=settings.loader_max_resource_bytes,
        load_buffer_bytes=settings.loader_load_buffer_mib * MiB,
        publishers_dir=settings.loader_publishers_dir,
        state_dir=settings.loader_state_dir,
        allow_downgrade=settings.loader_allow_downgrade,
    )
    resources.cache.set_max_bytes(settings.loader_cache_max_bytes)  # None: a share of its disk
    return Services(settings=settings, api=api, resources=resources, unlock=unlock, access=access)


def serving_status(unlock: UnlockManager) -> str:
    return f"serving; {unlock.status_line()}"


def check_deferred_imports(modules: Mapping[str, str] = DEFERRED_IMPORTS) -> None:
    """Raise ``LoaderError`` if a module imported only later is not installed (finding it
    imports nothing)."""
    missing = [what for name, what in modules.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise LoaderError(
            f"this installation is incomplete: {', '.join(missing)} not installed "
            "(reinstall azaion-loader)"
        )


async def serve(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    started = time.monotonic()
    check_deferred_imports()
    access = AccessPolicy.from_setting(  # a bad group name: exit 2
        settings.loader_allowed_groups,
        explicit="loader_allowed_groups" in settings.model_fields_set,
    )
    listeners = open_listeners(
        settings.loader_socket_path, settings.loader_http_host, settings.loader_http_port, env
    )
    try:
        ensure_descriptor_limit(len(listeners), settings.loader_max_connections)
    except LoaderError:
        _close_listeners(listeners)
        raise
    notifier = Notifier(env)
    services = build_services(settings, notifier, access)
    runner = web.AppRunner(
        create_app(services),
        handle_signals=False,
        shutdown_timeout=settings.loader_shutdown_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log_loop_errors())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, services)  # systemctl reload
    archive_watch = FileWatch(settings.images_path, services.unlock.notice_archive)
    if env.get(DEBUG_BLOCK_ENV) == "1":
        loop.add_signal_handler(signal.SIGUSR2, _block_loop)
    watchdog = asyncio.create_task(notifier.watchdog_loop(), name="watchdog")
    try:
        await runner.setup()
        for listener in listeners:
            site = BoundedSite(
                runner,
                listener,
                settings.loader_max_connections,
                keepalive_timeout=settings.loader_idle_timeout,  # idle and slow-header connections
            )
            await site.start()
        logger.info(
            "azaion-loader {} serving on {} ({:.0f} ms)",
            __version__,
            ", ".join(listener.description for listener in listeners),
            (time.monotonic() - started) * 1000,
        )
        startup.collecting()
        notifier.ready(serving_status(services.unlock))
        startup.load_deferred_certificates()  # this turn, before any upstream call: agent.startup
        await _auto_unlock(settings, services, notifier)
        archive_watch.start()  # a new archive put in place while serving is an update
        await stop.wait()
        logger.info("stopping")
        notifier.stopping()
    finally:
        archive_watch.close()
        watchdog.cancel()
        await _shutdown(runner, services, listeners)
    logger.info("stopped")


def _reload(services: Services) -> None:
    """SIGHUP (``systemctl reload``): look at the archive again (an update, or a retry of an
    unlock that failed), and at the images of earlier releases still waiting to be removed."""
    logger.info("reload: checking {} for a new archive", services.settings.images_path)
    services.unlock.notice_archive()


async def _auto_unlock(settings: Settings, services: Services, notifier: Notifier) -> None:
    if not settings.loader_auto_unlock:
        logger.info("automatic unlock is off (LOADER_AUTO_UNLOCK=false)")
        return
    if not services.api.has_credentials:
        logger.info("no credentials configured: waiting for POST /login or /unlock")
        # The archive may already be unlocked: that needs no credentials.
    try:
        await services.unlock.start()
    except NotFoundError as exc:
        logger.info("nothing to unlock: {}", exc)
        notifier.status(f"serving; images locked: {exc}")  # what `systemctl status` shows
    except LoaderError as exc:
        logger.error("automatic unlock did not start: {}", exc)


async def _shutdown(runner: web.AppRunner, services: Services, listeners: list[Listener]) -> None:
    await services.unlock.close()
    await runner.cleanup()  # stops accepting, finishes responses in flight (bounded)
    await services.resources.close()
    await services.api.close()
    _close_listeners(listeners)


def _close_listeners(listeners: list[Listener]) -> None:
    for listener in listeners:
        listener.close()


def log_loop_errors(interval: float = LOOP_ERROR_LOG_INTERVAL) -> LoopExceptionHandler:
    """An event-loop exception handler writing through loguru, one line per ``interval``."""
    throttle = Throttle(interval)

    def log(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        held_back = throttle()
        if held_back is None:
            return
        logger.opt(exception=context.get("exception")).error(
            "event loop: {}{}",
            context.get("message") or "unhandled error",
            f" ({held_back} more since the last line)" if held_back else "",
        )

    return log


def _block_loop() -> None:
    logger.warning("debug hook: blocking the event loop for {} s", DEBUG_BLOCK_SECONDS)
    time.sleep(DEBUG_BLOCK_SECONDS)


def run(settings: Settings) -> int:
    asyncio.run(serve(settings))
    return 0
