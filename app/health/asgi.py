"""``/healthz`` and ``/readyz``, answered in front of Django.

Probes hit the pod or container IP over plain HTTP. Answering here, before Django, means no
``DisallowedHost`` for an IP that is not in ALLOWED_HOSTS and no HTTPS redirect, without
weakening either for real traffic.

* ``/healthz``: the process is alive and its event loop turns. Never touches Redis, so a Redis
  outage does not make an orchestrator kill healthy workers.
* ``/readyz``: Redis answers PING and a message makes a round trip through the channel layer.
  503 with the failing check otherwise; the load balancer stops routing new sockets here.
  With a layer that counts what it drops (``CHANNEL_LAYER=fanout``), the body also carries its
  counters under ``layer`` (``dropped``, ``reconnects``, ...). Like ``/metrics``, it answers
  404 to a request that came through a proxy: its counters and its Redis round trip are for the
  orchestrator on the pod's own port, not for the internet (a Gateway routes ``/`` to that port).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from health.checks import layer_details, readiness
from observability.asgi import came_through_a_proxy

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

READY_TIMEOUT_SECONDS = 3.0


class HealthCheckMiddleware:
    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in {"GET", "HEAD"}:
            if scope["path"] == "/healthz":
                return await _respond(send, 200, {"status": "alive"})
            if scope["path"] == "/readyz":
                if came_through_a_proxy(scope):
                    return await _respond(send, 404, {"status": "not found"})
                started = time.monotonic()
                try:
                    checks = await asyncio.wait_for(readiness(), READY_TIMEOUT_SECONDS)
                except TimeoutError:
                    checks = {"timeout": f"no answer within {READY_TIMEOUT_SECONDS} s"}
                ok = all(value == "ok" for value in checks.values())
                body = {
                    "status": "ready" if ok else "not ready",
                    "checks": checks,
                    "ms": round((time.monotonic() - started) * 1000, 1),
                }
                layer = layer_details()
                if layer is not None:
                    body["layer"] = layer  # counted drops and reconnects: never silent
                return await _respond(send, 200 if ok else 503, body)
        return await self.inner(scope, receive, send)


async def _respond(send: Send, status: int, body: dict[str, Any]) -> None:
    from realtime.jsonframes import dumps

    payload = dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
