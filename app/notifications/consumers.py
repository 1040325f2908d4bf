"""``/ws/notifications/``: one group per user, authenticated users only.

Stored notifications (the ``Notification`` model) missed while disconnected are replayed on
connect: a client that reconnects with ``?since=<last notification_id it saw>`` first gets every
stored notification after that id (at most REPLAY_LIMIT), marked ``"source": "replay"``.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs

from notifications.models import Notification
from notifications.publish import user_group
from realtime import jsonframes
from realtime.consumers import GroupMemberConsumer
from realtime.identity import process_id

logger = logging.getLogger("notifications")

#: Close codes (4000-4999 are the application's); 4401 mirrors HTTP 401.
CLOSE_AUTH_REQUIRED = 4401
REPLAY_LIMIT = 100


class NotificationConsumer(GroupMemberConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.refuse(
                "auth_required", "Log in first: notifications are per user.", CLOSE_AUTH_REQUIRED
            )
            return
        self.user_id = user.pk
        session = self.scope.get("session")
        self.session_key = session.session_key if session is not None else None
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
        stored = Notification.objects.filter(user_id=self.user_id, pk__gt=since).order_by("pk")
        async for note in stored[:REPLAY_LIMIT]:
            await self.notification(
                {
                    "id": f"stored-{note.pk}",
                    "notification_type": note.kind,
                    "message": note.message,
                    "data": {"notification_id": note.pk, "source": "replay"},
                    "sent_by": process_id(),
                }
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.send_error("read_only", "This socket only delivers notifications.")

    async def notification(self, event: dict[str, Any]) -> None:
        frame = {key: value for key, value in event.items() if key != "type"}
        frame.update(type="notification", delivered_by=process_id())
        await self.send(text_data=jsonframes.dumps(frame))

    async def session_ended(self, event: dict[str, Any]) -> None:
        if event.get("session_key") == (self.session_key or ""):
            logger.info("logout closes %s notifications user=%s", self.client, self.user_id)
            await self.send_error("logged_out", "The session ended.")
            await self.close(code=CLOSE_AUTH_REQUIRED)
