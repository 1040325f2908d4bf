"""Who is serving: ``"<replica>:<pid>"`` for ``sent_by`` / ``delivered_by``."""

from __future__ import annotations

import os
import socket

from django.conf import settings


def process_id() -> str:
    """This worker process, as ``"<replica name or host name>:<pid>"``.

    Computed on each call (cheap) rather than at import, because gunicorn forks workers after
    the master may have imported this module.
    """
    replica = settings.REPLICA_NAME or socket.gethostname()
    return f"{replica}:{os.getpid()}"
