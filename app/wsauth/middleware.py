"""Websocket authentication, step by step: a connection token or the session cookie.

``realtime.handshake`` runs these steps in one coroutine for every websocket, in this order
(inside ``realtime.origin``'s Origin rule, before URL routing)::

    token                  token.<jwt> subprotocol (or ?token= when WS_TOKEN_QUERY_PARAM):
                           verified (:func:`authenticate_token`), or the socket is refused
                           (auth_failed, 4401); :func:`selecting_subprotocol` selects
                           `switchboard.v1` when the client offered it
    cookies, session       Channels' CookieMiddleware and session wrapper
    user                   Channels' AuthMiddleware steps (:class:`SessionUser`; skipped when a
                           token authenticated the socket), then
    limit                  the per-user connection limit (:func:`connection_lease`;
                           too_many_connections, 4429)

A token wins over a cookie sent with it. ``scope["auth_method"]`` says which one authenticated
(``"token"``, ``"session"`` or ``None``) and ``scope["token_claims"]`` holds the token's claims.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs

from channels.auth import AuthMiddleware
from channels.db import database_sync_to_async
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


async def authenticate_token(
    scope: dict[str, Any], token: str, receive: Any, send: Any
) -> dict[str, Any] | None:
    """What a connection token adds to the scope (``user``, ``auth_method``, ``token_claims``),
    or ``None`` once an invalid one has been refused (auth_failed, 4401)."""
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
        return None
    return {"user": user, "auth_method": "token", "token_claims": claims}


class SessionUser(AuthMiddleware):
    """Channels' AuthMiddleware steps (``populate_scope``, ``resolve_scope``), except that a
    token's user stands. Used for its methods: ``realtime.handshake`` calls them in order."""

    def populate_scope(self, scope: dict[str, Any]) -> None:
        if scope.get("auth_method") != "token":
            scope.pop("user", None)  # only a token may set the user before this point
        super().populate_scope(scope)

    async def resolve_scope(self, scope: dict[str, Any]) -> None:
        if scope.get("auth_method") == "token":
            return
        await super().resolve_scope(scope)
        scope["auth_method"] = "session" if scope["user"].is_authenticated else None


async def connection_lease(scope: dict[str, Any], receive: Any, send: Any) -> Any:
    """The per-user connection lease of an authenticated socket (``limits.release`` it when the
    socket ends); ``None`` for an anonymous one; :data:`REFUSED` once a user over
    WS_MAX_CONNECTIONS_PER_USER has been refused (too_many_connections, 4429)."""
    user = scope["user"]
    if not user.is_authenticated:
        return None
    lease = await limits.acquire(user.pk)
    if lease is not None:
        return lease
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
    return REFUSED


#: What :func:`connection_lease` returns for a refused socket.
REFUSED = object()
