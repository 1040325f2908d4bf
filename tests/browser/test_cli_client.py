"""Clients without a browser, on the real stack.

The command-line client (``python -m switchboard_client``) and the chat page in Chromium, in one
room: a line typed in the client appears on the page, and a message typed on the page is printed
by the client. The client authenticates with an API key file and a connection token in its
subprotocols; it sends no Origin and no cookie. The README's Node.js client does the same."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from playwright.sync_api import Browser
from websockets.sync.client import connect

from tests.browser.conftest import TOKEN_TTL
from tests.browser.test_chat_in_chromium import ROOM, chromium, message, open_chat_as, say
from tests.harness import RunningStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["chromium"]  # the fixture, shared with the page test


def lines_of(stream: IO[str]) -> queue.Queue[str]:
    found: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            found.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return found


def wait_for_line(
    lines: queue.Queue[str], wanted: str, timeout: float = 15, *, prefix: bool = False
) -> list[str]:
    """The lines read until ``wanted`` (or a line starting with it), which is the last one."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or not (seen[-1].startswith(wanted) if prefix else seen[-1] == wanted):
        seen.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))
    return seen


@contextlib.contextmanager
def cli_as(stack: RunningStack, username: str, key_file: Path) -> Iterator[subprocess.Popen[str]]:
    """``python -m switchboard_client chat ROOM`` for ``username`` (made, with a new API key)."""
    stack.create_user(username)
    stack.manage("create_api_key", username, "--output", str(key_file))
    assert os.stat(key_file).st_mode & 0o077 == 0
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "switchboard_client",
            "chat",
            ROOM,
            "--url",
            stack.base_url,
            "--api-key-file",
            str(key_file),
            "--cacert",
            str(stack.stack.ca_file),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@pytest.fixture
def cli(browser_stack: RunningStack, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    with cli_as(browser_stack, "cli-user", tmp_path / "api-key") as process:
        yield process


def test_the_cli_client_and_a_browser_page_talk(
    browser_stack: RunningStack, chromium: tuple[object, Browser], cli: subprocess.Popen[str]
) -> None:
    _, browser = chromium
    assert cli.stdin and cli.stdout and cli.stderr
    printed, status = lines_of(cli.stdout), lines_of(cli.stderr)
    wait_for_line(status, f"* joined {ROOM}")
    browser_stack.create_user("page-user")
    page = open_chat_as(browser, browser_stack, "page-user")

    say(page, "hello from the page")
    wait_for_line(printed, "page-user: hello from the page")

    cli.stdin.write("hello from the terminal\n")
    cli.stdin.flush()
    seen = message(page, "hello from the terminal")
    assert seen["user"] == "cli-user"
    wait_for_line(printed, "cli-user: hello from the terminal")  # its own message, echoed

    cli.stdin.close()  # end of input: the client closes the socket and exits
    assert cli.wait(15) == 0


def test_the_cli_client_refreshes_its_token_and_stays_connected(
    browser_stack: RunningStack, tmp_path: Path
) -> None:
    """Tokens live TOKEN_TTL (8) s here: over two lifetimes the client refreshes on the same
    socket (token_expiring -> refresh -> token_refreshed) and is never disconnected."""
    with cli_as(browser_stack, "cli-refresher", tmp_path / "key") as process:
        assert process.stdin and process.stdout and process.stderr
        printed, status = lines_of(process.stdout), lines_of(process.stderr)
        wait_for_line(status, f"* joined {ROOM}")
        joined_at = time.monotonic()
        seen: list[str] = []
        for _ in range(2):
            seen += wait_for_line(status, "* token refreshed", timeout=2 * TOKEN_TTL, prefix=True)
        time.sleep(max(0.0, joined_at + TOKEN_TTL + 1 - time.monotonic()))  # past the first token
        while not status.empty():
            seen.append(status.get())
        assert not any(line.startswith("* disconnected") for line in seen), seen
        process.stdin.write("still here\n")
        process.stdin.flush()
        wait_for_line(printed, "cli-refresher: still here")


def test_the_cli_client_stops_when_its_user_is_deactivated(
    browser_stack: RunningStack, tmp_path: Path
) -> None:
    """Its socket is closed (auth_ended, 4401); it asks for a new token, is refused, and exits."""
    with cli_as(browser_stack, "cli-deactivated", tmp_path / "key") as process:
        assert process.stderr
        status = lines_of(process.stderr)
        wait_for_line(status, f"* joined {ROOM}")
        browser_stack.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model\n"
            "u = get_user_model().objects.get(username='cli-deactivated')\n"
            "u.is_active = False; u.save()",
        )
        assert process.wait(30) == 1
        seen = wait_for_line(status, "* disconnected (4401)")
        assert any("auth_ended" in line for line in seen), seen
        wait_for_line(status, "* token refused: HTTP 401 Unknown, revoked or inactive API key.")


NODE = "/usr/bin/node"
NODE_CLIENT = ROOT / "switchboard_client" / "examples" / "chat.js"
#: Debian's node-ws installs `ws` here (TEST_PACKAGES); `npm install ws` users need no NODE_PATH.
DEBIAN_NODE_MODULES = "/usr/share/nodejs"


def test_the_readmes_node_client_talks_to_the_room(
    browser_stack: RunningStack, tmp_path: Path
) -> None:
    """The README's JavaScript client (switchboard_client/examples/chat.js), run by Node.js with
    the `ws` package: it greets the room and prints what another client says."""
    browser_stack.create_user("node-user")
    key_file = tmp_path / "node-key"
    browser_stack.manage("create_api_key", "node-user", "--output", str(key_file))
    room = "node-room"
    environ = {
        **os.environ,
        "NODE_PATH": DEBIAN_NODE_MODULES,
        "NODE_EXTRA_CA_CERTS": str(browser_stack.stack.ca_file),
        "SWITCHBOARD_URL": browser_stack.base_url,
        "SWITCHBOARD_API_KEY_FILE": str(key_file),
    }
    node = subprocess.Popen(
        [NODE, str(NODE_CLIENT), room, "hello from node"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        printed, status = lines_of(node.stdout), lines_of(node.stderr)  # type: ignore[arg-type]
        wait_for_line(status, f"* joined {room}")
        wait_for_line(printed, "node-user: hello from node")
        with connect(
            f"{browser_stack.ws_url}/ws/chat/{room}/",
            ssl=browser_stack.ssl_context(),
            origin=browser_stack.origin,
            open_timeout=10,
        ) as other:
            other.send(json.dumps({"message": "hello to node"}))
            wait_for_line(printed, "anonymous: hello to node")
    finally:
        node.kill()
        node.wait(10)


def test_the_readme_shows_the_node_client_that_is_tested() -> None:
    assert NODE_CLIENT.read_text() in (ROOT / "README.md").read_text()
