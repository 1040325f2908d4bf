"""Fast JSON for websocket frames (orjson), with the stdlib's error type for bad input."""

from __future__ import annotations

from typing import Any

import orjson


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(text: str | bytes) -> Any:
    """Parse JSON; raises ``ValueError`` (``orjson.JSONDecodeError``) on malformed input."""
    return orjson.loads(text)
