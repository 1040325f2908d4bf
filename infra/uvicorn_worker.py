"""The gunicorn worker class: uvicorn with Switchboard's websocket settings.

Gunicorn's flags cannot reach uvicorn's websocket options, so they are set here, from the same
environment variables the rest of the stack reads (config/env.py). ``uvicorn.workers`` is
deprecated; this builds on the maintained ``uvicorn_worker`` package.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

from django.core.exceptions import ImproperlyConfigured
from uvicorn_worker import UvicornWorker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "app"))

from config import env

#: WS_PROTOCOL values -> uvicorn ``ws`` implementations.
WS_PROTOCOLS = {
    "lean": "infra.uvicorn_ws:LeanWebSocketsProtocol",
    "websockets-sansio": "websockets-sansio",
}


def ws_protocol() -> str:
    """The uvicorn ``ws`` implementation WS_PROTOCOL names."""
    name = env.get("WS_PROTOCOL")
    if name not in WS_PROTOCOLS:
        choices = ", ".join(WS_PROTOCOLS)
        raise ImproperlyConfigured(f"WS_PROTOCOL={name!r}; expected one of {choices}")
    return WS_PROTOCOLS[name]


def uvicorn_options() -> dict[str, Any]:
    """uvicorn.Config keyword arguments that gunicorn has no flag for."""
    return {
        "loop": "uvloop",
        "http": "httptools",
        # The sans-I/O implementation (the legacy "websockets" one is deprecated in uvicorn), by
        # default with a lighter per-socket state (infra/uvicorn_ws.py).
        "ws": ws_protocol(),
        # Frames above this close the socket with 1009 (message too big).
        "ws_max_size": env.get_int("WS_MAX_MESSAGE_BYTES", minimum=1024),
        # Pings keep idle sockets alive through proxies and detect vanished peers.
        "ws_ping_interval": env.get_float("WS_PING_INTERVAL", minimum=1),
        "ws_ping_timeout": env.get_float("WS_PING_TIMEOUT", minimum=1),
        "ws_per_message_deflate": env.get_bool("WS_PER_MESSAGE_DEFLATE"),
        # Channels' ProtocolTypeRouter has no lifespan handler.
        "lifespan": "off",
        "proxy_headers": True,
        "server_header": False,
    }


class DropQueryStrings(logging.Filter):
    """Cuts the query string off the paths uvicorn logs ("WebSocket /ws/chat/x/?token=..."):
    whatever a client puts there (tokens included) must not reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.split("?", 1)[0] if isinstance(arg, str) and arg.startswith("/") else arg
                for arg in record.args
            )
        return True


class ClientErrorsAreNotServerErrors(logging.Filter):
    """uvicorn's sans-I/O websockets log a text frame that is not UTF-8 as an ERROR with a
    traceback, though they handle it (close 1007): any client could fill the log with server
    "errors". Such a record becomes one INFO line that names the refusal and its reason."""

    MESSAGES = {"Invalid UTF-8 sequence received from client.": "invalid_utf8 (closed 1007)"}

    def filter(self, record: logging.LogRecord) -> bool:
        reason = self.MESSAGES.get(record.msg) if isinstance(record.msg, str) else None
        if reason is not None:
            record.msg, record.args = "refused frame: %s", (reason,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class SwitchboardUvicornWorker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = uvicorn_options()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).addFilter(DropQueryStrings())
        logging.getLogger("uvicorn.error").addFilter(ClientErrorsAreNotServerErrors())
