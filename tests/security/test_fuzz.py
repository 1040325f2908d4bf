"""Property-based fuzzing of ``/ws/chat/<room>/`` through nginx, on the shared stack.

Hypothesis throws frames at the endpoint: random text and bytes, binary frames, JSON of every
shape, objects with a ``message`` of the wrong type, deep nesting, frames near and over the
64 KiB limit, unicode edge cases, control characters, invalid UTF-8 in text frames. Each frame
must be answered with exactly one protocol frame (an ``error`` with a published code, or the
echo of a valid message) or end the connection with a clean close (1007 invalid UTF-8, 1009 too
big) -- never an abnormal close. Meanwhile another member of the room sees only chat messages,
stays connected, and the workers log no unhandled exception.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from chat.protocol import ErrorCode
from tests.faults.tools import log_offsets, record_figures, unhandled_errors
from tests.harness import RunningStack, room_path

pytestmark = pytest.mark.e2e

ROOM = "fuzz"
EXAMPLES = 300
#: Fresh connection after this many frames: stays inside the per-connection burst (20).
FRAMES_PER_CONNECTION = 15
MAX_FRAME = 64 * 1024
CODES = {code.value for code in ErrorCode}

# -- frames ------------------------------------------------------------------------------------
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=25,
)
edge_chars = st.sampled_from(
    [
        "\x00",
        "\x07",
        "\x1b[31m",
        "\r\n",
        "\u202e",
        "\u200b",
        "\ufeff",
        "\u0301",
        "\U0001f600",
        "\uffff",
        "\U0010ffff",
        "\\",
        '"',
        "</script>",
        "%00",
        "\t",
        "\x7f",
    ]
)
edge_text = st.lists(edge_chars | text, min_size=1, max_size=8).map("".join)
message_objects = st.fixed_dictionaries(
    {"message": json_values | edge_text},
    optional={"ref": json_values | edge_text, "type": json_values, "user": text, "sent_by": text},
)


@st.composite
def deep(draw: Any) -> str:
    depth = draw(st.integers(1, 3000))
    if draw(st.booleans()):
        return "[" * depth + "]" * depth
    return '{"message":' * depth + '"x"' + "}" * depth


@st.composite
def big(draw: Any) -> str:
    return json.dumps({"message": "x" * draw(st.integers(MAX_FRAME - 5000, MAX_FRAME + 5000))})


invalid_utf8 = st.binary(min_size=1, max_size=100).filter(lambda b: not _is_utf8(b))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


frames = st.one_of(
    text.map(lambda t: ("text", t)),
    st.binary(max_size=300).map(lambda b: ("binary", b)),
    json_values.map(lambda v: ("text", json.dumps(v))),
    message_objects.map(lambda v: ("text", json.dumps(v))),
    message_objects.map(lambda v: ("text", json.dumps(v, ensure_ascii=False))),
    deep().map(lambda t: ("text", t)),
    big().map(lambda t: ("text", t)),
    invalid_utf8.map(lambda b: ("bad-utf8", b)),
)


# -- the room ----------------------------------------------------------------------------------
class Observer(threading.Thread):
    """A room member reading everything until the socket closes."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.closed: websockets.ConnectionClosed | None = None

    def run(self) -> None:
        try:
            for raw in self.ws:
                self.frames.append(json.loads(raw))
        except websockets.ConnectionClosed as closed:
            self.closed = closed


class Fuzzer:
    def __init__(self, stack: RunningStack) -> None:
        self.stack = stack
        self.ws: ClientConnection | None = None
        self.held = contextlib.ExitStack()
        self.sent_on_this = 0
        self.outcomes: dict[str, int] = {}

    def socket(self) -> ClientConnection:
        if self.ws is None or self.sent_on_this >= FRAMES_PER_CONNECTION:
            self.held.close()
            self.ws = self.held.enter_context(self._connect())
            self.sent_on_this = 0
        return self.ws

    def _connect(self) -> ClientConnection:
        return connect(
            self.stack.ws_url + room_path(ROOM),
            ssl=self.stack.sync_client_ssl_context(),
            origin=self.stack.origin,
            open_timeout=10,
            max_size=None,
        )

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


@pytest.fixture(scope="module")
def room(stack: RunningStack) -> Iterator[tuple[Fuzzer, Observer, dict[str, int]]]:
    offsets = log_offsets(stack)
    fuzzer = Fuzzer(stack)
    with (
        connect(
            stack.ws_url + room_path(ROOM), ssl=stack.sync_client_ssl_context(), origin=stack.origin
        ) as watcher,
        fuzzer.held,
    ):
        observer = Observer(watcher)
        observer.start()
        yield fuzzer, observer, offsets


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(frame=frames)
def test_every_frame_gets_an_error_or_a_clean_close(
    room: tuple[Fuzzer, Observer, dict[str, int]], frame: tuple[str, Any]
) -> None:
    fuzzer, _, _ = room
    kind, payload = frame
    ws = fuzzer.socket()
    fuzzer.sent_on_this += 1
    try:
        if kind == "bad-utf8":
            ws.send(payload, text=True)
        else:
            ws.send(payload)
        reply = json.loads(ws.recv(timeout=10))
    except websockets.ConnectionClosed as closed:
        fuzzer.ws = None
        code = closed.rcvd.code if closed.rcvd is not None else None
        fuzzer.count(f"close {code}")
        too_big = kind == "text" and len(payload.encode()) > MAX_FRAME
        assert (code, kind) == (1007, "bad-utf8") or (code == 1009 and too_big), (code, kind)
        return
    assert kind != "bad-utf8", "invalid UTF-8 in a text frame must close the connection (1007)"
    if kind == "text":
        assert len(payload.encode()) <= MAX_FRAME, "a frame over the limit was accepted"
    if reply["type"] == "error":
        assert set(reply) == {"type", "code", "detail"} and reply["code"] in CODES, reply
        fuzzer.count(reply["code"])
        if kind == "binary":
            assert reply["code"] == ErrorCode.BINARY_NOT_SUPPORTED
        return
    # Accepted: it must have been a valid message, echoed unchanged to its sender.
    assert reply["type"] == "chat.message", reply
    sent = json.loads(payload)
    assert isinstance(sent, dict) and isinstance(sent.get("message"), str)
    assert reply["message"] == sent["message"] and sent["message"].strip()
    assert reply.get("ref") == sent.get("ref")
    fuzzer.count("delivered")


def test_the_room_was_unaffected_and_nothing_went_unhandled(
    stack: RunningStack, room: tuple[Fuzzer, Observer, dict[str, int]]
) -> None:
    fuzzer, observer, offsets = room
    assert sum(fuzzer.outcomes.values()) >= EXAMPLES
    # The fuzzer met every kind of answer, so the property test above exercised them all.
    assert fuzzer.outcomes.get("delivered", 0) > 0
    assert fuzzer.outcomes.get("close 1009", 0) > 0 and fuzzer.outcomes.get("close 1007", 0) > 0
    for code in (
        "invalid_json",
        "not_an_object",
        "missing_message",
        "invalid_message",
        "binary_not_supported",
    ):
        assert fuzzer.outcomes.get(code, 0) > 0, (code, fuzzer.outcomes)
    # The bystander: still connected, got only chat messages, and still receives.
    with connect(
        stack.ws_url + room_path(ROOM), ssl=stack.sync_client_ssl_context(), origin=stack.origin
    ) as sender:
        sender.send(json.dumps({"message": "still fine?", "ref": "canary"}))
        json.loads(sender.recv(timeout=10))
    for _ in range(100):
        if any(f.get("ref") == "canary" for f in observer.frames):
            break
        observer.join(0.1)
    assert observer.closed is None
    assert any(f.get("ref") == "canary" for f in observer.frames)
    assert {f["type"] for f in observer.frames} == {"chat.message"}
    assert unhandled_errors(stack, offsets) == []
    record_figures("fuzz", {"frames": sum(fuzzer.outcomes.values()), "outcomes": fuzzer.outcomes})
