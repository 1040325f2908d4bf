from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from tests.harness import TEST_PASSWORD, RunningStack, recv_json, recv_until, replica_of, started


@pytest.fixture(scope="package")
def limits_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A small stack of its own (1 replica x 1 worker) for what the shared stack must not see:
    nginx limits lowered and reloaded, floods, and logs read from their first line."""
    with started(tmp_path_factory.mktemp("limits"), replicas=1, workers=1) as running:
        yield running


def create_users(stack: RunningStack, *usernames: str) -> dict[str, int]:
    """Create (or reset) users in one manage.py run; their primary keys by name."""
    script = (
        "from django.contrib.auth import get_user_model; U = get_user_model()\n"
        f"for name in {list(usernames)!r}:\n"
        "    u, _ = U.objects.get_or_create(username=name)\n"
        f"    u.set_password({TEST_PASSWORD!r}); u.save(); print(name, u.pk)\n"
    )
    lines = stack.manage("shell", "-c", script).stdout.strip().splitlines()
    pairs = [line.split() for line in lines]
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[0] in usernames}


def log_in(stack: RunningStack, username: str) -> httpx.Client:
    """A new session through the login form, as a browser gets one. (RunningStack.login also
    re-saves the password, which ends every earlier session of that user.)"""
    client = stack.http()
    page = client.get("/accounts/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    response = client.post(
        "/accounts/login/",
        data={"username": username, "password": TEST_PASSWORD, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{stack.base_url}/accounts/login/"},
    )
    assert response.status_code == 302, response.text[:300]
    return client


def notify_self(stack: RunningStack, client: httpx.Client, message: str) -> None:
    """Push a notification to the client's own user, through the view (no process to start)."""
    response = stack.csrf_post(client, "/notifications/ping/", {"message": message})
    assert response.status_code == 202, response.text


async def closed_with(ws: websockets.ClientConnection) -> tuple[dict[str, Any], int]:
    """The last frame before the close (other frames, such as room traffic, are skipped), and
    the close code."""
    frame: dict[str, Any] = {}
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            frame = await recv_json(ws)
    received = closed.value.rcvd
    return frame, received.code if received is not None else 1006  # 1006: no close frame


async def replica_serving(ws: websockets.ClientConnection, ref: str) -> str:
    """The replica whose worker delivers this socket's own message back to it."""
    await ws.send(json.dumps({"message": "who serves me", "ref": ref}))
    frame = await recv_until(ws, lambda f: f.get("ref") == ref)
    return replica_of(frame["delivered_by"])
