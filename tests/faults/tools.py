"""Clients and measurements shared by the fault tests (and the security tests).

``ChatClient`` stands in for the chat page (app/chat/static/chat/chat.js): one websocket to a
room through nginx, every frame recorded, and the same reconnect policy -- after any close that
is not the application's own 4000-4999, wait a random time in [0, min(15 s, 0.5 s * 2^attempt)]
and connect again. Figures measured by the tests are written to ``artifacts/faults/*.json`` (the
README's "Guarantees and failure modes" quotes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import websockets

from tests.harness import RunningStack, replica_of, room_path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"

#: chat.js's reconnect policy.
BASE_DELAY = 0.5
MAX_DELAY = 15.0


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Print the measured figures and keep them as an artifact."""
    folder = ARTIFACTS / "faults"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"\n{name}: {json.dumps(figures, sort_keys=True)}")


class ChatClient:
    """One chat page's websocket: records frames and closes; reconnects like chat.js.

    It also recovers like chat.js: after a reconnect it resumes from the last offset it saw
    (``?since=&epoch=``), and a live message whose offset skips ahead (a gap) or that starts a
    new epoch makes it resume at once. A message it already has is not recorded twice but
    counted (``duplicates``); ``recovery`` frames are kept (``recoveries``), and those with
    ``recovered: false`` are the losses the server reported.
    """

    def __init__(
        self,
        stack: RunningStack,
        room: str,
        *,
        reconnect: bool = True,
        name: str = "",
        url: str | None = None,
        **connect_kwargs: Any,
    ) -> None:
        self.stack = stack
        self.room = room
        self.reconnect = reconnect
        self.name = name
        self.url = url  # a replica's own ws:// URL instead of nginx
        self.connect_kwargs = connect_kwargs
        self.ws: websockets.ClientConnection | None = None
        self.frames: list[dict[str, Any]] = []
        #: (monotonic time, close code received or 1006 when none) per lost connection.
        self.closes: list[tuple[float, int]] = []
        #: Monotonic times of successful reconnections.
        self.reopened: list[float] = []
        #: Monotonic arrival time of each chat message, by ref.
        self.arrived_at: dict[str, float] = {}
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._arrived = asyncio.Event()
        #: The history position this client has everything up to (set by the first message).
        self.epoch: str | None = None
        self.offset = 0
        self.seen: set[tuple[str, int]] = set()
        self.duplicates = 0
        self.recoveries: list[dict[str, Any]] = []
        #: Resumes started by a live gap or a new epoch (not by a lost connection).
        self.gap_resumes = 0

    def _path(self) -> str:
        path = room_path(self.room)
        if self.epoch:
            path += f"?since={self.offset}&epoch={self.epoch}"
        return path

    async def _open(self) -> websockets.ClientConnection:
        if self.url is None:
            return await self.stack.connect(self._path(), **self.connect_kwargs)
        return await websockets.connect(
            self.url + self._path(),
            origin=self.stack.origin,
            open_timeout=10,
            **self.connect_kwargs,
        )

    def _position(self, frame: dict[str, Any]) -> str:
        """``"new"``, ``"duplicate"`` or ``"gap"`` for a chat message with an offset."""
        epoch, offset = frame["epoch"], frame["offset"]
        if (epoch, offset) in self.seen:
            return "duplicate"
        if self.epoch is None:  # the first message this client sees: it starts from there
            self.epoch, self.offset = epoch, offset - 1
        elif epoch != self.epoch:  # history lost (Redis emptied): start the new epoch over
            self.epoch, self.offset = epoch, 0
        if offset > self.offset + 1:
            return "gap"
        self.seen.add((epoch, offset))
        self.offset = max(self.offset, offset)
        return "new"

    async def start(self) -> ChatClient:
        self.ws = await self._open()
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while not self._stopping:
            assert self.ws is not None
            try:
                raw = await self.ws.recv()
            except websockets.ConnectionClosed as closed:
                if self._stopping:
                    return
                code = closed.rcvd.code if closed.rcvd is not None else 1006
                self.closes.append((time.monotonic(), code))
                if not self.reconnect or 4000 <= code < 5000:
                    return
                await self._reconnect()
                continue
            frame = json.loads(raw)
            if frame.get("type") == "recovery":
                self.recoveries.append(frame)
                if not frame["recovered"]:  # reported lost: go on from where the room is
                    self.epoch, self.offset = frame["epoch"] or None, frame["offset"]
            if frame.get("type") == "chat.message" and "offset" in frame:
                position = self._position(frame)
                if position == "duplicate":
                    self.duplicates += 1
                    continue
                if position == "gap":
                    self.gap_resumes += 1
                    with contextlib.suppress(Exception):
                        await self.ws.close()
                    try:
                        self.ws = await self._open()
                    except (OSError, TimeoutError, websockets.InvalidHandshake):
                        await self._reconnect()
                    continue
            self.frames.append(frame)
            if frame.get("type") == "chat.message" and "ref" in frame:
                self.arrived_at.setdefault(frame["ref"], time.monotonic())
            self._arrived.set()

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._stopping:
            ceiling = min(MAX_DELAY, BASE_DELAY * 2**attempt)
            attempt += 1
            await asyncio.sleep(random.uniform(0, ceiling))  # full jitter, as chat.js
            try:
                self.ws = await self._open()
            except (OSError, TimeoutError, websockets.InvalidHandshake):
                continue
            self.reopened.append(time.monotonic())
            return

    async def send(self, message: str, ref: str) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps({"message": message, "ref": ref}))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "chat.message"]

    @property
    def refs(self) -> set[str]:
        return {f["ref"] for f in self.messages if "ref" in f}

    def errors(self, code: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "error" and code in (None, f["code"])]

    @property
    def delivered_by(self) -> str | None:
        """The process that delivered the latest message: where this socket sits."""
        return self.messages[-1]["delivered_by"] if self.messages else None

    async def wait_for_ref(self, ref: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.messages:
                if frame.get("ref") == ref:
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name or 'client'} never got {ref}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def stop(self) -> None:
        self._stopping = True
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def start_clients(
    stack: RunningStack, room: str, count: int, **kwargs: Any
) -> list[ChatClient]:
    clients = [ChatClient(stack, room, name=f"c{i}", **kwargs) for i in range(count)]
    await asyncio.gather(*(client.start() for client in clients))
    return clients


async def locate(clients: list[ChatClient], probe: ChatClient | None = None) -> dict[str, str]:
    """Send one probe message; returns each client's worker process ("<replica>:<pid>")."""
    sender = probe or clients[0]
    ref = f"probe-{random.getrandbits(32):08x}"
    await sender.send("where are you?", ref)
    located = {}
    for client in clients:
        located[client.name] = (await client.wait_for_ref(ref))["delivered_by"]
    return located


async def send_paced(sender: ChatClient, tag: str, count: int, per_second: float) -> list[str]:
    """``count`` messages at ``per_second`` (below the per-connection rate limit)."""
    refs = []
    for n in range(count):
        ref = f"{tag}-{n}"
        with contextlib.suppress(websockets.ConnectionClosed):
            await sender.send(f"{tag} message {n}", ref)
            refs.append(ref)
        await asyncio.sleep(1 / per_second)
    return refs


async def eventually(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` held, polling without blocking the event loop."""
    started = time.monotonic()
    for _ in range(int(timeout / interval) + 1):
        if predicate():
            return time.monotonic() - started
        await asyncio.sleep(interval)
    raise TimeoutError(f"not within {timeout} s: {predicate}")


async def http_flood(
    stack: RunningStack, address: str, path: str, count: int, concurrency: int = 20
) -> list[int]:
    """``count`` GETs of ``path`` through nginx from the loopback ``address``: status codes."""
    transport = httpx.AsyncHTTPTransport(
        verify=stack.ssl_context(),
        local_address=address,
        limits=httpx.Limits(max_connections=concurrency),
    )
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=stack.base_url, transport=transport, timeout=60) as c:

        async def one() -> int:
            async with limit:
                return (await c.get(path)).status_code

        return list(await asyncio.gather(*(one() for _ in range(count))))


def pid_of(process: str) -> int:
    return int(process.rsplit(":", 1)[1])


def program_of(process: str) -> str:
    """``"vm-app2:1234"`` -> ``"app2"`` (the supervisord program of that replica)."""
    return replica_of(process).rsplit("-", 1)[1]


def redis_client(stack: RunningStack) -> redis.Redis:
    password = (stack.stack.run_dir / "secrets" / "redis_password").read_text().strip()
    return redis.Redis(
        host="127.0.0.1",
        port=stack.stack.redis_port,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=2,
    )


def readyz(stack: RunningStack) -> list[int]:
    """The /readyz status of every replica, asked directly (0: no answer)."""
    statuses = []
    for port in stack.stack.app_ports:
        try:
            statuses.append(httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code)
        except httpx.HTTPError:
            statuses.append(0)
    return statuses


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` held; raises after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout} s: {predicate}")
        time.sleep(interval)
    return time.monotonic() - started


def log_since(stack: RunningStack, program: str, offset: int) -> str:
    return stack.log(program)[offset:]


def log_offsets(stack: RunningStack) -> dict[str, int]:
    """Current length of every program's log, to read only what a test adds."""
    names = [f"app{i}" for i in range(1, stack.stack.replicas + 1)] + ["nginx"]
    names += ["redis"] if stack.stack.own_redis else []
    return {name: len(stack.log(name)) for name in names}


LOST = re.compile(r"channel layer: lost (\d+) message")


def lost_logged(stack: RunningStack, offsets: dict[str, int]) -> int:
    """Messages the replicas' layers counted as lost (and logged) since ``offsets``."""
    return sum(
        int(count)
        for name, offset in offsets.items()
        if name.startswith("app")
        for count in LOST.findall(log_since(stack, name, offset))
    )


UNHANDLED = re.compile(r"Traceback|Exception in ASGI application|\[CRITICAL\]|WORKER TIMEOUT")


def unhandled_errors(stack: RunningStack, offsets: dict[str, int]) -> list[str]:
    """Lines that show an unhandled exception or a worker crash, in what the apps logged since."""
    found = []
    for name, offset in offsets.items():
        if name.startswith("app"):
            found += [
                line
                for line in log_since(stack, name, offset).splitlines()
                if UNHANDLED.search(line)
            ]
    return found
