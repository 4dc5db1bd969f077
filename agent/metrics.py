"""``GET /metrics``: the agent's Prometheus metrics (docs/operations.md, "Metrics").

Each app has its own ``CollectorRegistry`` (never prometheus_client's global one), so several
apps, or test agents, in one process never mix their numbers. Two kinds of source feed it:

- What the HTTP layer sees is recorded as it happens: requests by route and status with their
  latency (``Metrics.middleware``), loads and uploads by outcome (``agent.server`` calls
  ``resource_operation``).
- What the services count themselves is read from them at scrape time (``ServicesCollector``):
  the unlock's state, stage durations and retries (``UnlockManager.stats``), the bytes decrypted
  (``ResourceStore.stats``, ``UnlockManager.stats``), cache hits and misses and the retries of
  the API client and of the big-part downloads (``ResourceStore.downloads.stats``), the cache's
  use, bound and removals (``ResourceStore.cache.usage()``). The services
  keep plain counters (an addition per block on the hot path, no lock, no prometheus_client in
  the core modules), and ``agent.service`` builds them without knowing about metrics.

Every label value is from a fixed set (route templates, outcome codes, retry causes, unlock
states), never from what a caller or an upstream sent: the number of series stays bounded.

prometheus_client is imported, and the registry made, on first use (the first request), not
while ``serve`` starts: ~8 ms of CPU out of the way to READY=1 (``bench/bench_startup.py``).
"""

from __future__ import annotations

import platform
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import hdrs, web

from agent import __version__
from agent.routes import Handler, Services
from agent.schemas import UnlockState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import Metric

PREFIX = "azaion_loader"
UNMATCHED = "unmatched"  # the route of a request that matched none (404, 405)
OTHER_METHOD = "other"  # a method outside HTTP's standard ones
# Up to minutes: a /load's latency is its whole body, at ~1 GB/s for large models.
LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf")),
)
RESOURCE_OPERATIONS = ("load", "upload")


# prometheus_client.CONTENT_TYPE_LATEST, without importing it (tests/test_metrics.py compares).
CONTENT_TYPE_LATEST = "text/plain; version=1.0.0; charset=utf-8"


class Metrics:
    """One app's registry and what the HTTP layer records into it (made on first use)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._recorders: Recorders | None = None

    def _made(self) -> Recorders:
        if self._recorders is None:
            self._recorders = Recorders(self._services)
        return self._recorders

    @property
    def registry(self) -> CollectorRegistry:
        return self._made().registry

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE_LATEST``)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def resource_operation(self, operation: str, outcome: str) -> None:
        """``outcome``: "ok" or a short error code from ``agent.server``'s fixed table."""
        self._made().resource_operations.labels(operation, outcome).inc()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts and times every answered request (outermost, so it sees the final status)."""
        started = time.perf_counter()
        response = await handler(request)
        route, method = route_labels(request)
        recorders = self._made()
        recorders.requests.labels(route, method, str(response.status)).inc()
        recorders.latency.labels(route, method).observe(time.perf_counter() - started)
        return response


class Recorders:
    """The registry and the metrics the HTTP layer records into."""

    def __init__(self, services: Services) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, Info

        self.registry = CollectorRegistry()
        info = Info(f"{PREFIX}_build", "The agent's version and Python", registry=self.registry)
        info.info({"version": __version__, "python": platform.python_version()})
        self.requests: Counter = Counter(
            f"{PREFIX}_http_requests_total",
            "Answered requests to the local API, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency: Histogram = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a /load's whole body)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.resource_operations: Counter = Counter(
            f"{PREFIX}_resource_operations_total",
            "Resource loads and uploads by outcome: ok, or the error code the caller got "
            "(or client_gone)",
            ["operation", "outcome"],
            registry=self.registry,
        )
        for operation in RESOURCE_OPERATIONS:
            self.resource_operations.labels(operation, "ok")
        self.registry.register(ServicesCollector(services))


def route_labels(request: web.Request) -> tuple[str, str]:
    """The route's template (``/load/{filename}``) and method, or ``unmatched``: never the raw
    path or a made-up method, which the caller chooses."""
    route = request.match_info.route
    if route.resource is None:
        method = request.method if request.method in hdrs.METH_ALL else OTHER_METHOD
        return UNMATCHED, method
    return route.resource.canonical, route.method


METRICS = web.AppKey("metrics", Metrics)


class ServicesCollector:
    """Reads the services' own counters at scrape time (see the module docstring); a
    prometheus_client ``Collector`` by its shape."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        unlock, resources, api = (
            self._services.unlock,
            self._services.resources,
            self._services.api,
        )
        state = GaugeMetricFamily(
            f"{PREFIX}_unlock_state",
            "1 for the unlock's current state, 0 for the others",
            labels=["state"],
        )
        for each in UnlockState:
            state.add_metric([each.value], 1.0 if each is unlock.state else 0.0)
        yield state

        stages = GaugeMetricFamily(
            f"{PREFIX}_unlock_stage_duration_seconds",
            "How long each stage of the latest unlock took, waits between retries included",
            labels=["stage"],
        )
        for stage, seconds in unlock.stats.stage_seconds.items():
            stages.add_metric([stage.value], seconds)
        yield stages

        decrypted = CounterMetricFamily(
            f"{PREFIX}_decrypted_bytes",
            "Verified plaintext produced: resources loaded, and the images archive",
            labels=["kind"],
        )
        decrypted.add_metric(["resource"], resources.stats.decrypted_bytes)
        decrypted.add_metric(["images"], unlock.stats.decrypted_bytes)
        yield decrypted

        buffers = resources.shared.buffers
        for name, what, value in (
            ("bytes", "now", buffers.held),
            ("peak_bytes", "at most since the agent started", buffers.peak),
            ("limit_bytes", "allowed (LOADER_LOAD_BUFFER_MIB)", buffers.budget),
        ):
            yield GaugeMetricFamily(
                f"{PREFIX}_load_buffer_{name}",
                f"Memory that loads hold for their blocks (ciphertext and plaintext), {what}",
                value=value,
            )

        downloads = resources.downloads.stats
        lookups = CounterMetricFamily(
            f"{PREFIX}_cache_lookups",
            "Big-part cache checks: hit (intact on disk) or miss (downloaded from the CDN)",
            labels=["result"],
        )
        lookups.add_metric(["hit"], downloads.hits)
        lookups.add_metric(["miss"], downloads.misses)
        yield lookups

        usage = resources.cache.usage()
        for name, what, value in (
            ("bytes", "Bytes of big parts in the model cache, partial downloads included",
             usage.used_bytes),
            ("limit_bytes", "The model cache's bound (LOADER_CACHE_MAX_BYTES)", usage.max_bytes),
            ("parts", "Complete big parts in the model cache", usage.parts),
        ):  # fmt: skip
            yield GaugeMetricFamily(f"{PREFIX}_cache_{name}", what, value=value)
        removals = CounterMetricFamily(
            f"{PREFIX}_cache_removals",
            "Big parts removed from the model cache: evicted (least recently used, over its "
            "bound) or orphan (no resource uses them any more)",
            labels=["reason"],
        )
        removals.add_metric(["evicted"], usage.evictions)
        removals.add_metric(["orphan"], usage.orphans_removed)
        yield removals

        retries = CounterMetricFamily(
            f"{PREFIX}_retries",
            "Retries of transient faults, by operation (resource_api, cdn, cdn_resume, unlock) "
            "and cause (throttled, timeout, unavailable, docker_unavailable, other)",
            labels=["operation", "cause"],
        )
        tally: Tally[tuple[str, str]] = Tally()
        for counts in (api.retries, downloads.retries, unlock.stats.retries):
            for key, count in counts.items():
                tally[key] += count
        for (operation, cause), count in sorted(tally.items()):
            retries.add_metric([operation, cause], count)
        yield retries
