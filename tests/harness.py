"""Test harness: real native stacks (redis-server, gunicorn replicas, nginx) on free ports.

A ``RunningStack`` is ``infra.stack.Stack`` started in the background from a temporary run
directory, with its own ports, SQLite file and Redis, so several can run side by side.
Nothing here mocks Redis, nginx or gunicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import websockets

from infra.stack import Stack, isolated_environ
from infra.stack import free_port_block as free_port_block  # re-exported for the tests

TEST_PASSWORD = "correct-horse-battery-staple-42"


class RunningStack:
    def __init__(self, run_dir: Path, *, replicas: int = 3, workers: int = 2, **env: str) -> None:
        environ = isolated_environ(run_dir, replicas=replicas, workers=workers)
        environ.update(env)
        self.stack = Stack.from_env(environ)
        self.workers = workers

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> RunningStack:
        try:
            self.stack.start(timeout=90)
        except BaseException:
            # A stack that did not get ready is still running: stop it, or it outlives the test
            # run (and its temporary run directory, which holds the only way to stop it).
            if self.stack.is_running():
                self.stack.stop()
            raise
        return self

    def stop(self) -> None:
        self.stack.stop()

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    @property
    def origin(self) -> str:
        return self.base_url

    @property
    def ws_url(self) -> str:
        return f"wss://localhost:{self.stack.https_port}"

    def ssl_context(self) -> ssl.SSLContext:
        return self.stack.ssl_context()

    def sync_client_ssl_context(self) -> ssl.SSLContext:
        """For ``websockets.sync.client`` only: TLS 1.2 at most.

        That client reads its socket in a thread of its own while the caller writes the
        handshake request from another, and an OpenSSL connection is not safe to use from two
        threads at once. With TLS 1.3, nginx sends session tickets right after the handshake, so
        the reader thread is inside OpenSSL when the request is written; about 1 handshake in
        100-300 then never reached nginx, which closed it after ``client_header_timeout`` (10 s)
        without an answer ("client timed out ... while waiting for request"). Measured through
        the same stack, interleaved: sync client with TLS 1.3, 6 such stalls in 500 handshakes;
        with TLS 1.2, 0 in 500; websockets' asyncio client (one thread), 0 in 800; a raw TLS 1.3
        handshake and upgrade from one thread, 0 in 1,000 (README.md, "Hostile input").
        TLS 1.2 has no post-handshake messages, so nothing races the request.
        """
        context = self.stack.ssl_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context

    # -- processes -----------------------------------------------------------------------------
    def program_pid(self, program: str) -> int:
        out = self.stack.supervisorctl("pid", program).stdout.strip()
        return int(out)

    def worker_pids(self, program: str) -> list[int]:
        """The uvicorn worker processes of one replica (children of its gunicorn master)."""
        master = self.program_pid(program)
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return sorted(int(pid) for pid in children)

    def manage(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.stack.manage(*args)

    def create_user(self, username: str, *, staff: bool = False) -> None:
        script = (
            "from django.contrib.auth import get_user_model; U = get_user_model(); "
            f"u, _ = U.objects.get_or_create(username={username!r}); "
            f"u.set_password({TEST_PASSWORD!r}); u.is_staff = {staff!r}; u.save()"
        )
        self.manage("shell", "-c", script)

    def log(self, program: str) -> str:
        return (self.stack.logs_dir / f"{program}.log").read_text(errors="replace")

    # -- HTTP ----------------------------------------------------------------------------------
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=self.ssl_context(), timeout=10)

    def login(self, username: str) -> httpx.Client:
        """An HTTP client holding a session for ``username`` (created if needed)."""
        self.create_user(username)
        client = self.http()
        page = client.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post(
            "/accounts/login/",
            data={
                "username": username,
                "password": TEST_PASSWORD,
                "csrfmiddlewaretoken": token,
                "next": "/chat/lobby/",
            },
            headers={"Referer": f"{self.base_url}/accounts/login/"},
        )
        assert response.status_code == 302, response.text[:500]
        assert "sessionid" in client.cookies
        return client

    def csrf_post(self, client: httpx.Client, path: str, data: dict[str, str]) -> httpx.Response:
        client.get("/chat/lobby/")  # sets the csrftoken cookie
        return client.post(
            path,
            data=data,
            headers={"X-CSRFToken": client.cookies["csrftoken"], "Referer": f"{self.base_url}/"},
        )

    # -- websockets ----------------------------------------------------------------------------
    async def connect(
        self,
        path: str,
        *,
        origin: str | None = "",
        cookies: httpx.Cookies | None = None,
        **kwargs: Any,
    ) -> websockets.ClientConnection:
        headers = {}
        if cookies is not None:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        return await websockets.connect(
            self.ws_url + path,
            ssl=self.ssl_context(),
            origin=self.origin if origin == "" else origin,
            additional_headers=headers,
            open_timeout=10,
            **kwargs,
        )


def replica_of(process: str) -> str:
    """``"host-app2:1234"`` -> ``"host-app2"``."""
    return process.rsplit(":", 1)[0]


async def recv_json(ws: websockets.ClientConnection, timeout: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(
    ws: websockets.ClientConnection, predicate: Any, timeout: float = 10
) -> dict[str, Any]:
    """The first frame for which ``predicate(frame)`` is true (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = await recv_json(ws, max(0.01, deadline - time.monotonic()))
        if predicate(frame):
            return frame


@contextlib.asynccontextmanager
async def connections(
    stack: RunningStack, path: str, count: int, **kwargs: Any
) -> AsyncIterator[list[websockets.ClientConnection]]:
    sockets = await asyncio.gather(*(stack.connect(path, **kwargs) for _ in range(count)))
    try:
        yield list(sockets)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


@contextlib.contextmanager
def started(run_dir: Path, **options: Any) -> Iterator[RunningStack]:
    stack = RunningStack(run_dir, **options).start()
    try:
        yield stack
    finally:
        stack.stop()


def room_path(room: str) -> str:
    return "/ws/chat/" + urllib.parse.quote(room, safe="") + "/"


CLIENTS = 12
MESSAGES_PER_CLIENT = 3


async def room_fanout(stack: RunningStack, room: str) -> dict:
    """12 clients join ``room``; each sends 3 messages; returns what every client received.

    Readers stop after 5 s without a frame, so missing deliveries show up as short lists.
    """
    started = time.monotonic()
    async with connections(stack, room_path(room), CLIENTS) as sockets:
        expected = CLIENTS * MESSAGES_PER_CLIENT
        received: list[list[dict]] = [[] for _ in sockets]

        async def reader(index: int) -> None:
            ws = sockets[index]
            try:
                while len(received[index]) < expected:
                    received[index].append(await recv_json(ws, timeout=5))
            except TimeoutError:
                pass

        readers = [asyncio.create_task(reader(i)) for i in range(CLIENTS)]
        for round_ in range(MESSAGES_PER_CLIENT):
            for index, ws in enumerate(sockets):
                await ws.send(
                    json.dumps({"message": f"m{round_}-{index}", "ref": f"{index}.{round_}"})
                )
        await asyncio.gather(*readers)
    return {"received": received, "expected": expected, "seconds": time.monotonic() - started}
