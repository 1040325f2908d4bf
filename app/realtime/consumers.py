"""Base consumer shared by chat and notifications.

It adds what every long-lived group member needs:

* **Group renewal.** channels-redis forgets a membership after ``group_expiry`` seconds
  (default one day) and then silently stops delivering to that socket. Members re-add
  themselves at half that period.
* **Unknown events are logged, not fatal.** Channels raises ``ValueError`` for an event type
  with no handler, which kills the connection; code elsewhere (a view, a signal, another
  release) must not be able to disconnect clients by sending a new event type.
* **Errors to the client** as ``{"type": "error", "code": ..., "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from realtime import jsonframes

logger = logging.getLogger("switchboard.ws")


class GroupMemberConsumer(AsyncWebsocketConsumer):

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.joined: list[str] = []
        self._renewal: asyncio.Task | None = None

    @property
    def client(self) -> str:
        host, port = self.scope.get("client") or ("?", 0)
        return f"{host}:{port}"

    async def join(self, group: str) -> None:
        await self.channel_layer.group_add(group, self.channel_name)
        self.joined.append(group)
        if self._renewal is None:
            self._renewal = asyncio.create_task(self._renew_memberships())

    async def _renew_memberships(self) -> None:
        expiry = settings.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("group_expiry", 86400)
        while True:
            await asyncio.sleep(expiry / 2)
            for group in self.joined:
                try:
                    await self.channel_layer.group_add(group, self.channel_name)
                except Exception:
                    logger.warning("could not renew membership of %s", group, exc_info=True)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        for group in self.joined:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception:  # Redis down: the membership expires by itself.
                logger.warning("could not leave %s", group, exc_info=True)
        self.joined.clear()
        await self.disconnect(message.get("code", 1000))
        raise StopConsumer()

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler_name = message.get("type", "").replace(".", "_")
        if not handler_name.startswith("websocket_") and not hasattr(self, handler_name):
            logger.warning("ignored event of unknown type %r", message.get("type"))
            return
        await super().dispatch(message)

    async def send_error(self, code: str, detail: str) -> None:
        await self.send(text_data=jsonframes.dumps({"type": "error", "code": code, "detail": detail}))

    async def refuse(self, code: str, detail: str, close_code: int) -> None:
        """Accept only to say why, then close: browsers cannot read a refused handshake."""
        logger.info("refused %s %s: %s", self.client, self.scope.get("path"), code)
        await self.accept()
        await self.send_error(code, detail)
        await self.close(code=close_code)
