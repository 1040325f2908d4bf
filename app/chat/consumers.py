"""The chat consumer: one room group per room, every frame stamped with the serving processes."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings

from channel_layer.membership import keeper
from chat import presence
from chat.protocol import (
    EVENT_SCHEMAS,
    ErrorCode,
    PresenceQuery,
    ProtocolError,
    RecoveryRequest,
    is_valid_room,
    parse_client_frame,
    parse_recovery,
    room_group,
)
from observability import metrics
from realtime import jsonframes
from realtime.consumers import CLOSE_TRY_AGAIN_LATER, GroupMemberConsumer
from realtime.identity import process_id
from realtime.ratelimit import TokenBucket

logger = logging.getLogger("chat")

#: Close code for a refused room name or recovery request (4000-4999 are the application's).
CLOSE_INVALID_ROOM = 4400
#: Close code for a connection that kept flooding past its rate limit (RFC 6455).
CLOSE_POLICY_VIOLATION = 1008


class ChatConsumer(GroupMemberConsumer):
    event_schemas = EVENT_SCHEMAS
    frame_handlers = {"chat.message": "chat_frame"}

    async def connect(self) -> None:
        self.room = self.scope["url_route"]["kwargs"]["room"]
        if not is_valid_room(self.room):
            await self.refuse(
                ErrorCode.INVALID_ROOM,
                "Room names are 1-64 characters of A-Z, a-z, 0-9, '_' and '-'.",
                CLOSE_INVALID_ROOM,
            )
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        try:
            recovery = parse_recovery(query, max_history=settings.CHAT_HISTORY_MAX)
        except ProtocolError as error:
            await self.refuse(error.code, error.detail, CLOSE_INVALID_ROOM)
            return
        user = self.scope.get("user")
        self.username = user.username if user is not None and user.is_authenticated else "anonymous"
        self.bucket = TokenBucket(settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST)
        self.refused_in_a_row = 0
        self.flood_closed = False
        self.presence_events = False  # join/leave events, once the client asked for presence
        self.replayed_through: tuple[str, int] | None = None  # see _recover
        self.group = room_group(self.room)
        await self.join(self.group)
        await self.accept()
        logger.info("connect %s room=%s user=%s", self.client, self.room, self.username)
        if recovery is not None and not await self._recover(recovery):
            return
        try:
            change = await presence.enter(self.room, self.username, self.channel_name)
        except Exception as exc:  # best effort: the next refresh writes the entry
            logger.warning("presence enter failed for room=%s (%s)", self.room, type(exc).__name__)
        else:
            if change.user_connections == 1 and change.announce():
                await self._announce("presence.join")

    async def _recover(self, request: RecoveryRequest) -> bool:
        """Replay what the client asked for, then the ``recovery`` frame; ``False`` when the
        connection was closed instead (bad ``since``, or the history could not be read).

        The socket joined the room before the history is read, so a message published
        meanwhile is both in the replay and waiting in this consumer's mailbox: live delivery
        resumes strictly after the offset the replay reached (:meth:`chat_message`).
        """
        read = getattr(self.channel_layer, "group_history", None)
        if settings.CHAT_HISTORY_SIZE == 0 or read is None:
            # No history kept: a resume cannot be served; a history request has all there is.
            await self._send_recovery(request.history is not None, "", 0)
            return True
        try:
            if request.history is not None:
                page = await read(self.group, last=request.history, ttl=settings.CHAT_HISTORY_TTL)
            else:
                page = await read(self.group, since=request.since, ttl=settings.CHAT_HISTORY_TTL)
        except Exception as exc:
            logger.warning("history unavailable for room=%s (%s)", self.room, type(exc).__name__)
            await self.send_error(
                ErrorCode.UNAVAILABLE,
                "The server cannot read this room's history right now; reconnect shortly.",
            )
            await self.close(code=CLOSE_TRY_AGAIN_LATER)
            return False
        recovered = True
        if request.since is not None:
            same_epoch = page.epoch == request.epoch
            if same_epoch and request.since > page.offset:
                await self.send_error(
                    ErrorCode.INVALID_SINCE,
                    f"since={request.since} is past this room's latest offset ({page.offset}).",
                )
                await self.close(code=CLOSE_INVALID_ROOM)
                return False
            # Never a partial replay that looks complete: all of the gap, or nothing.
            recovered = same_epoch and page.covers(request.since)
        if recovered:
            for event in page.messages:
                await self.send_frame(encoded_frame(event))
        self.replayed_through = (page.epoch, page.offset)
        await self._send_recovery(recovered, page.epoch, page.offset)
        return True

    async def _send_recovery(self, recovered: bool, epoch: str, offset: int) -> None:
        frame = {"type": "recovery", "recovered": recovered, "epoch": epoch, "offset": offset}
        await self.send_frame(jsonframes.dumps(frame))

    async def disconnect(self, code: int) -> None:
        if getattr(self, "group", None):
            logger.info("disconnect %s room=%s code=%s", self.client, self.room, code)
            change = await presence.leave(self.room, self.username, self.channel_name)
            if change is not None and change.user_connections == 0 and change.announce():
                await self._announce("presence.leave")

    async def _announce(self, kind: str) -> None:
        """Tell the room that this user came or went (best effort: presence is not chat)."""
        with contextlib.suppress(Exception):
            await self.channel_layer.group_send(
                self.group, {"type": kind, "user": self.username, "room": self.room}
            )

    async def presence_join(self, event: dict[str, Any]) -> None:
        # Only to sockets that asked for presence: older clients (the tutorials' among them)
        # read every frame as a chat message. Not about oneself: a user's join is sent for
        # their first socket, which is this one.
        if self.presence_events and event["user"] != self.username:
            await self.send_frame(_presence_frame(event))

    async def presence_leave(self, event: dict[str, Any]) -> None:
        if self.presence_events:
            await self.send_frame(_presence_frame(event))

    async def _answer_presence(self) -> None:
        self.presence_events = True
        try:
            present = await presence.who(self.room)
        except Exception as exc:
            logger.info("presence refused for room=%s (%s)", self.room, type(exc).__name__)
            await self.send_error(
                ErrorCode.UNAVAILABLE, "Presence is unavailable right now; ask again shortly."
            )
            return
        await self.send_frame(jsonframes.dumps({"type": "presence", "room": self.room, **present}))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if getattr(self, "group", None) is None or self.flood_closed:
            return  # refused or closed: a frame that raced the close has nowhere to go
        # Every frame counts against the rate, garbage included: each one costs an answer.
        if not self.bucket.take():
            await self._over_the_rate()
            return
        self.refused_in_a_row = 0
        if text_data is None:
            await self.send_error(
                ErrorCode.BINARY_NOT_SUPPORTED, "Send JSON in text frames, not binary frames."
            )
            return
        try:
            incoming = parse_client_frame(text_data, max_chars=settings.CHAT_MAX_MESSAGE_CHARS)
        except ProtocolError as error:
            await self.send_error(error.code, error.detail)
            return
        if isinstance(incoming, PresenceQuery):
            await self._answer_presence()
            return
        event: dict[str, Any] = {
            "type": "chat.message",
            "id": uuid.uuid4().hex,
            "message": incoming.text,
            "user": self.username,
            "room": self.room,
            "sent_by": process_id(),
        }
        if incoming.ref is not None:
            event["ref"] = incoming.ref
        try:
            if not keeper.available:  # Redis down, or memberships not restored yet
                raise ConnectionError("channel layer recovering")
            if settings.CHAT_HISTORY_SIZE and hasattr(self.channel_layer, "group_send_recorded"):
                await self.channel_layer.group_send_recorded(
                    self.group,
                    metrics.stamp(event),
                    size=settings.CHAT_HISTORY_SIZE,
                    ttl=settings.CHAT_HISTORY_TTL,
                )
            else:
                await self.channel_layer.group_send(self.group, metrics.stamp(event))
        except Exception as exc:  # Redis unreachable: the sender is told, nothing is queued
            logger.info("group_send refused for room=%s (%s)", self.room, type(exc).__name__)
            keeper.poke()
            await self.send_error(
                ErrorCode.UNAVAILABLE,
                "The message could not be delivered (channel layer unavailable); send it again.",
            )

    async def _over_the_rate(self) -> None:
        """Answer ``rate_limited``; close a connection that goes on flooding regardless.

        Only the first refusal of a run is logged, so a flood cannot flood the log.
        """
        self.refused_in_a_row += 1
        if self.refused_in_a_row == 1:
            logger.info("rate limited %s room=%s", self.client, self.room)
        if self.refused_in_a_row > settings.CHAT_FLOOD_CLOSE_AFTER:
            logger.warning(
                "flood: closing %s room=%s after %d frames in a row over the rate limit",
                self.client,
                self.room,
                self.refused_in_a_row - 1,
            )
            self.flood_closed = True  # frames already on their way are dropped
            await self.close(code=CLOSE_POLICY_VIOLATION)
            return
        await self.send_error(
            ErrorCode.RATE_LIMITED,
            f"Slow down: at most {settings.CHAT_RATE_PER_SECOND:g} messages per second "
            f"(bursts of {settings.CHAT_RATE_BURST}).",
        )

    async def chat_message(self, event: dict[str, Any]) -> None:
        text = self.chat_frame(event)
        if text is not None:
            await self.send_frame(text)

    def chat_frame(self, event: dict[str, Any]) -> str | None:
        """The frame :meth:`chat_message` sends for ``event``, if any (``frame_handlers``)."""
        if self.replayed_through is not None:
            epoch, offset = self.replayed_through
            if event.get("epoch") == epoch and event.get("offset", 0) <= offset:
                return None  # the replay sent it (or the client reloads it: recovered false)
        return encoded_frame(event)


#: The frames this process encoded last, by message id. Every member a process delivers one
#: message to gets the same text (``delivered_by`` is the process), so it is encoded once.
_FRAMES: dict[str, str] = {}
_FRAMES_KEPT = 1024


def encoded_frame(event: dict[str, Any]) -> str:
    """The JSON text frame of a ``chat.message`` event, as this process delivers it."""
    text = _FRAMES.get(event["id"])
    if text is None:
        # Keys starting with "_" are internal (the metrics' acceptance stamp, which a replay
        # from history still carries): never part of a client frame.
        frame = {key: value for key, value in event.items() if key != "type" and key[0] != "_"}
        # "username" keeps the seeds' clients (data.username) working beside "user".
        frame.update(type="chat.message", username=event["user"], delivered_by=process_id())
        text = jsonframes.dumps(frame)
        if len(_FRAMES) >= _FRAMES_KEPT:
            del _FRAMES[next(iter(_FRAMES))]
        _FRAMES[event["id"]] = text
    return text


def _presence_frame(event: dict[str, Any]) -> str:
    return jsonframes.dumps({"type": event["type"], "user": event["user"], "room": event["room"]})
