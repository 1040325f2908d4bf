"""Sending notifications from synchronous code: views, signals, management commands, tasks.

``notify_user`` goes through the channel layer, so the user's sockets receive it whichever
replica and worker process holds them -- and whichever process calls it, including one that
serves no websockets at all.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis.exceptions
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from observability import metrics
from realtime.identity import process_id

#: What a push raises when the channel layer (Redis) is unreachable: the default layer's
#: ``RedisUnavailable`` is a ``ConnectionError`` (an ``OSError``); channels-redis raises redis-py's.
PUSH_ERRORS = (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def user_group(user_id: int) -> str:
    """The group of one user's notification sockets (no room name can contain a dot)."""
    return f"notifications.user.{int(user_id)}"


def notify_user(
    user_id: int,
    message: str,
    *,
    notification_type: str = "info",
    data: dict[str, Any] | None = None,
) -> str:
    """Push a notification to every open socket of ``user_id``; returns its id."""
    event_id = uuid.uuid4().hex
    async_to_sync(get_channel_layer().group_send)(
        user_group(user_id),
        metrics.stamp(
            {
                "type": "notification",
                "id": event_id,
                "notification_type": notification_type,
                "message": message,
                "data": data or {},
                "sent_by": process_id(),
            }
        ),
    )
    return event_id
