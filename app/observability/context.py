"""Which websocket connection the running code serves: its id and its endpoint.

Every websocket is handled by one asyncio task from the handshake to the close, so a context
variable set when the connection starts (:class:`observability.asgi.MetricsEndpoint`) is seen by
the origin check, the consumer and every log record they write, without passing it around.
"""

from __future__ import annotations

import contextvars
import uuid
from typing import NamedTuple


class Connection(NamedTuple):
    id: str
    endpoint: str


#: Endpoint label of a websocket path (the label values of ``switchboard_websocket_*``).
ENDPOINTS = {"/ws/chat/": "chat", "/ws/notifications/": "notifications"}
OTHER_ENDPOINT = "other"

NO_CONNECTION = Connection("-", OTHER_ENDPOINT)
current: contextvars.ContextVar[Connection] = contextvars.ContextVar(
    "switchboard_connection", default=NO_CONNECTION
)


def endpoint_of(path: str) -> str:
    """``chat``, ``notifications`` or ``other`` (an unknown path: its label must stay bounded)."""
    for prefix, name in ENDPOINTS.items():
        if path.startswith(prefix):
            return name
    return OTHER_ENDPOINT


def begin(path: str) -> Connection:
    """Give the websocket this task serves a new id (12 hex digits, random, in no frame)."""
    connection = Connection(uuid.uuid4().hex[:12], endpoint_of(path))
    current.set(connection)
    return connection
