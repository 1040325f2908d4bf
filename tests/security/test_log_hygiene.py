"""Logs say who connected, who left, what was refused and which limit was hit, with the reason --
and never a message body, a token, a password or a secret.

A session of ordinary and hostile use runs against the small stack; then every log it wrote
(app, nginx, Redis, supervisord) is searched for the secrets and checked for the events. The same
session runs against a stack with ``LOG_FORMAT=json``: every line the replica writes (Django's,
gunicorn's and uvicorn's) is then a JSON object with the fields operators filter on, every
websocket event names its connection, and none of the secrets appear either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import websockets

from tests.faults.tools import http_flood
from tests.harness import TEST_PASSWORD, RunningStack, recv_json, room_path, started

pytestmark = pytest.mark.e2e

BODY = "BODY-CANARY-7f3a"
NOTE = "NOTE-CANARY-91c2"
TOKEN = "TOKEN-CANARY-5d8e"


async def hostile_and_ordinary_use(stack: RunningStack) -> dict[str, str]:
    """Runs the session; returns the cookies the user had (they are secrets too)."""
    user = stack.login("log-watcher")
    user.get("/chat/hygiene/")  # sets the CSRF cookie
    cookies = {c.name: c.value for c in user.cookies.jar}
    # Chat, with a token in the query string as some clients put it there.
    async with await stack.connect(
        room_path("hygiene") + f"?token={TOKEN}", cookies=user.cookies
    ) as ws:
        for n in range(3):
            await ws.send(json.dumps({"message": f"{BODY} {n}", "ref": f"r{n}"}))
            await recv_json(ws)
        await ws.send(b"binary " + BODY.encode())
        await recv_json(ws)
    # A notification through a view, delivered to a socket.
    async with await stack.connect("/ws/notifications/", cookies=user.cookies) as ws:
        response = stack.csrf_post(user, "/notifications/ping/", {"message": NOTE})
        assert response.status_code == 202
        assert (await recv_json(ws))["message"] == NOTE
    # Refusals: a bad room, a foreign origin, an anonymous notifications socket.
    async with await stack.connect(room_path("bad.room")) as ws:
        await recv_json(ws)
    with pytest.raises(websockets.InvalidStatus):
        await stack.connect(room_path("hygiene"), origin="https://evil.example")
    async with await stack.connect("/ws/notifications/") as ws:
        await recv_json(ws)
    # Invalid UTF-8 in a text frame.
    ws = await stack.connect(room_path("hygiene"))
    await ws.send(b"\xff\xfe" + BODY.encode(), text=True)
    with pytest.raises(websockets.ConnectionClosed):
        await ws.recv()
    # A flood: rate limited, then closed.
    ws = await stack.connect(room_path("hygiene"))
    for n in range(200):
        try:
            await ws.send(json.dumps({"message": f"{BODY} flood {n}"}))
        except websockets.ConnectionClosed:
            break
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await ws.recv()
    # nginx's per-IP handshake limit, hit with the token in the query string.
    statuses = await http_flood(
        stack, "127.0.0.70", f"/ws/chat/hygiene/?token={TOKEN}", 400, concurrency=400
    )
    assert 429 in statuses
    # A notifications socket open at logout is closed by it.
    async with await stack.connect("/ws/notifications/", cookies=user.cookies) as ws:
        assert stack.csrf_post(user, "/accounts/logout/", {}).status_code == 302
        await recv_json(ws)
    user.close()
    return cookies


def secrets_of(stack: RunningStack, cookies: dict[str, str]) -> dict[str, str]:
    return {
        "message body": BODY,
        "notification text": NOTE,
        "query-string token": TOKEN,
        "password": TEST_PASSWORD,
        "session id": cookies["sessionid"],
        "csrf token": cookies["csrftoken"],
        "Django secret key": (stack.stack.run_dir / "secrets" / "django_secret_key").read_text(),
        "Redis password": (stack.stack.run_dir / "secrets" / "redis_password").read_text(),
    }


def read_logs(stack: RunningStack, secrets: dict[str, str]) -> dict[str, str]:
    """Every log of the stack by file name, once checked to hold none of ``secrets``."""
    logs = {
        path.name: path.read_text(errors="replace")
        for path in sorted(stack.stack.logs_dir.glob("*.log"))
    }
    assert {"app1.log", "nginx.log", "redis.log", "supervisord.log"} <= set(logs)
    for name, text in logs.items():
        for what, secret in secrets.items():
            assert secret.strip() not in text, f"{what} found in {name}"
    return logs


async def test_logs_have_the_events_and_none_of_the_secrets(limits_stack: RunningStack) -> None:
    stack = limits_stack
    cookies = await hostile_and_ordinary_use(stack)
    logs = read_logs(stack, secrets_of(stack, cookies))
    app, nginx = logs["app1.log"], logs["nginx.log"]
    events = {
        "connect": "chat: connect 127.0.0.1:",
        "who and where": "room=hygiene user=log-watcher",
        "disconnect with its code": "room=hygiene code=1000",
        "refused room": ": invalid_room",
        "refused origin": "origin_not_allowed",
        "refused anonymous": ": auth_required",
        "refused frame": "refused frame: invalid_utf8",
        "rate limit hit": "rate limited 127.0.0.1:",
        "flood closed": "flood: closing 127.0.0.1:",
        "logout": "reason=logged_out",
        "notification socket": "connect 127.0.0.1:",
    }
    missing = [what for what, needle in events.items() if needle not in app]
    assert not missing, missing
    assert "limit_req=REJECTED" in nginx and '"GET /ws/chat/hygiene/ HTTP/1.1" 429' in nginx
    # Nothing the app logged is a server error.
    assert "Traceback" not in app and "[ERROR]" not in app


@pytest.fixture(scope="module")
def json_logs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with started(
        tmp_path_factory.mktemp("json-logs"), replicas=1, workers=1, LOG_FORMAT="json"
    ) as running:
        yield running


#: Fields every JSON log line carries.
JSON_FIELDS = {"timestamp", "level", "logger", "pid", "replica", "message"}


async def test_json_logs_are_one_object_per_line_with_connection_ids_and_no_secrets(
    json_logs_stack: RunningStack,
) -> None:
    stack = json_logs_stack
    cookies = await hostile_and_ordinary_use(stack)
    logs = read_logs(stack, secrets_of(stack, cookies))
    records = []
    for line in logs["app1.log"].splitlines():
        if line.strip():
            record = json.loads(line)  # every line: gunicorn's, uvicorn's and Django's
            assert isinstance(record, dict) and set(record) >= JSON_FIELDS, line
            assert record["replica"] == stack.stack.replica_name(1), line
            records.append(record)
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "uvicorn.error", "chat", "switchboard.ws"} <= loggers, loggers
    assert "Traceback" not in logs["app1.log"]
    assert not [r for r in records if r["level"] in {"ERROR", "CRITICAL"}], "server errors"

    # Every websocket event names its connection; one socket's events share one id.
    events = {
        "connect": "connect 127.0.0.1:",
        "disconnect with its code": "room=hygiene code=1000",
        "refused room": ": invalid_room",
        "refused origin": "origin_not_allowed",
        "refused anonymous": ": auth_required",
        "rate limit hit": "rate limited 127.0.0.1:",
        "flood closed": "flood: closing 127.0.0.1:",
        "logout": "reason=logged_out",
    }
    for what, needle in events.items():
        found = [r for r in records if needle in r["message"]]
        assert found, what
        assert all(len(r.get("connection", "")) == 12 for r in found), (what, found)
    flood = next(r for r in records if "flood: closing" in r["message"])
    limited = next(
        r
        for r in records
        if "rate limited" in r["message"] and r["connection"] == flood["connection"]
    )
    assert limited["endpoint"] == flood["endpoint"] == "chat"
    # Query strings are cut from uvicorn's lines in this format too.
    assert not [r for r in records if "?token=" in r["message"]]
