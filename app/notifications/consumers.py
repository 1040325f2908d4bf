"""``/ws/notifications/``: one group per user, authenticated users only.

Stored notifications (the ``Notification`` model) missed while disconnected are replayed on
connect: a client that reconnects with ``?since=<last notification_id it saw>`` first gets every
stored notification after that id, oldest first, marked ``"source": "replay"``, in pages of
:data:`REPLAY_PAGE` up to ``NOTIFICATIONS_REPLAY_MAX`` per connect. When more remain, a
``{"type": "replay.more", "since": <last id sent>}`` frame says so: a client that reconnects
with that ``since`` gets the rest, so none is skipped silently.

The socket joins the user's group *before* the replay, so nothing stored meanwhile is missed;
a live push of a notification the replay already sent (it waits behind the replay) is not
delivered a second time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.conf import settings

from notifications.models import Notification
from notifications.publish import user_group
from realtime import jsonframes
from realtime.consumers import GroupMemberConsumer
from realtime.identity import process_id

logger = logging.getLogger("notifications")

#: Close codes (4000-4999 are the application's); 4401 mirrors HTTP 401.
CLOSE_AUTH_REQUIRED = 4401
#: Stored notifications read per database query during a replay.
REPLAY_PAGE = 100
#: How long after a replay a live push of a replayed notification is recognised as a duplicate.
#: Such a push was issued when its row committed, before the replay read it: it is queued
#: behind the replay or a few milliseconds away, never minutes.
REPLAY_DEDUP_SECONDS = 30.0


class NotificationConsumer(GroupMemberConsumer):
    #: Ids a replay sent, whose live push is dropped if it arrives (see REPLAY_DEDUP_SECONDS).
    #: Empty and shared until a socket replays: most never do, and sockets are many.
    replayed: set[int] | frozenset[int] = frozenset()

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.refuse(
                "auth_required", "Log in first: notifications are per user.", CLOSE_AUTH_REQUIRED
            )
            return
        self.user_id = user.pk
        await self.join(user_group(user.pk))
        await self.accept()
        logger.info("connect %s notifications user=%s", self.client, user.pk)
        await self._replay_since()

    async def _replay_since(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        try:
            since = int(query["since"][0])
        except (KeyError, ValueError):
            return
        self.replayed = set()
        budget = settings.NOTIFICATIONS_REPLAY_MAX
        while budget > 0:
            page = await _stored_after(self.user_id, since, min(REPLAY_PAGE, budget))
            for note in page:
                self.replayed.add(note.pk)
                await self._send_notification(
                    {
                        "id": f"stored-{note.pk}",
                        "notification_type": note.kind,
                        "message": note.message,
                        "data": {"notification_id": note.pk, "source": "replay"},
                        "sent_by": process_id(),
                    }
                )
                since = note.pk
            budget -= len(page)
            if len(page) < REPLAY_PAGE:
                break
        if self.replayed:
            asyncio.get_running_loop().call_later(REPLAY_DEDUP_SECONDS, self.replayed.clear)
        if budget == 0 and await _stored_after(self.user_id, since, 1):
            await self.send(
                text_data=jsonframes.dumps(
                    {
                        "type": "replay.more",
                        "since": since,
                        "detail": "More stored notifications remain: reconnect with this since.",
                    }
                )
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.send_error("read_only", "This socket only delivers notifications.")

    async def notification(self, event: dict[str, Any]) -> None:
        data = event.get("data")
        stored_id = data.get("notification_id") if isinstance(data, dict) else None
        if type(stored_id) is int and stored_id in self.replayed:
            self.replayed.discard(stored_id)  # its live push arrives once, after the replay
            return
        await self._send_notification(event)

    async def _send_notification(self, event: dict[str, Any]) -> None:
        frame = {key: value for key, value in event.items() if key != "type"}
        frame.update(type="notification", delivered_by=process_id())
        await self.send(text_data=jsonframes.dumps(frame))


@database_sync_to_async
def _stored_after(user_id: int, since: int, limit: int) -> list[Notification]:
    """Up to ``limit`` of the user's stored notifications after ``since``, oldest first."""
    return list(Notification.objects.filter(user_id=user_id, pk__gt=since).order_by("pk")[:limit])
