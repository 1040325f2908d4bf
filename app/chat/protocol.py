"""The wire protocol of ``/ws/chat/<room>/``: parsing client frames and naming errors.

Clients send ``{"message": "<text>", "ref": "<optional, echoed back>"}``, or
``{"type": "presence"}`` to ask who is in the room. Anything else is
answered with ``{"type": "error", "code": <one of ErrorCode>, "detail": <text>}`` and the
connection stays open. The codes are part of the public protocol: never rename one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from realtime import jsonframes
from realtime.events import EventSchema

ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_REF_CHARS = 64


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_MESSAGE = "missing_message"
    INVALID_MESSAGE = "invalid_message"
    EMPTY_MESSAGE = "empty_message"
    MESSAGE_TOO_LONG = "message_too_long"
    INVALID_REF = "invalid_ref"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    RATE_LIMITED = "rate_limited"
    INVALID_ROOM = "invalid_room"
    UNAVAILABLE = "unavailable"
    INVALID_SINCE = "invalid_since"
    INVALID_HISTORY = "invalid_history"


#: The internal events a chat consumer handles, and what each must carry: a ``chat.message``
#: group event becomes the frame of the public protocol above (the README's "Receiving").
#: Anyone may send one (a view, a task, another service); one that does not match is dropped
#: by the consumer and logged, never delivered half-formed nor allowed to close the room.
EVENT_SCHEMAS = {
    "chat.message": EventSchema(
        required={"id": str, "message": str, "user": str, "room": str, "sent_by": str},
        optional={"ref": str, "offset": int, "epoch": str},
    ),
    "presence.join": EventSchema(required={"user": str, "room": str}),
    "presence.leave": EventSchema(required={"user": str, "room": str}),
}


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ChatMessage:
    text: str
    ref: str | None


@dataclass(frozen=True)
class PresenceQuery:
    """``{"type": "presence"}``: who is in the room."""


@dataclass(frozen=True)
class RecoveryRequest:
    """What a connect asked to be replayed: everything after ``since`` in ``epoch`` (resume), or
    the ``history`` last messages."""

    since: int | None = None
    epoch: str | None = None
    history: int | None = None


#: Epochs are short hex strings; anything longer is not one of ours.
MAX_EPOCH_CHARS = 64


def parse_recovery(query: dict[str, list[str]], *, max_history: int) -> RecoveryRequest | None:
    """``?since=<offset>&epoch=<epoch>`` or ``?history=<n>`` from a connect's query string."""
    since, epoch, history = query.get("since"), query.get("epoch"), query.get("history")
    if since is None and history is None:
        return None
    if since is not None and history is not None:
        raise ProtocolError(ErrorCode.INVALID_SINCE, "Ask for since or for history, not both.")
    if history is not None:
        value = history[-1]
        if not (value.isascii() and value.isdigit()) or int(value) > max_history:
            raise ProtocolError(
                ErrorCode.INVALID_HISTORY, f"history must be an integer from 0 to {max_history}."
            )
        return RecoveryRequest(history=int(value))
    value = since[-1]  # type: ignore[index]
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise ProtocolError(ErrorCode.INVALID_SINCE, "since must be a non-negative integer offset.")
    if epoch is None or not epoch[-1] or len(epoch[-1]) > MAX_EPOCH_CHARS:
        raise ProtocolError(
            ErrorCode.INVALID_SINCE, "since needs the epoch its offset was seen in (&epoch=)."
        )
    return RecoveryRequest(since=int(value), epoch=epoch[-1])


def is_valid_room(name: str) -> bool:
    return ROOM_NAME.fullmatch(name) is not None


def room_group(room: str) -> str:
    """The channel-layer group of a room.

    Only called with names that passed :func:`is_valid_room`; the ``chat.`` prefix keeps room
    groups apart from per-user notification groups (``notifications.user.<pk>``), whose names
    contain a dot that no room name can.
    """
    return f"chat.{room}"


def parse_client_frame(text: str, *, max_chars: int) -> ChatMessage | PresenceQuery:
    try:
        data = jsonframes.loads(text)
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "The frame is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.NOT_AN_OBJECT, 'Send a JSON object: {"message": "..."}.')
    if data.get("type") == "presence":
        return PresenceQuery()
    if "message" not in data:
        raise ProtocolError(ErrorCode.MISSING_MESSAGE, 'The object has no "message" field.')
    message = data["message"]
    if not isinstance(message, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, '"message" must be a string.')
    if not message.strip():
        raise ProtocolError(ErrorCode.EMPTY_MESSAGE, '"message" is empty.')
    if len(message) > max_chars:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LONG,
            f'"message" has {len(message)} characters; the limit is {max_chars}.',
        )
    ref = data.get("ref")
    if ref is not None and (not isinstance(ref, str) or len(ref) > MAX_REF_CHARS):
        raise ProtocolError(
            ErrorCode.INVALID_REF, f'"ref" must be a string of at most {MAX_REF_CHARS} characters.'
        )
    return ChatMessage(text=message, ref=ref)
