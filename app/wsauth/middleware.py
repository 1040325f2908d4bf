"""The websocket authentication stack: a connection token or the session cookie.

``websocket_auth_stack(inner)`` is what ``config.asgi`` wraps the URL router in (inside
``realtime.origin``'s Origin rule)::

    TokenAuthMiddleware        token.<jwt> subprotocol (or ?token= when WS_TOKEN_QUERY_PARAM):
                               verified, or the socket is refused (auth_failed, 4401);
                               selects `switchboard.v1` when the client offered it
      CookieMiddleware         Channels' session cookie ...
        SessionMiddleware      ... and session ...
          UserMiddleware       ... user (skipped when a token authenticated the socket), then
                               the per-user connection limit (too_many_connections, 4429)
            inner

A token wins over a cookie sent with it. ``scope["auth_method"]`` says which one authenticated
(``"token"``, ``"session"`` or ``None``) and ``scope["token_claims"]`` holds the token's claims.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings

from realtime import jsonframes
from wsauth import limits, tokens

logger = logging.getLogger("switchboard.ws")

#: Close code when authentication failed or ended (mirrors HTTP 401).
CLOSE_AUTH = 4401
#: Close code when the user already holds WS_MAX_CONNECTIONS_PER_USER sockets (HTTP 429).
CLOSE_TOO_MANY = 4429


def client_of(scope: dict[str, Any]) -> str:
    host, port = scope.get("client") or ("?", 0)
    return f"{host}:{port}"


async def refuse_handshake(
    receive: Any, send: Any, code: str, detail: str, close_code: int, **fields: Any
) -> None:
    """Accept only to say why, then close (a refused handshake tells a client nothing)."""
    message = await receive()
    if message.get("type") != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    frame = {"type": "error", "code": code, "detail": detail, **fields}
    await send({"type": "websocket.send", "text": jsonframes.dumps(frame)})
    await send({"type": "websocket.close", "code": close_code})


def offered_subprotocols(scope: dict[str, Any]) -> list[str]:
    return list(scope.get("subprotocols") or [])


def presented_token(scope: dict[str, Any]) -> str | None:
    """The token this handshake carries: the ``token.`` subprotocol, or ``?token=`` when the
    seeds' query-string form is switched on (WS_TOKEN_QUERY_PARAM, off by default)."""
    token = tokens.from_subprotocols(offered_subprotocols(scope))
    if token is None and settings.WS_TOKEN_QUERY_PARAM:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        values = query.get("token")
        token = values[0] if values else None
    return token


def selecting_subprotocol(send: Any, offered: list[str]) -> Any:
    """``send`` that selects ``switchboard.v1`` on accept when the client offered it (browsers
    fail a handshake that offered subprotocols and got none back); never a ``token.`` one."""
    if tokens.SUBPROTOCOL not in offered:
        return send

    async def send_selecting(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.accept" and not message.get("subprotocol"):
            message = {**message, "subprotocol": tokens.SUBPROTOCOL}
        await send(message)

    return send_selecting


class TokenAuthMiddleware:
    """Authenticates a websocket by its connection token, when it presents one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.inner(scope, receive, send)
            return
        send = selecting_subprotocol(send, offered_subprotocols(scope))
        token = presented_token(scope)
        if token is None:
            await self.inner(scope, receive, send)
            return
        try:
            claims = tokens.verify(token)
            user = await database_sync_to_async(tokens.user_for)(claims)
        except tokens.TokenRejected as rejected:
            # The reason and the client, never the token (nor anything decoded from it).
            logger.info(
                "refused websocket %s %r: auth_failed (%s)",
                client_of(scope),
                scope.get("path"),
                rejected.reason,
            )
            await refuse_handshake(
                receive, send, "auth_failed", rejected.detail, CLOSE_AUTH, reason=rejected.reason
            )
            return
        scope = {**scope, "user": user, "auth_method": "token", "token_claims": claims}
        await self.inner(scope, receive, send)


class UserMiddleware(AuthMiddleware):
    """Channels' AuthMiddleware, except that a token's user stands; then the per-user limit."""

    def populate_scope(self, scope: dict[str, Any]) -> None:
        if scope.get("auth_method") != "token":
            scope.pop("user", None)  # only a token may set the user before this point
        super().populate_scope(scope)

    async def resolve_scope(self, scope: dict[str, Any]) -> None:
        if scope.get("auth_method") == "token":
            return
        await super().resolve_scope(scope)
        scope["auth_method"] = "session" if scope["user"].is_authenticated else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope = dict(scope)
        self.populate_scope(scope)
        await self.resolve_scope(scope)
        user = scope["user"]
        if not user.is_authenticated:
            await self.inner(scope, receive, send)
            return
        lease = await limits.acquire(user.pk)
        if lease is None:
            limit = settings.WS_MAX_CONNECTIONS_PER_USER
            logger.info(
                "refused websocket %s %r: too_many_connections (user=%s, limit %d)",
                client_of(scope),
                scope.get("path"),
                user.pk,
                limit,
            )
            await refuse_handshake(
                receive,
                send,
                "too_many_connections",
                f"At most {limit} open connections per user; close one and reconnect.",
                CLOSE_TOO_MANY,
            )
            return
        try:
            await self.inner(scope, receive, send)
        finally:
            await limits.release(lease)


def websocket_auth_stack(inner: Any) -> TokenAuthMiddleware:
    return TokenAuthMiddleware(CookieMiddleware(SessionMiddleware(UserMiddleware(inner))))
