"""Channels' Origin check (cross-site websocket hijacking), with each refusal logged."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import ParseResult

from channels.security.websocket import OriginValidator
from django.conf import settings

from observability import metrics

logger = logging.getLogger("switchboard.ws")


class LoggedOriginValidator(OriginValidator):
    """Refuses handshakes whose Origin is not an allowed host, and says so in the log."""

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if super().valid_origin(parsed_origin):
            return True
        # %r: the header is the client's text; repr keeps it on one log line.
        origin = parsed_origin.geturl()[:200] if parsed_origin is not None else None
        logger.info("refused websocket: origin_not_allowed (Origin %r)", origin)
        metrics.handshake_refused("origin")
        return False


def allowed_hosts_origin_validator(application: Any) -> LoggedOriginValidator:
    """Like ``channels.security.websocket.AllowedHostsOriginValidator``, with logging."""
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
    return LoggedOriginValidator(application, allowed_hosts)
