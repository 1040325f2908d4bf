"""``python -m switchboard_client``: argument parsing and the chat loop."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import switchboard_client

SUBPROTOCOL = "switchboard.v1"
#: Close codes after which reconnecting cannot help (4401 gets a new token first).
FINAL_CLOSE_CODES = {4400, 4403, 4404, 4429}
MAX_BACKOFF_SECONDS = 30.0
STABLE_SECONDS = 10.0


class TokenError(Exception):
    """The server would not issue a token (bad key, inactive user...)."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ChatClient:
    def __init__(self, url: str, room: str, api_key: str, context: ssl.SSLContext) -> None:
        self.base_url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        self.ws_url = f"{scheme}://{parts.netloc}/ws/chat/{urllib.parse.quote(room)}/"
        self.room = room
        self.api_key = api_key
        self.context = context

    def fetch_token(self) -> str:
        """A connection token limited to this room (synchronous: urllib, run in a thread)."""
        request = urllib.request.Request(  # noqa: S310 (the URL is the user's https server)
            self.base_url + "/api/ws-token/",
            data=json.dumps({"rooms": [self.room]}).encode(),
            headers={
                "Authorization": f"Bearer {self.api_key}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as response:  # noqa: S310
                return json.load(response)["token"]
        except urllib.error.HTTPError as exc:
            try:
                detail = json.load(exc).get("detail", "")
            except ValueError:
                detail = ""
            raise TokenError(f"token refused: HTTP {exc.code} {detail}".strip()) from None

    async def token(self) -> str:
        return await asyncio.to_thread(self.fetch_token)

    async def run(self, lines: asyncio.Queue[str | None]) -> int:
        backoff = 0.5
        opened_at = time.monotonic()
        while True:
            try:
                token = await self.token()
                async with connect(
                    self.ws_url,
                    ssl=self.context if self.ws_url.startswith("wss") else None,
                    subprotocols=[SUBPROTOCOL, f"token.{token}"],  # type: ignore[list-item]
                    open_timeout=10,
                ) as ws:
                    _say(f"* joined {self.room}")
                    opened_at = time.monotonic()
                    finished = await self._talk(ws, lines)
                    if finished:
                        return 0
            except TokenError as exc:
                _say(f"* {exc}")
                return 1
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                _say(f"* disconnected ({code})")
                if code in FINAL_CLOSE_CODES:
                    return 1
                # 4401 (authority ended) reconnects with a new token, or ends in TokenError.
                # A connection that lasted resets the backoff; one refused at once does not.
                if time.monotonic() - opened_at > STABLE_SECONDS:
                    backoff = 0.5
            except (OSError, InvalidStatus, TimeoutError) as exc:
                _say(f"* cannot connect: {exc}")
            delay = random.uniform(0, backoff)  # noqa: S311 (jitter)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            await asyncio.sleep(delay)

    async def _talk(self, ws: ClientConnection, lines: asyncio.Queue[str | None]) -> bool:
        """Relay until stdin ends (True) or the connection closes (ConnectionClosed)."""

        async def read_socket() -> None:
            async for text in ws:
                await self._on_frame(ws, json.loads(text))

        reader = asyncio.create_task(read_socket())
        try:
            while True:
                next_line = asyncio.create_task(lines.get())
                done, _ = await asyncio.wait(
                    {reader, next_line}, return_when=asyncio.FIRST_COMPLETED
                )
                if reader in done:
                    next_line.cancel()
                    reader.result()  # raises ConnectionClosed
                    await ws.close()
                    raise ConnectionClosed(ws.close_rcvd, ws.close_sent)
                line = next_line.result()
                if line is None:
                    await ws.close()
                    return True
                if line.strip():
                    await ws.send(json.dumps({"message": line}))
        finally:
            reader.cancel()

    async def _on_frame(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "chat.message":
            print(f"{frame.get('user')}: {frame.get('message')}", flush=True)
        elif kind == "token_expiring":
            try:
                token = await self.token()
            except TokenError as exc:
                _say(f"* cannot refresh the token: {exc}")
                return
            await ws.send(json.dumps({"type": "refresh", "token": token}))
        elif kind == "token_refreshed":
            _say(f"* token refreshed ({frame.get('expires_in')} s)")
        elif kind == "error":
            _say(f"* error {frame.get('code')}: {frame.get('detail')}")


async def _pump_stdin(lines: asyncio.Queue[str | None]) -> None:
    """Lines typed (or piped) on stdin, then ``None`` at end of input."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        await lines.put(line.decode(errors="replace").rstrip("\r\n"))
    await lines.put(None)


async def _chat(args: argparse.Namespace) -> int:
    api_key = args.api_key_file.read_text().strip() if args.api_key_file else ""
    api_key = api_key or os.environ.get("SWITCHBOARD_API_KEY", "")
    if not api_key:
        _say("* no API key: --api-key-file FILE or SWITCHBOARD_API_KEY")
        return 2
    context = ssl.create_default_context(cafile=str(args.cacert) if args.cacert else None)
    client = ChatClient(args.url, args.room, api_key, context)
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    stdin = asyncio.create_task(_pump_stdin(lines))
    try:
        return await client.run(lines)
    finally:
        stdin.cancel()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m switchboard_client",
        description=switchboard_client.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="join a room: print messages, send lines typed")
    chat.add_argument("room")
    chat.add_argument("--url", default="https://localhost:8443", help="the server's base URL")
    chat.add_argument("--api-key-file", type=Path, help="file holding the API key")
    chat.add_argument("--cacert", type=Path, help="CA file to verify the server (.run/tls/ca.crt)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(_chat(args))
    except KeyboardInterrupt:
        return 130
