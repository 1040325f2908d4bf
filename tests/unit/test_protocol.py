"""chat.protocol: frame parsing and room names, without a server."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.protocol import (
    ErrorCode,
    PresenceQuery,
    ProtocolError,
    is_valid_room,
    parse_client_frame,
    room_group,
)


def test_a_seed_client_frame_parses() -> None:
    parsed = parse_client_frame('{"message": "hi"}', max_chars=10)
    assert (parsed.text, parsed.ref) == ("hi", None)


def test_ref_is_kept_verbatim() -> None:
    assert parse_client_frame('{"message": "hi", "ref": " x\\u00e9 "}', max_chars=10).ref == " xé "


def test_limit_counts_characters_not_bytes() -> None:
    assert parse_client_frame('{"message": "' + "é" * 10 + '"}', max_chars=10).text == "é" * 10
    with pytest.raises(ProtocolError) as error:
        parse_client_frame('{"message": "' + "é" * 11 + '"}', max_chars=10)
    assert error.value.code is ErrorCode.MESSAGE_TOO_LONG


@given(st.text(max_size=200))
def test_any_text_either_parses_or_raises_a_protocol_error(text: str) -> None:
    try:
        parsed = parse_client_frame(text, max_chars=100)
    except ProtocolError as error:
        assert error.code in set(ErrorCode)
    else:
        assert isinstance(parsed.text, str) and 0 < len(parsed.text) <= 100


@pytest.mark.parametrize("name", ["lobby", "a", "A-b_9", "x" * 64])
def test_valid_rooms(name: str) -> None:
    assert is_valid_room(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "a.b", "a b", "a/b", "é", "a\n", "lobby\x00"])
def test_invalid_rooms(name: str) -> None:
    assert not is_valid_room(name)


def test_distinct_rooms_have_distinct_groups() -> None:
    assert room_group("a-b") != room_group("a_b")
    assert room_group("lobby") == "chat.lobby"


def test_a_presence_request_is_its_own_frame_and_old_frames_are_unchanged() -> None:
    assert parse_client_frame('{"type": "presence"}', max_chars=10) == PresenceQuery()
    # "type" with any other value is not a request: the frame is read as before.
    assert parse_client_frame('{"type": "x", "message": "hi"}', max_chars=10).text == "hi"
    with pytest.raises(ProtocolError) as raised:
        parse_client_frame('{"type": "presences"}', max_chars=10)
    assert raised.value.code == ErrorCode.MISSING_MESSAGE
