"""``GET /metrics`` answered before Django, and a connection id for every websocket.

The exposition is aggregated over every worker of this replica: with ``PROMETHEUS_MULTIPROC_DIR``
set (gunicorn.conf.py does), prometheus_client's ``MultiProcessCollector`` sums the metric files
of all of them, whichever worker the scrape reaches. Added at scrape time: readiness, Redis, and
each process's CPU, memory and descriptors (:mod:`observability.scrape`).

Never reachable from the internet: nginx answers 404 for ``/metrics``, and a request that came
through any proxy (it carries ``X-Forwarded-For`` or ``Forwarded``: nginx, a Gateway, a load
balancer) gets 404 here too. Prometheus scrapes each replica's own port directly.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import markcoroutinefunction

from observability import context, metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

METRICS_PATH = "/metrics"
#: Each readiness check of a scrape is cut off after this long (counted as failed), so that a
#: replica whose Redis is gone still answers its scrape in time (the tests scrape every second).
SCRAPE_CHECK_SECONDS = 0.5
_PROXY_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip", b"x-forwarded-proto"})


def came_through_a_proxy(scope: Scope) -> bool:
    """Whether a proxy (nginx, a Gateway, a load balancer) forwarded this request: it says so in
    a forwarding header. Endpoints for the pod's own network only answer such requests 404."""
    return any(name in _PROXY_HEADERS for name, _ in scope.get("headers", ()))


class MetricsEndpoint:
    """Wraps the whole ASGI application: answers ``/metrics``, names every websocket."""

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner
        metrics.start_layer_sync()

    @markcoroutinefunction
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The awaitable of whoever answers (an ASGI application all the same: the caller awaits
        it). Handed back rather than awaited here, so that no frame of this wrapper stays
        suspended for the life of every websocket (loadtests/README.md: idle memory)."""
        kind = scope["type"]
        if kind == "websocket":
            context.begin(scope.get("path", ""))
        elif kind == "http" and scope["path"] == METRICS_PATH:
            if (
                metrics.ENABLED
                and not came_through_a_proxy(scope)
                and scope["method"] in {"GET", "HEAD"}
            ):
                accept = dict(scope.get("headers", ())).get(b"accept", b"").decode("latin-1")
                return _serve_metrics(send, accept)
            return _not_found(send)
        return self.inner(scope, receive, send)


async def _serve_metrics(send: Send, accept: str) -> None:
    from health.checks import bounded_readiness

    checks = await bounded_readiness(SCRAPE_CHECK_SECONDS)
    # Reading every worker's files and /proc is blocking file I/O: not on the event loop.
    payload, content_type = await asyncio.to_thread(exposition, checks, accept)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _Everything:
    """What another registry collects (a registry is not itself a collector)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Any:
        return self.registry.collect()


async def _not_found(send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"10")],
        }
    )
    await send({"type": "http.response.body", "body": b"Not Found\n"})


def exposition(checks: dict[str, str], accept: str = "") -> tuple[bytes, str]:
    """This replica's exposition, in the format the scraper's ``Accept`` header prefers
    (Prometheus text, or OpenMetrics), and its content type."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector

    from observability.scrape import ReadinessCollector, ReplicaProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(ReplicaProcessCollector())
    else:  # one process (tests, runserver): its own values, process metrics included
        registry = CollectorRegistry()
        registry.register(_Everything(REGISTRY))
    registry.register(ReadinessCollector(checks))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
