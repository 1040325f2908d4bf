"""The websocket Origin rule (cross-site websocket hijacking), with each refusal logged.

* An ``Origin`` whose host is in ``ALLOWED_HOSTS`` passes (browsers, with their cookie).
* A foreign ``Origin`` is refused with HTTP 403, whatever credential comes with it: a browser
  on another site must not open a socket with the user's cookie, nor with a token it holds.
* No ``Origin`` at all passes only when the handshake carries a connection token (then
  ``wsauth.middleware`` verifies it and refuses an invalid one with ``auth_failed``, 4401).
  Browsers always send ``Origin``, so a handshake without one comes from a program; a token
  is a credential no other site can make a browser attach (unlike a cookie), so such a program
  gets in only with a credential of its own.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import ParseResult

from channels.security.websocket import OriginValidator
from django.conf import settings

from observability import metrics
from wsauth.middleware import presented_token

logger = logging.getLogger("switchboard.ws")


class LoggedOriginValidator(OriginValidator):
    """Refuses handshakes whose Origin is not an allowed host, and says so in the log."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        has_origin = any(name == b"origin" for name, _ in scope.get("headers", []))
        if not has_origin and presented_token(scope) is not None:
            return await self.application(scope, receive, send)
        return await super().__call__(scope, receive, send)

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if super().valid_origin(parsed_origin):
            return True
        # %r: the header is the client's text; repr keeps it on one log line.
        origin = parsed_origin.geturl()[:200] if parsed_origin is not None else None
        logger.info("refused websocket: origin_not_allowed (Origin %r)", origin)
        metrics.handshake_refused("origin")
        return False


def allowed_hosts_origin_validator(application: Any) -> LoggedOriginValidator:
    """Like ``channels.security.websocket.AllowedHostsOriginValidator``, with logging and the
    token exception above."""
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
    return LoggedOriginValidator(application, allowed_hosts)
