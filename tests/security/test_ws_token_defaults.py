"""The token path with the default settings (the shared stack): the seeds' ``?token=`` is off,
the native stack generated a signing key of its own, and a browser session can get a token."""

from __future__ import annotations

import json
import stat

import pytest
import websockets

from tests.harness import RunningStack, recv_until
from tests.security.conftest import create_users, log_in

pytestmark = pytest.mark.e2e


async def test_query_string_tokens_are_ignored_by_default(stack: RunningStack) -> None:
    create_users(stack, "qs-default")
    session = log_in(stack, "qs-default")
    response = stack.csrf_post(session, "/api/ws-token/", {})
    session.close()
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    # Without an Origin, a token in the URL is no token: the Origin rule refuses.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await stack.connect(f"/ws/chat/qs-default/?token={token}", origin=None)
    assert refused.value.response.status_code == 403
    # With the site's Origin (and no cookie) it authenticates nobody.
    ws = await stack.connect(f"/ws/chat/qs-default/?token={token}")
    await ws.send(json.dumps({"message": "who am I", "ref": "qs"}))
    frame = await recv_until(ws, lambda f: f.get("ref") == "qs")
    assert frame["user"] == "anonymous"
    await ws.close()
    # The same token in its subprotocol does.
    ws = await stack.connect(
        "/ws/chat/qs-default/", origin=None, subprotocols=["switchboard.v1", f"token.{token}"]
    )
    assert ws.subprotocol == "switchboard.v1"
    await ws.send(json.dumps({"message": "who am I", "ref": "sub"}))
    frame = await recv_until(ws, lambda f: f.get("ref") == "sub")
    assert frame["user"] == "qs-default"
    await ws.close()
    assert token not in stack.log("nginx")


def test_the_native_stack_generates_its_own_signing_key(stack: RunningStack) -> None:
    key_file = stack.stack.run_dir / "secrets" / "ws_token_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text().strip()) >= 32
    environ = stack.stack.app_environment()
    assert environ["WS_TOKEN_KEYS"] == f"native-1:{key_file.read_text().strip()}"


def test_nginx_logs_no_subprotocol_header() -> None:
    """Sec-WebSocket-Protocol carries tokens: no log format may name it."""
    from infra.stack import NGINX_DIR

    for path in NGINX_DIR.rglob("*"):
        if path.is_file():
            assert "sec_websocket_protocol" not in path.read_text().lower(), path
