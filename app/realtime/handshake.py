"""The websocket handshake in one coroutine: Origin rule, authentication, routing, consumer.

:class:`WebsocketHandshake` is the ASGI application for websocket scopes (``config.asgi``). It
runs, in order, what a stack of ASGI middleware would (and did):

1. the Origin rule (``realtime.origin``; HTTP 403 when refused);
2. a connection token (``wsauth.middleware.authenticate_token``; auth_failed, 4401);
3. Channels' cookie and session middleware, then its auth middleware's user
   (``wsauth.middleware.SessionUser``) when no token authenticated the socket;
4. the per-user connection limit (``wsauth.middleware.connection_lease``; 4429), held until the
   consumer ends;
5. Channels' URL routing (``url_route``, ``path_remaining``), then the consumer itself.

Each step is the library's or the project's own code, called rather than wrapped: a middleware
stack keeps one suspended coroutine and one copy of the scope per level for as long as the
socket lives, and this one keeps a single coroutine and a single scope (loadtests/README.md:
idle memory per socket). Refusals, log lines and metrics are those of the steps themselves.
:class:`DirectProtocolTypeRouter` (and ``observability.asgi.MetricsEndpoint``) in front of it
hand back the awaitable they chose instead of awaiting it, for the same reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from asgiref.sync import markcoroutinefunction
from channels.routing import ProtocolTypeRouter, URLRouter
from channels.sessions import CookieMiddleware, InstanceSessionWrapper
from django.urls import URLPattern

from realtime.origin import allowed_hosts_origin_validator
from wsauth import limits
from wsauth.middleware import (
    REFUSED,
    SessionUser,
    authenticate_token,
    connection_lease,
    offered_subprotocols,
    presented_token,
    selecting_subprotocol,
)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[Any]]


async def _admitted(scope: Scope, receive: Any, send: Any) -> bool:
    """The "inner application" of a step run for its verdict: reached only when it admits."""
    return True


async def _scope_as_given(scope: Scope, receive: Any, send: Any) -> Scope:
    """The "inner application" of a step run for the scope it builds."""
    return scope


def _routed(application: ASGIApp) -> ASGIApp:
    """A route's stand-in that hands back what the router chose: the application and the
    scope it built (``url_route``, ``path_remaining``)."""

    async def chosen(scope: Scope, receive: Any, send: Any) -> tuple[ASGIApp, Scope]:
        return application, scope

    # A nested router routes on what is left of the path: URLRouter looks for this mark.
    chosen._path_routing = getattr(application, "_path_routing", False)  # type: ignore[attr-defined]
    return chosen


class DirectProtocolTypeRouter(ProtocolTypeRouter):
    """Channels' ``ProtocolTypeRouter``, handing back the chosen application's awaitable instead
    of awaiting it: no suspended frame of its own for the life of every websocket."""

    @markcoroutinefunction
    def __call__(self, scope: Scope, receive: Any, send: Any) -> Awaitable[Any]:
        application = self.application_mapping.get(scope["type"])
        if application is None:
            raise ValueError(f"No application configured for scope type {scope['type']!r}")
        return application(scope, receive, send)


class WebsocketHandshake:
    """The ASGI application of websocket scopes: see the module docstring."""

    def __init__(self, routes: Sequence[Any]) -> None:
        self.origin_rule = allowed_hosts_origin_validator(_admitted)
        self.cookies = CookieMiddleware(_scope_as_given)
        self.session_user = SessionUser(None)
        # Channels' router over the same patterns, each answering with its application.
        self.router = URLRouter(
            [
                URLPattern(route.pattern, _routed(route.callback), route.default_args, route.name)
                for route in routes
            ]
        )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            raise ValueError(f"WebsocketHandshake serves websocket scopes, not {scope['type']!r}")
        admitted = await self.admit(scope, receive, send)
        if admitted is None:
            return
        scope, send, lease = admitted
        try:
            application, routed = await self.router(scope, receive, send)
            scope.update(routed)  # url_route, path_remaining: into the one scope
            del routed
            consumer_class = getattr(application, "consumer_class", None)
            if consumer_class is None:
                await application(scope, receive, send)
            else:  # what ``as_asgi()``'s application does, without its coroutine
                await consumer_class(**application.consumer_initkwargs)(scope, receive, send)
        finally:
            if lease is not None:
                await limits.release(lease)

    async def admit(self, scope: Scope, receive: Any, send: Any) -> tuple[Scope, Any, Any] | None:
        """Steps 1-4: the socket's scope, ``send`` and connection lease (``None`` for an
        anonymous socket), or ``None`` once the socket has been refused."""
        server_scope = scope
        if await self.origin_rule(scope, receive, send) is not True:
            return None  # refused with HTTP 403 (and logged) by the rule
        send = selecting_subprotocol(send, offered_subprotocols(scope))
        token = presented_token(scope)
        if token is not None:
            granted = await authenticate_token(scope, token, receive, send)
            if granted is None:
                return None
            scope = {**scope, **granted}
        scope = await self.cookies(scope, receive, send)
        session = InstanceSessionWrapper(scope, send)
        await session.resolve_session()
        # From here on, one scope: the server's own, with what the steps added, which the
        # session wrapper's ``send`` reads too. Nothing upstream reads it again (uvicorn logs the
        # client and path it holds at the accept; no step changes them), so the copies the steps
        # made need not live as long as the socket does.
        server_scope.update(session.scope)
        session.scope = scope = server_scope
        send = session.send
        self.session_user.populate_scope(scope)
        await self.session_user.resolve_scope(scope)
        lease = await connection_lease(scope, receive, send)
        if lease is REFUSED:
            return None
        return scope, send, lease
