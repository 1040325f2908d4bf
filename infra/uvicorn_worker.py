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

from uvicorn_worker import UvicornWorker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "app"))

from config import env


def uvicorn_options() -> dict[str, Any]:
    """uvicorn.Config keyword arguments that gunicorn has no flag for."""
    return {
        "loop": "uvloop",
        "http": "httptools",
        # The sans-I/O implementation: the legacy "websockets" one is deprecated in uvicorn.
        "ws": "websockets-sansio",
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


class SwitchboardUvicornWorker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = uvicorn_options()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).addFilter(DropQueryStrings())
