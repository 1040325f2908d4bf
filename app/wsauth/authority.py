"""An open socket lasts only as long as the authority it was opened with.

:class:`SocketAuthority` is mixed into ``realtime.consumers.GroupMemberConsumer``. Once a socket
of a logged-in user is open it

* joins the user's group ``auth.user.<pk>``: :func:`revoke_user` (called by ``wsauth.signals``
  when the user is deactivated, deleted or changes password) closes every socket of that user,
  on every replica and worker, through the channel layer;
* with a token, is closed when the token expires: ``WS_TOKEN_REFRESH_NOTICE`` seconds before,
  the client gets ``{"type": "token_expiring", "expires_in": s}``, and a
  ``{"type": "refresh", "token": "<new token>"}`` frame moves the deadline (answered
  ``{"type": "token_refreshed", "expires_in": s}``);
* with a session cookie, is closed at once when that session logs out: :func:`revoke_session`
  (called on ``user_logged_out``) reaches every socket of the user, on every replica, and those
  that authenticated with that session close; a session that ends otherwise (expired, deleted)
  is found by each worker's check of its sockets' sessions every ``WS_SESSION_RECHECK``
  seconds, in one query.

Whatever ends it, the client gets ``{"type": "error", "code": "auth_ended", "reason": ...}``
and close code 4401; a logout sends ``{"type": "error", "code": "logged_out", ...}`` instead
(what notification sockets have always got) and the same 4401. A token limited to ``rooms``
is refused (``room_not_allowed``, 4403) on any other room and on endpoints that are not rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from typing import Any

import orjson
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from django.utils.module_loading import import_string

from observability import metrics
from realtime import jsonframes
from wsauth import tokens

logger = logging.getLogger("switchboard.ws")

CLOSE_AUTH = 4401
CLOSE_ROOM_NOT_ALLOWED = 4403
CLOSE_TRY_AGAIN_LATER = 1013

ENDED_DETAIL = {
    "token_expired": "The connection token expired; get a new one and reconnect.",
    "session_ended": "The session ended (logged out or expired); log in again.",
    "logged_out": "The session ended: you logged out.",
    "deactivated": "The account was deactivated.",
    "password_changed": "The password changed; authenticate again.",
    "deleted": "The account was deleted.",
    "token_refused": "The refresh token was not accepted.",
}


def auth_group(user_pk: object) -> str:
    """The group of every socket of one user (no room name can contain a dot)."""
    return f"auth.user.{int(user_pk)}"  # type: ignore[call-overload]


def revoke_user(user_pk: object, reason: str) -> None:
    """Close every open socket of the user, on every replica (synchronous code: signals)."""
    async_to_sync(get_channel_layer().group_send)(
        auth_group(user_pk), {"type": "auth.revoked", "reason": reason}
    )


def revoke_session(user_pk: object, session_key: str) -> None:
    """Close the user's open sockets that authenticated with ``session_key`` -- chat and
    notifications, on every replica -- and no other (synchronous code: the logout signal)."""
    async_to_sync(get_channel_layer().group_send)(
        auth_group(user_pk), {"type": "auth.logged_out", "session_key": session_key}
    )


class SocketAuthority:
    """Mixin for AsyncWebsocketConsumer subclasses: see the module docstring."""

    _accepted = False  # set by GroupMemberConsumer.accept(), the one consumer this mixes into
    _closing = False
    _token_clock: asyncio.Task | None = None
    _refreshed: asyncio.Event | None = None

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        self._closing = True
        await super().close(code, reason)  # type: ignore[misc]

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        claims = self.scope.get("token_claims")
        if claims and "rooms" in claims:
            room = self.scope.get("url_route", {}).get("kwargs", {}).get("room")
            if room not in claims["rooms"]:
                await self.refuse(
                    "room_not_allowed",
                    "This token is limited to other rooms.",
                    CLOSE_ROOM_NOT_ALLOWED,
                )
                return
        await super().websocket_connect(message)  # type: ignore[misc]
        if self._accepted and not self._closing:
            await self._watch_authority()

    async def _watch_authority(self) -> None:
        user = self.scope.get("user")
        method = self.scope.get("auth_method")  # set by wsauth.middleware's stack
        if method not in ("token", "session") or user is None or not user.is_authenticated:
            return
        self.authority_user = user.pk
        try:
            await self.join(auth_group(user.pk))  # type: ignore[attr-defined]
        except Exception as exc:  # the layer failed between the consumer's join and this one
            logger.warning("could not watch user %s's authority (%s)", user.pk, type(exc).__name__)
            await self.send_error(  # type: ignore[attr-defined]
                "unavailable",
                "The server cannot reach its message broker right now; reconnect shortly.",
            )
            await self.close(code=CLOSE_TRY_AGAIN_LATER)
            return
        # A change saved between the credential check and the join above reached no group
        # member: read the user once more, now that later changes will reach this socket.
        ended = await database_sync_to_async(_authority_ended)(user.pk, user.password)
        if ended is not None:
            await self.end_authority(ended)
            return
        if method == "token":
            self._refreshed = asyncio.Event()
            self._token_clock = asyncio.create_task(self._run_token_clock())
        elif method == "session":
            session = self.scope.get("session")
            if session is not None and session.session_key:
                sessions.watch(self, session.session_key)

    def stop_authority(self) -> None:
        """Called when the socket is gone: no timer or sweep may touch it any more."""
        sessions.forget(self)
        if self._token_clock is not None:
            self._token_clock.cancel()

    async def end_authority(self, reason: str, code: str = "auth_ended") -> None:
        """Send the error frame ``code`` (with ``reason``) and close with 4401, once."""
        if self._closing:
            return
        self._closing = True  # once: a revocation may race the token clock
        logger.info(
            "authority ended: closing %s user=%s reason=%s",
            self.client,  # type: ignore[attr-defined]
            getattr(self, "authority_user", None),
            reason,
        )
        frame = {
            "type": "error",
            "code": code,
            "reason": reason,
            "detail": ENDED_DETAIL.get(reason, "Authentication ended."),
        }
        metrics.error_frame_sent(code)
        with contextlib.suppress(Exception):  # the peer may be gone already
            await self.send(text_data=jsonframes.dumps(frame))  # type: ignore[attr-defined]
            await super().close(CLOSE_AUTH)  # type: ignore[misc]

    async def auth_revoked(self, event: dict[str, Any]) -> None:
        await self.end_authority(str(event.get("reason", "revoked")))

    async def auth_logged_out(self, event: dict[str, Any]) -> None:
        key = sessions.key_of(self)  # only session sockets, once they are watched
        if key is not None and key == event.get("session_key"):
            await self.end_authority("logged_out", code="logged_out")

    # -- tokens ----------------------------------------------------------------------------------
    async def _run_token_clock(self) -> None:
        try:
            await self._token_clock_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away under it: nothing left to close
            logger.debug("token clock ended (%s)", type(exc).__name__)

    async def _token_clock_loop(self) -> None:
        notice = settings.WS_TOKEN_REFRESH_NOTICE
        noticed_jti = None
        assert self._refreshed is not None
        while True:
            claims = self.scope["token_claims"]
            remaining = claims["exp"] - time.time()
            if remaining <= 0:
                await self.end_authority("token_expired")
                return
            if remaining <= notice and noticed_jti != claims["jti"]:
                noticed_jti = claims["jti"]
                frame = {"type": "token_expiring", "expires_in": round(remaining)}
                await self.send(text_data=jsonframes.dumps(frame))  # type: ignore[attr-defined]
            wait = remaining if noticed_jti == claims["jti"] else remaining - notice
            self._refreshed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refreshed.wait(), wait)

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        if self._token_clock is not None and text and '"refresh"' in text:
            try:
                frame = orjson.loads(text)
            except orjson.JSONDecodeError:
                frame = None
            if isinstance(frame, dict) and frame.get("type") == "refresh":
                await self._refresh(frame.get("token"))
                return
        await super().websocket_receive(message)  # type: ignore[misc]

    async def _refresh(self, token: object) -> None:
        try:
            if not isinstance(token, str):
                raise tokens.TokenRejected("malformed", "`token` must be a string.")
            claims = tokens.verify(token)
            user = await database_sync_to_async(tokens.user_for)(claims)
            if user.pk != self.authority_user:
                raise tokens.TokenRejected("other_user", "The token is another user's.")
            room = self.scope.get("url_route", {}).get("kwargs", {}).get("room")
            if "rooms" in claims and room not in claims["rooms"]:
                raise tokens.TokenRejected("room_not_allowed", "The token is for other rooms.")
        except tokens.TokenRejected as rejected:
            logger.info(
                "refresh refused %s user=%s: %s",
                self.client,  # type: ignore[attr-defined]
                self.authority_user,
                rejected.reason,
            )
            await self.end_authority("token_refused")
            return
        self.scope["token_claims"] = claims
        assert self._refreshed is not None
        self._refreshed.set()
        frame = {"type": "token_refreshed", "expires_in": round(claims["exp"] - time.time())}
        await self.send(text_data=jsonframes.dumps(frame))  # type: ignore[attr-defined]


def _authority_ended(user_pk: object, password: str) -> str | None:
    """Why a user authenticated with ``password`` (its hash) no longer is, if they are not."""
    stored = (
        get_user_model()._default_manager.filter(pk=user_pk).values("password", "is_active").first()
    )
    if stored is None:
        return "deleted"
    if not stored["is_active"]:
        return "deactivated"
    if stored["password"] != password:
        return "password_changed"
    return None


def _ended_sessions(keys: set[str]) -> set[str]:
    """Which of ``keys`` name sessions that no longer exist or have expired."""
    store = import_string(f"{settings.SESSION_ENGINE}.SessionStore")
    if hasattr(store, "get_model_class"):  # database-backed: one query per 500 keys
        model = store.get_model_class()
        alive: set[str] = set()
        ordered = sorted(keys)
        for start in range(0, len(ordered), 500):
            alive.update(
                model.objects.filter(
                    session_key__in=ordered[start : start + 500], expire_date__gt=timezone.now()
                ).values_list("session_key", flat=True)
            )
        return keys - alive
    return {key for key in keys if not store(session_key=key).load()}


class SessionWatch:
    """Per worker process: the session-authenticated sockets and a periodic check of their
    sessions."""

    def __init__(self) -> None:
        self._sockets: weakref.WeakKeyDictionary[SocketAuthority, str] = weakref.WeakKeyDictionary()
        self._task: asyncio.Task | None = None

    def watch(self, consumer: SocketAuthority, session_key: str) -> None:
        self._sockets[consumer] = session_key
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._check_forever())

    def forget(self, consumer: SocketAuthority) -> None:
        self._sockets.pop(consumer, None)

    def key_of(self, consumer: SocketAuthority) -> str | None:
        """The session key ``consumer`` authenticated with, if it is a watched session socket."""
        return self._sockets.get(consumer)

    async def _check_forever(self) -> None:
        while self._sockets:
            await asyncio.sleep(settings.WS_SESSION_RECHECK)
            try:
                await self.check_now()
            except Exception:  # a database hiccup must not end the watch
                logger.warning("session check failed", exc_info=True)

    async def check_now(self) -> None:
        watched = list(self._sockets.items())
        if not watched:
            return
        ended = await database_sync_to_async(_ended_sessions)({key for _, key in watched})
        for consumer, key in watched:
            if key in ended and consumer in self._sockets:  # still open
                await consumer.end_authority("session_ended")


sessions = SessionWatch()
