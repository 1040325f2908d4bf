"""Who is serving: ``"<replica>:<pid>"`` for ``sent_by`` / ``delivered_by``."""

from __future__ import annotations

import os
import socket

from django.conf import settings

_cached: str | None = None


def process_id() -> str:
    """This worker process, as ``"<replica name or host name>:<pid>"``.

    Worked out once per process (it is stamped on every delivered frame: two system calls each
    time added up) and forgotten in a forked child, because gunicorn forks its workers after the
    master may have called it.
    """
    global _cached
    if _cached is None:
        replica = settings.REPLICA_NAME or socket.gethostname()
        _cached = f"{replica}:{os.getpid()}"
    return _cached


def _forget() -> None:
    global _cached
    _cached = None


os.register_at_fork(after_in_child=_forget)
