"""The no-Django upper bound: a plain ``websockets`` server fanning out through Redis pub/sub.

    python -m loadtests.baselines.nodjango --port 8201 --name nodjango1   (REDIS_URL from the env)

It speaks Switchboard's chat protocol (``/ws/chat/<room>/``, ``{"message": ..., "ref": ...}`` in,
frames with type, id, message, user, room, ref, sent_by, delivered_by and username out) with as
little work per delivery as Python allows, so ``loadtests compare`` can show how close the Django
stack gets to it:

* one Redis channel per room; a process subscribes while it holds a member of that room;
* a client message is validated, stamped and PUBLISHed once;
* a published message is decoded once per process, stamped ``delivered_by``, encoded once and
  written to every local member with ``websockets.broadcast`` (no task, no await per member).

Behind the same nginx as Switchboard, on loopback. Origin must name an allowed host; /readyz
answers 200 for the stack launcher. Not an app: no auth, no rate limit, nothing stored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import socket
import uuid
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

ROOM_PATH = re.compile(r"^/ws/chat/([A-Za-z0-9_-]{1,64})/$")
ALLOWED_ORIGIN_HOSTS = {"localhost", "127.0.0.1", "::1"}
MAX_MESSAGE_CHARS = 4000
CHANNEL_PREFIX = "nodjango.room."
#: Subscribed from the start, so the reader's ``listen()`` always has something to wait on.
IDLE_CHANNEL = "nodjango.idle"

logger = logging.getLogger("nodjango")


class FanoutServer:
    def __init__(self, redis_url: str, name: str) -> None:
        self.process = f"{name}:{os.getpid()}"
        self.redis = aioredis.Redis.from_url(redis_url, max_connections=1000)
        self.pubsub = self.redis.pubsub()
        self.rooms: dict[str, set[ServerConnection]] = {}
        self.subscriptions: dict[str, asyncio.Future[Any]] = {}

    async def reader(self) -> None:
        """Every published message: decode once, stamp, encode once, write to local members."""
        await self.pubsub.subscribe(IDLE_CHANNEL)
        async for item in self.pubsub.listen():
            if item.get("type") != "message":
                continue
            channel = item["channel"].decode()
            members = self.rooms.get(channel[len(CHANNEL_PREFIX) :])
            if not members:
                continue
            event = orjson.loads(item["data"])
            event["delivered_by"] = self.process
            broadcast(members, orjson.dumps(event).decode())

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Refuse what Switchboard refuses; join the room *before* the 101, as Channels does."""
        if request.path == "/readyz":
            return connection.respond(HTTPStatus.OK, "ready\n")
        origin = request.headers.get("Origin")
        if origin is None or urlsplit(origin).hostname not in ALLOWED_ORIGIN_HOSTS:
            return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        match = ROOM_PATH.match(request.path)
        if match is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "no such endpoint\n")
        room = match.group(1)
        subscribed = self.subscriptions.get(room)
        if subscribed is None:
            subscribed = self.subscriptions[room] = asyncio.ensure_future(
                self.pubsub.subscribe(CHANNEL_PREFIX + room)
            )
        await asyncio.shield(subscribed)
        self.rooms.setdefault(room, set()).add(connection)
        return None

    async def handler(self, ws: ServerConnection) -> None:
        room = ROOM_PATH.match(ws.request.path).group(1)
        channel = CHANNEL_PREFIX + room
        try:
            async for text in ws:
                await self.on_message(ws, room, channel, text)
        finally:
            members = self.rooms.get(room, set())
            members.discard(ws)
            if not members:
                self.rooms.pop(room, None)
                self.subscriptions.pop(room, None)
                with contextlib.suppress(Exception):
                    await self.pubsub.unsubscribe(channel)

    async def on_message(self, ws: ServerConnection, room: str, channel: str, text: Any) -> None:
        try:
            data = orjson.loads(text)
            message = data["message"]
            ref = data.get("ref")
        except (ValueError, KeyError, TypeError, AttributeError):
            await ws.send(orjson.dumps({"type": "error", "code": "invalid_json"}).decode())
            return
        if not isinstance(message, str) or not message.strip() or len(message) > MAX_MESSAGE_CHARS:
            await ws.send(orjson.dumps({"type": "error", "code": "invalid_message"}).decode())
            return
        event = {
            "type": "chat.message",
            "id": uuid.uuid4().hex,
            "message": message,
            "user": "anonymous",
            "username": "anonymous",
            "room": room,
            "sent_by": self.process,
        }
        if isinstance(ref, str):
            event["ref"] = ref[:64]
        await self.redis.publish(channel, orjson.dumps(event))


async def main(port: int, name: str) -> None:
    server = FanoutServer(os.environ["REDIS_URL"], name)
    reader = asyncio.create_task(server.reader())
    async with serve(
        server.handler,
        "127.0.0.1",
        port,
        process_request=server.process_request,
        compression=None,
        max_size=65536,
        ping_interval=20,
        ping_timeout=20,
        server_header=None,
    ) as ws_server:
        logger.warning("nodjango %s listening on 127.0.0.1:%d", server.process, port)
        await asyncio.wait(
            [reader, asyncio.ensure_future(ws_server.serve_forever())],
            return_when=asyncio.FIRST_COMPLETED,
        )
    reader.result()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.baselines.nodjango")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default=f"{socket.gethostname()}-nodjango")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    import uvloop

    uvloop.run(main(options.port, options.name))


if __name__ == "__main__":
    cli()
