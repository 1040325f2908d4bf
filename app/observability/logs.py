"""``LOG_FORMAT=json``: one JSON object per line, for log pipelines (Loki, Elasticsearch, ...).

Every record carries ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``pid``, ``replica``
and ``message``; a record written while serving a websocket also carries ``connection``, the id
:mod:`observability.context` gave that socket, so one grep follows a connection from its
handshake to its close. Django's loggers (``config/settings.py``) and gunicorn's and uvicorn's
own (``infra/gunicorn.conf.py``) all use this formatter, so the stream is JSON from end to end.

The messages are the plain format's, word for word: what the log-hygiene test keeps out of them
(bodies, tokens, query strings) stays out of both. Nothing else is written: ``extra`` attributes
of a record are dropped (Django's request log attaches the request, query string included).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from observability import context

FORMATS = ("plain", "json")
#: The plain format, shared by Django's and gunicorn's loggers.
PLAIN_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
#: The only keys a JSON line may carry.
JSON_KEYS = frozenset(
    {"timestamp", "level", "logger", "pid", "replica", "message", "connection", "endpoint"}
    | {"exc_info", "stack_info"}
)


def replica_name() -> str:
    """``REPLICA_NAME``, else the host name (as in ``sent_by`` / ``delivered_by``)."""
    return os.environ.get("REPLICA_NAME") or socket.gethostname()


class JsonFormatter(_JsonFormatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fmt", ["levelname", "name", "process", "message"])
        kwargs.setdefault(
            "rename_fields", {"levelname": "level", "name": "logger", "process": "pid"}
        )
        kwargs.setdefault("timestamp", "timestamp")
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)
        self.replica = replica_name()

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        for key in [key for key in log_data if key not in JSON_KEYS]:
            del log_data[key]
        log_data["replica"] = self.replica
        connection = context.current.get()
        if connection is not context.NO_CONNECTION:
            log_data["connection"] = connection.id
            log_data["endpoint"] = connection.endpoint


def formatter_config(log_format: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` formatter entry of ``LOG_FORMAT``."""
    if log_format not in FORMATS:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(f"LOG_FORMAT={log_format!r}; expected one of {FORMATS}")
    if log_format == "json":
        return {"()": "observability.logs.JsonFormatter"}
    return {"format": PLAIN_FORMAT}
