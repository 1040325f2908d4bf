"""The chat consumer: one room group per room, every frame stamped with the serving processes."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.conf import settings

from channel_layer.membership import keeper
from chat.protocol import ErrorCode, ProtocolError, is_valid_room, parse_client_frame, room_group
from observability import metrics
from realtime import jsonframes
from realtime.consumers import GroupMemberConsumer
from realtime.identity import process_id
from realtime.ratelimit import TokenBucket

logger = logging.getLogger("chat")

#: Close code for a refused room name (4000-4999 are the application's).
CLOSE_INVALID_ROOM = 4400
#: Close code for a connection that kept flooding past its rate limit (RFC 6455).
CLOSE_POLICY_VIOLATION = 1008


class ChatConsumer(GroupMemberConsumer):
    async def connect(self) -> None:
        self.room = self.scope["url_route"]["kwargs"]["room"]
        if not is_valid_room(self.room):
            await self.refuse(
                ErrorCode.INVALID_ROOM,
                "Room names are 1-64 characters of A-Z, a-z, 0-9, '_' and '-'.",
                CLOSE_INVALID_ROOM,
            )
            return
        user = self.scope.get("user")
        self.username = user.username if user is not None and user.is_authenticated else "anonymous"
        self.bucket = TokenBucket(settings.CHAT_RATE_PER_SECOND, settings.CHAT_RATE_BURST)
        self.refused_in_a_row = 0
        self.flood_closed = False
        self.group = room_group(self.room)
        await self.join(self.group)
        await self.accept()
        logger.info("connect %s room=%s user=%s", self.client, self.room, self.username)

    async def disconnect(self, code: int) -> None:
        if getattr(self, "group", None):
            logger.info("disconnect %s room=%s code=%s", self.client, self.room, code)

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
        await self.send_frame(encoded_frame(event))


#: The frames this process encoded last, by message id. Every member a process delivers one
#: message to gets the same text (``delivered_by`` is the process), so it is encoded once.
_FRAMES: dict[str, str] = {}
_FRAMES_KEPT = 1024


def encoded_frame(event: dict[str, Any]) -> str:
    """The JSON text frame of a ``chat.message`` event, as this process delivers it."""
    text = _FRAMES.get(event["id"])
    if text is None:
        frame = {key: value for key, value in event.items() if key != "type"}
        # "username" keeps the seeds' clients (data.username) working beside "user".
        frame.update(type="chat.message", username=event["user"], delivered_by=process_id())
        text = jsonframes.dumps(frame)
        if len(_FRAMES) >= _FRAMES_KEPT:
            del _FRAMES[next(iter(_FRAMES))]
        _FRAMES[event["id"]] = text
    return text
